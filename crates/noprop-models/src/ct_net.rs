//! The continuous-time network of Figure 6 (right), shared by NoProp-CT and
//! NoProp-FM: one network for all t, no BatchNorm anywhere.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::figure6::FIGURE6;
use crate::image_path::{image_path, ImagePath, ImagePathConfig, ImageTail};
use crate::layers::{linear, Linear, Mode};
use crate::ops::Kernels;

/// Shapes and options of a [`CtNet`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CtNetConfig {
    /// Input channels `C`.
    pub in_channels: usize,
    /// Image height (a multiple of 4).
    pub height: usize,
    /// Image width (a multiple of 4).
    pub width: usize,
    /// Latent dimension `d`; `d = C*H*W` selects the prototype label path.
    pub latent_dim: usize,
    /// Number of classes `m`.
    pub classes: usize,
    /// Dropout probability in the image path.
    pub dropout: f64,
    /// Dimension of the sinusoidal time embedding (64 in Figure 6).
    pub time_dim: usize,
    /// `t` is embedded as `time_scale * t` (the paper does not say; default 1000).
    pub time_scale: f64,
    /// Kernels for convolutions and pooling.
    pub kernels: Kernels,
}

impl CtNetConfig {
    fn image(&self, input_grad: bool) -> ImagePathConfig {
        ImagePathConfig {
            channels: self.in_channels,
            height: self.height,
            width: self.width,
            dropout: self.dropout,
            kernels: self.kernels,
            input_grad,
            tail: ImageTail::Relu,
        }
    }

    /// True when `d = C*H*W`.
    pub fn prototype(&self) -> bool {
        self.latent_dim == self.in_channels * self.height * self.width
    }
}

#[derive(Debug, Clone)]
enum CtLabel {
    Linear(Linear),
    Image(ImagePath),
}

/// ```text
/// image: the Figure-6 convs, flatten -> Linear 256 -> ReLU
/// label: Linear d -> 256 -> ReLU        (z as an image through its own image path when d = C*H*W)
/// time:  sinusoidal(time_dim) of time_scale * t -> Linear 256 -> ReLU
/// fuse:  concat (768) -> Linear 256 ReLU -> Linear 128 ReLU -> Linear m = logits
/// ```
#[derive(Debug, Clone)]
pub struct CtNet {
    cfg: CtNetConfig,
    image: ImagePath,
    label: CtLabel,
    time_fc: Linear,
    fc1: Linear,
    fc2: Linear,
    out: Linear,
}

/// Builds the network with parameters `img.*`, `label.*`, `time.fc.*`, `fuse.{fc1,fc2,out}.*`.
pub fn ct_net(cfg: CtNetConfig, vb: VarBuilder) -> candle_core::Result<CtNet> {
    if cfg.time_dim == 0 || !cfg.time_dim.is_multiple_of(2) {
        candle_core::bail!(
            "the time embedding dimension must be even and positive, got {}",
            cfg.time_dim
        );
    }
    let (f, hidden) = (FIGURE6.features, FIGURE6.fuse_hidden);
    let image = image_path(cfg.image(false), vb.pp("img"))?;
    let label = if cfg.prototype() {
        CtLabel::Image(image_path(cfg.image(true), vb.pp("label"))?)
    } else {
        CtLabel::Linear(linear(cfg.latent_dim, f, vb.pp("label").pp("fc"))?)
    };
    let fuse = vb.pp("fuse");
    Ok(CtNet {
        image,
        label,
        time_fc: linear(cfg.time_dim, f, vb.pp("time").pp("fc"))?,
        fc1: linear(3 * f, f, fuse.pp("fc1"))?,
        fc2: linear(f, hidden, fuse.pp("fc2"))?,
        out: linear(hidden, cfg.classes, fuse.pp("out"))?,
        cfg,
    })
}

/// The sinusoidal embedding `[sin(s t w_i), cos(s t w_i)]`, `w_i = 10000^(-i/(dim/2))`.
///
/// # Shapes
/// `t`: `[B]`; returns `[B, dim]`.
pub fn sinusoidal_embedding(t: &Tensor, dim: usize, scale: f64) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() * scale)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?.to_dtype(t.dtype())?;
    let arg = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[arg.sin()?, arg.cos()?], 1)
}

impl CtNet {
    /// The configuration.
    pub fn config(&self) -> &CtNetConfig {
        &self.cfg
    }

    /// Image features `[B, 256]`; independent of `z` and `t`, so samplers compute them once.
    pub fn image_features(&self, x: &Tensor, mode: &mut Mode) -> candle_core::Result<Tensor> {
        self.image.forward(x, mode)
    }

    /// Logits `[B, m]` from `z` `[B, d]`, times `t` `[B]` and image features.
    pub fn logits_from_features(
        &self,
        z: &Tensor,
        t: &Tensor,
        fx: &Tensor,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let k = self.cfg.kernels;
        let fz = self.label_features(z, mode)?;
        let te = sinusoidal_embedding(
            &t.to_dtype(DType::F64)?,
            self.cfg.time_dim,
            self.cfg.time_scale,
        )?
        .to_dtype(z.dtype())?;
        let ft = self.time_fc.forward_with(k, &te)?.relu()?;
        let h = Tensor::cat(&[fx, &fz, &ft], 1)?;
        let h = self.fc1.forward_with(k, &h)?.relu()?;
        let h = self.fc2.forward_with(k, &h)?.relu()?;
        self.out.forward_with(k, &h)
    }

    /// The part of the fuse layer's first Linear that depends on neither `z`
    /// nor `t`: `fx W1[:, ..256]^T + b1`, `[B, 256]`. With
    /// [`CtNet::logits_projected`] it gives the logits of
    /// [`CtNet::logits_from_features`] for a fixed `fx`, with the image
    /// columns of `W1` applied once per solve instead of once per step.
    pub fn project_features(&self, fx: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.fc1.weight().narrow(1, 0, FIGURE6.features)?;
        noprop_kernels::matmul_with(self.cfg.kernels, fx, &w.t()?)?.broadcast_add(self.fc1.bias())
    }

    /// Logits `[B, m]` from `z` `[B, d]`, projected image features `p` (see
    /// [`CtNet::project_features`]) and one time `t` shared by every row, as
    /// in an ODE solve: the time path and its columns of `W1` run on one row.
    pub fn logits_projected(
        &self,
        z: &Tensor,
        t: f64,
        p: &Tensor,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let k = self.cfg.kernels;
        let fz = self.label_features(z, mode)?;
        let te = sinusoidal_embedding(
            &Tensor::new(&[t], z.device())?,
            self.cfg.time_dim,
            self.cfg.time_scale,
        )?
        .to_dtype(z.dtype())?;
        let ft = self.time_fc.forward_with(k, &te)?.relu()?;
        // `W1`'s columns: image features, then label, then time.
        let (w, f) = (self.fc1.weight(), FIGURE6.features);
        let time_row = noprop_kernels::matmul_with(k, &ft, &w.narrow(1, 2 * f, f)?.t()?)?;
        let h = (noprop_kernels::matmul_with(k, &fz, &w.narrow(1, f, f)?.t()?)? + p)?
            .broadcast_add(&time_row)?
            .relu()?;
        let h = self.fc2.forward_with(k, &h)?.relu()?;
        self.out.forward_with(k, &h)
    }

    /// The label path's features `[B, 256]`.
    fn label_features(&self, z: &Tensor, mode: &mut Mode) -> candle_core::Result<Tensor> {
        match &self.label {
            CtLabel::Linear(l) => l.forward_with(self.cfg.kernels, z)?.relu(),
            CtLabel::Image(path) => {
                let c = &self.cfg;
                path.forward(
                    &z.reshape((z.dim(0)?, c.in_channels, c.height, c.width))?,
                    mode,
                )
            }
        }
    }

    /// Logits `[B, m]`.
    pub fn forward(
        &self,
        z: &Tensor,
        x: &Tensor,
        t: &Tensor,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let fx = self.image_features(x, mode)?;
        self.logits_from_features(z, t, &fx, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::seeded_var_builder;
    use candle_core::Device;
    use candle_nn::VarMap;
    use noprop_core::NoiseRng;

    /// The projected path (ODE solves) gives the concatenating path's logits,
    /// for the Linear label path and for the prototype one, at several `t`.
    #[test]
    fn projected_logits_match_the_concatenated_ones() {
        let dev = Device::Cpu;
        for latent_dim in [10, 64] {
            let cfg = CtNetConfig {
                in_channels: 1,
                height: 8,
                width: 8,
                latent_dim,
                classes: 10,
                dropout: 0.0,
                time_dim: 64,
                time_scale: 1000.0,
                kernels: Kernels::Stock,
            };
            let vars = VarMap::new();
            let net = ct_net(cfg, seeded_var_builder(&vars, 5, DType::F64, &dev)).unwrap();
            let mut rng = NoiseRng::new(9);
            let x = rng.randn(&[3, 1, 8, 8], DType::F64, &dev).unwrap();
            let z = rng.randn(&[3, latent_dim], DType::F64, &dev).unwrap();
            let fx = net.image_features(&x, &mut Mode::Eval).unwrap();
            let p = net.project_features(&fx).unwrap();
            for t in [0.0, 0.37, 1.0] {
                let want = net
                    .logits_from_features(
                        &z,
                        &Tensor::full(t, 3, &dev).unwrap(),
                        &fx,
                        &mut Mode::Eval,
                    )
                    .unwrap();
                let got = net.logits_projected(&z, t, &p, &mut Mode::Eval).unwrap();
                let err = (got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    err <= 1e-12 * scale.max(1.0),
                    "d = {latent_dim}, t = {t}: max error {err}"
                );
            }
        }
    }
}

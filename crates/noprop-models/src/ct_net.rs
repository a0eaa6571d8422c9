//! The continuous-time network of Figure 6 (right), shared by NoProp-CT and
//! NoProp-FM: one network for all t, no BatchNorm anywhere.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

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
    if cfg.time_dim == 0 || cfg.time_dim % 2 != 0 {
        candle_core::bail!("the time embedding dimension must be even and positive, got {}", cfg.time_dim);
    }
    let image = image_path(cfg.image(false), vb.pp("img"))?;
    let label = if cfg.prototype() {
        CtLabel::Image(image_path(cfg.image(true), vb.pp("label"))?)
    } else {
        CtLabel::Linear(linear(cfg.latent_dim, 256, vb.pp("label").pp("fc"))?)
    };
    let fuse = vb.pp("fuse");
    Ok(CtNet {
        image,
        label,
        time_fc: linear(cfg.time_dim, 256, vb.pp("time").pp("fc"))?,
        fc1: linear(768, 256, fuse.pp("fc1"))?,
        fc2: linear(256, 128, fuse.pp("fc2"))?,
        out: linear(128, cfg.classes, fuse.pp("out"))?,
        cfg,
    })
}

/// The sinusoidal embedding `[sin(s t w_i), cos(s t w_i)]`, `w_i = 10000^(-i/(dim/2))`.
///
/// # Shapes
/// `t`: `[B]`; returns `[B, dim]`.
pub fn sinusoidal_embedding(t: &Tensor, dim: usize, scale: f64) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f64> = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() * scale).collect();
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
    pub fn logits_from_features(&self, z: &Tensor, t: &Tensor, fx: &Tensor, mode: &mut Mode) -> candle_core::Result<Tensor> {
        let k = self.cfg.kernels;
        let fz = match &self.label {
            CtLabel::Linear(l) => l.forward_with(k, z)?.relu()?,
            CtLabel::Image(path) => {
                let c = &self.cfg;
                path.forward(&z.reshape((z.dim(0)?, c.in_channels, c.height, c.width))?, mode)?
            }
        };
        let te = sinusoidal_embedding(&t.to_dtype(DType::F64)?, self.cfg.time_dim, self.cfg.time_scale)?.to_dtype(z.dtype())?;
        let ft = self.time_fc.forward_with(k, &te)?.relu()?;
        let h = Tensor::cat(&[fx, &fz, &ft], 1)?;
        let h = self.fc1.forward_with(k, &h)?.relu()?;
        let h = self.fc2.forward_with(k, &h)?.relu()?;
        self.out.forward_with(k, &h)
    }

    /// Logits `[B, m]`.
    pub fn forward(&self, z: &Tensor, x: &Tensor, t: &Tensor, mode: &mut Mode) -> candle_core::Result<Tensor> {
        let fx = self.image_features(x, mode)?;
        self.logits_from_features(z, t, &fx, mode)
    }
}

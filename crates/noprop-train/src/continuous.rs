//! What NoProp-CT, NoProp-FM and the adjoint baseline share at inference:
//! the continuous-time network with its image features computed once per
//! batch, as the samplers' denoiser and velocity field; and their
//! parameters' defaults.

use candle_core::{Tensor, D};
use noprop_core::{ContinuousDenoiser, VelocityField};
use noprop_kernels::matmul;
use noprop_models::{CtModel, Mode};

/// The default dimension of the sinusoidal time embedding.
pub(crate) const TIME_DIM: usize = 64;
/// The default scale: `t` is embedded as `1000 t` (the paper does not say).
pub(crate) const TIME_SCALE: f64 = 1000.0;
/// The default number of integration steps (1000 in the paper).
pub(crate) const STEPS: usize = 1000;

/// The network with fixed image features `fx` (stacked for every run).
pub struct Cached<'a> {
    model: &'a CtModel,
    fx: Tensor,
    /// `fx` through the image columns of the fuse layer, for one-time calls.
    projected: Tensor,
}

impl<'a> Cached<'a> {
    /// The network on the images whose features are `fx` `[B, 256]`,
    /// repeated for `runs` stacked inference runs.
    pub fn new(model: &'a CtModel, fx: &Tensor, runs: usize) -> candle_core::Result<Self> {
        let fx = crate::method::stack_runs(fx, runs)?;
        let projected = model.net().project_features(&fx)?;
        Ok(Self {
            model,
            fx,
            projected,
        })
    }

    /// The network on the images `x` `[B, C, H, W]` (image features computed
    /// once, evaluation mode) for `runs` stacked runs, and the stand-in input
    /// the samplers read only their batch size and dtype from.
    pub fn prepare(
        model: &'a CtModel,
        x: &Tensor,
        runs: usize,
    ) -> candle_core::Result<(Self, Tensor)> {
        let fx = model.net().image_features(x, &mut Mode::Eval)?;
        let cached = Self::new(model, &fx, runs)?;
        let xs = Tensor::zeros((cached.rows()?, 1), candle_core::DType::F32, x.device())?;
        Ok((cached, xs))
    }

    /// Rows: images times runs.
    pub fn rows(&self) -> candle_core::Result<usize> {
        self.fx.dim(0)
    }

    fn logits_at(&self, z: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        self.model
            .net()
            .logits_projected(z, t, &self.projected, &mut Mode::Eval)
    }
}

impl ContinuousDenoiser for Cached<'_> {
    fn latent_dim(&self) -> usize {
        self.model.embed().dims().get(1).copied().unwrap_or(0)
    }
    fn denoise(&self, z: &Tensor, _x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self
            .model
            .net()
            .logits_from_features(z, t, &self.fx, &mut Mode::Eval)?;
        matmul(
            &candle_nn::ops::softmax(&logits, D::Minus1)?,
            self.model.embed(),
        )
    }
    fn denoise_at(&self, z: &Tensor, _x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        matmul(
            &candle_nn::ops::softmax(&self.logits_at(z, t)?, D::Minus1)?,
            self.model.embed(),
        )
    }
}

impl VelocityField for Cached<'_> {
    fn latent_dim(&self) -> usize {
        self.model.embed().dims().get(1).copied().unwrap_or(0)
    }
    fn velocity(&self, z: &Tensor, _x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self
            .model
            .net()
            .logits_from_features(z, t, &self.fx, &mut Mode::Eval)?;
        matmul(&logits, self.model.embed())
    }
    fn velocity_at(&self, z: &Tensor, _x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        matmul(&self.logits_at(z, t)?, self.model.embed())
    }
}

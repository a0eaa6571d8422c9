//! The noising process q, the eq. 3 update and the discrete-time sampler.

use candle_core::Tensor;

use crate::error::{check_shape, CoreError, Result};
use crate::rng::NoiseRng;
use crate::schedule::{DiscreteSchedule, Eq3Coefficients};

/// A network that predicts the clean label embedding from a noisy one.
///
/// This is the only thing a user's own network must implement to be trained
/// and sampled with NoProp-DT: block `t` (in `1..=T`) maps the latent
/// `z_{t-1}` `[B, d]` and the input `x` `[B, ...]` to `uhat_t` `[B, d]`.
pub trait Denoiser {
    /// The number of blocks `T`.
    fn blocks(&self) -> usize;
    /// The dimension `d` of the latent.
    fn latent_dim(&self) -> usize;
    /// Block `t`'s prediction `uhat_t(z_{t-1}, x)`, shape `[B, d]`.
    fn denoise(&self, t: usize, z: &Tensor, x: &Tensor) -> candle_core::Result<Tensor>;
}

/// Whether the eq. 3 sampler adds its noise term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Inference {
    /// `z_t = a uhat + b z_{t-1} + sqrt(c) eps` with `eps ~ N(0, I)` (the paper's).
    Stochastic,
    /// The same update with `eps = 0`; `z_0` is still drawn from `N(0, I)`.
    Deterministic,
}

/// Samples `z_t ~ q(z_t | y) = N(sqrt(abar) u, (1 - abar) I)` given `u = u_y` `[B, d]`.
///
/// # Shapes
/// `u`: `[B, d]`; returns `[B, d]`.
pub fn q_sample(u: &Tensor, abar: f64, rng: &mut NoiseRng) -> Result<Tensor> {
    check_shape("q_sample: u", u, &[None, None], "[B, d]")?;
    let eps = rng.randn(u.dims(), u.dtype(), u.device())?;
    q_sample_with(u, abar, &eps)
}

/// [`q_sample`] with the noise given: `sqrt(abar) u + sqrt(1 - abar) eps`.
pub fn q_sample_with(u: &Tensor, abar: f64, eps: &Tensor) -> Result<Tensor> {
    if u.dims() != eps.dims() {
        return Err(CoreError::Shape {
            what: "q_sample: eps",
            expected: format!("{:?} (the shape of u)", u.dims()),
            found: eps.dims().to_vec(),
        });
    }
    Ok(((u * abar.sqrt())? + (eps * (1.0 - abar).sqrt())?)?)
}

/// One eq. 3 step: `z_t = a_t uhat + b_t z_{t-1} + sqrt(c_t) eps` (no noise when `eps` is `None`).
///
/// # Shapes
/// `uhat`, `z_prev` and `eps`: `[B, d]`; returns `[B, d]`.
pub fn dt_step(
    sched: &DiscreteSchedule,
    t: usize,
    uhat: &Tensor,
    z_prev: &Tensor,
    eps: Option<&Tensor>,
) -> Result<Tensor> {
    if t == 0 || t > sched.blocks() {
        return Err(CoreError::BlockIndex { t, blocks: sched.blocks() });
    }
    if uhat.dims() != z_prev.dims() {
        return Err(CoreError::Shape {
            what: "dt_step: uhat",
            expected: format!("{:?} (the shape of z_prev)", z_prev.dims()),
            found: uhat.dims().to_vec(),
        });
    }
    eq3_update(sched.coefficients(t), uhat, z_prev, eps)
}

/// The eq. 3 update with given coefficients:
/// `a uhat + b z_prev + sqrt(c) eps` (no noise when `eps` is `None`).
/// [`dt_step`] and the continuous-time sampler both use it.
///
/// # Shapes
/// `uhat`, `z_prev` and `eps`: `[B, d]`; returns `[B, d]`.
pub fn eq3_update(k: Eq3Coefficients, uhat: &Tensor, z_prev: &Tensor, eps: Option<&Tensor>) -> Result<Tensor> {
    if uhat.dims() != z_prev.dims() {
        return Err(CoreError::Shape {
            what: "eq3_update: uhat",
            expected: format!("{:?} (the shape of z_prev)", z_prev.dims()),
            found: uhat.dims().to_vec(),
        });
    }
    let mut z = ((uhat * k.a)? + (z_prev * k.b)?)?;
    if let Some(eps) = eps {
        if eps.dims() != z_prev.dims() {
            return Err(CoreError::Shape {
                what: "eq3_update: eps",
                expected: format!("{:?} (the shape of z_prev)", z_prev.dims()),
                found: eps.dims().to_vec(),
            });
        }
        z = (z + (eps * k.c.sqrt())?)?;
    }
    Ok(z)
}

/// Runs the eq. 3 sampler over all `T` blocks from `z_0 ~ N(0, I)` and returns `z_T`.
///
/// # Shapes
/// `x`: `[B, ...]`; returns `[B, d]`.
pub fn sample_dt<D: Denoiser + ?Sized>(
    denoiser: &D,
    sched: &DiscreteSchedule,
    x: &Tensor,
    mode: Inference,
    rng: &mut NoiseRng,
) -> Result<Tensor> {
    if denoiser.blocks() != sched.blocks() {
        return Err(CoreError::BlockIndex { t: denoiser.blocks(), blocks: sched.blocks() });
    }
    let b = x.dim(0)?;
    let shape = [b, denoiser.latent_dim()];
    let mut z = rng.randn(&shape, x.dtype(), x.device())?;
    for t in 1..=sched.blocks() {
        let uhat = denoiser.denoise(t, &z, x)?;
        let eps = match mode {
            Inference::Stochastic => Some(rng.randn(&shape, x.dtype(), x.device())?),
            Inference::Deterministic => None,
        };
        z = dt_step(sched, t, &uhat, &z, eps.as_ref())?;
    }
    Ok(z)
}

//! The noising process q, the eq. 3 update and the discrete-time sampler.

use candle_core::Tensor;

use crate::error::{check_float, check_shape, CoreError, Result};
use crate::rng::NoiseRng;
use crate::schedule::{DiscreteSchedule, Eq3Coefficients};

/// A network that predicts the clean label embedding from a noisy one.
///
/// This is the only thing a user's own network must implement to be sampled
/// with [`sample_dt`] (training needs only the same `denoise` call; see the
/// [guide](crate::guide)): block `t` (in `1..=T`) maps the latent `z_{t-1}`
/// `[B, d]` and the input `x` `[B, ...]` to `uhat_t` `[B, d]`, its estimate
/// of the clean embedding `u_y`.
///
/// `denoise` returns `candle_core::Result` so that candle's operations need
/// no conversion; this crate's functions can be called in it with `?` too,
/// because [`CoreError`] converts into `candle_core::Error`.
///
/// [`blocks`](Self::blocks) must equal the schedule's `T`: [`sample_dt`]
/// checks this before it runs any block and returns
/// [`CoreError::BlockCountMismatch`] otherwise.
pub trait Denoiser {
    /// The number of blocks `T`.
    fn blocks(&self) -> usize;
    /// The dimension `d` of the latent.
    fn latent_dim(&self) -> usize;
    /// Block `t`'s prediction `uhat_t(z_{t-1}, x)`, shape `[B, d]`, for `t`
    /// in `1..=T`; `z` is `z_{t-1}`.
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
/// `abar` must lie in `[0, 1]` and `u` must be a float tensor (the noise is
/// drawn in its dtype); otherwise the result is an error.
///
/// # Shapes
/// `u`: `[B, d]`; returns `[B, d]`.
pub fn q_sample(u: &Tensor, abar: f64, rng: &mut NoiseRng) -> Result<Tensor> {
    check_shape("q_sample: u", u, &[None, None], "[B, d]")?;
    check_float("q_sample: u", u)?;
    check_abar(abar)?;
    let eps = rng.randn(u.dims(), u.dtype(), u.device())?;
    q_sample_with(u, abar, &eps)
}

fn check_abar(abar: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&abar) {
        return Err(CoreError::BadArgument {
            name: "abar",
            value: abar,
            reason: "must lie in [0, 1]",
        });
    }
    Ok(())
}

/// [`q_sample`] with the noise given: `sqrt(abar) u + sqrt(1 - abar) eps`.
pub fn q_sample_with(u: &Tensor, abar: f64, eps: &Tensor) -> Result<Tensor> {
    check_abar(abar)?;
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
    let k = sched.coefficients(t)?;
    if uhat.dims() != z_prev.dims() {
        return Err(CoreError::Shape {
            what: "dt_step: uhat",
            expected: format!("{:?} (the shape of z_prev)", z_prev.dims()),
            found: uhat.dims().to_vec(),
        });
    }
    eq3_update(k, uhat, z_prev, eps)
}

/// The eq. 3 update with given coefficients:
/// `a uhat + b z_prev + sqrt(c) eps` (no noise when `eps` is `None`).
/// [`dt_step`] and the continuous-time sampler both use it. The
/// coefficients must be finite with `c >= 0` (a [`CoreError::BadArgument`]
/// otherwise), as [`coefficients_between`](crate::coefficients_between)
/// guarantees.
///
/// # Shapes
/// `uhat`, `z_prev` and `eps`: `[B, d]`; returns `[B, d]`.
pub fn eq3_update(
    k: Eq3Coefficients,
    uhat: &Tensor,
    z_prev: &Tensor,
    eps: Option<&Tensor>,
) -> Result<Tensor> {
    for (name, value) in [("a", k.a), ("b", k.b), ("c", k.c)] {
        if !value.is_finite() {
            return Err(CoreError::BadArgument {
                name,
                value,
                reason: "must be finite",
            });
        }
    }
    if k.c < 0.0 {
        return Err(CoreError::BadArgument {
            name: "c",
            value: k.c,
            reason: "is a variance and must be >= 0",
        });
    }
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
/// Block `t` receives `z_{t-1}` and `x`, for `t = 1..=T` in turn. Classify
/// the result with your output head, `argmax f_out(z_T)`.
///
/// The latents are drawn in `x`'s dtype and on `x`'s device, so `x` must be
/// a float tensor in the dtype your network computes in: integer input (such
/// as raw `u8` pixels) is [`CoreError::NotFloat`] rather than zero noise.
/// A denoiser whose [`Denoiser::blocks`] differs from the schedule's `T` is
/// [`CoreError::BlockCountMismatch`], reported before any block runs.
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
        return Err(CoreError::BlockCountMismatch {
            denoiser: denoiser.blocks(),
            schedule: sched.blocks(),
        });
    }
    check_float("sample_dt: x", x)?;
    let b = x.dim(0)?;
    let shape = [b, denoiser.latent_dim()];
    let mut z = rng.randn(&shape, x.dtype(), x.device())?;
    for t in 1..=sched.blocks() {
        let uhat = denoiser.denoise(t, &z, x)?;
        let eps = match mode {
            Inference::Stochastic => Some(rng.randn(&shape, x.dtype(), x.device())?),
            Inference::Deterministic => None,
        };
        // No autograd graph across blocks (see `sample_ct_eq3`).
        z = dt_step(sched, t, &uhat, &z, eps.as_ref())?.detach();
    }
    Ok(z)
}

//! Loss terms of NoProp-DT (spec section 4, eq. 8 and 61).
//!
//! Every function checks its shapes first and returns the batch mean as a
//! scalar tensor, so terms can be summed and back-propagated directly.

use candle_core::{DType, Tensor, D};

use crate::error::{check_shape, CoreError, Result};

/// `KL(q(z_0|y) || N(0, I))` averaged over the batch:
/// `0.5 (abar_0 ||u||^2 + d (1 - abar_0) - d - d log(1 - abar_0))`.
///
/// # Shapes
/// `u`: `[B, d]`, the embeddings `u_{y_i}`; returns a scalar.
pub fn kl_prior(u: &Tensor, abar0: f64) -> Result<Tensor> {
    check_shape("kl_prior: u", u, &[None, None], "[B, d]")?;
    // At abar0 = 1 the log term is infinite; outside [0, 1] it is NaN.
    if !(0.0..1.0).contains(&abar0) {
        return Err(CoreError::BadArgument {
            name: "abar0",
            value: abar0,
            reason: "must lie in [0, 1)",
        });
    }
    let d = u.dim(1)? as f64;
    let constant = 0.5 * (d * (1.0 - abar0) - d - d * (1.0 - abar0).ln());
    let sq = u.sqr()?.sum(1)?.mean(0)?;
    Ok(((sq * (0.5 * abar0))? + constant)?)
}

/// Mean cross-entropy `-(1/B) sum_i log softmax(logits_i)[y_i]`.
///
/// # Shapes
/// `logits`: `[B, m]`; `targets`: `[B]` of `u32`; returns a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_shape("cross_entropy: logits", logits, &[None, None], "[B, m]")?;
    check_shape(
        "cross_entropy: targets",
        targets,
        &[Some(logits.dim(0)?)],
        "[B]",
    )?;
    let logp = log_softmax(logits)?;
    let picked = logp.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Numerically stable `log softmax` over the last dimension.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The weighted denoising term of eq. 61 for one block:
/// `weight * (1/B) sum_i ||uhat_i - u_i||^2`, the squared norm summed over `d`,
/// with `weight = T eta / 2 (SNR(t) - SNR(t-1))` (see
/// [`DiscreteSchedule::dt_weight`](crate::DiscreteSchedule::dt_weight)),
/// which must be finite and `>= 0`.
///
/// # Shapes
/// `uhat`, `u`: `[B, d]`; returns a scalar.
pub fn denoise_loss(uhat: &Tensor, u: &Tensor, weight: f64) -> Result<Tensor> {
    check_shape("denoise_loss: u", u, &[None, None], "[B, d]")?;
    // A negative weight would reward a worse denoiser.
    if !(weight.is_finite() && weight >= 0.0) {
        return Err(CoreError::BadArgument {
            name: "weight",
            value: weight,
            reason: "must be finite and >= 0",
        });
    }
    if uhat.dims() != u.dims() {
        return Err(CoreError::Shape {
            what: "denoise_loss: uhat",
            expected: format!("{:?} (the shape of u)", u.dims()),
            found: uhat.dims().to_vec(),
        });
    }
    Ok(((uhat - u)?.sqr()?.sum(1)?.mean(0)? * weight)?)
}

/// The three terms of block `t`'s loss `L_t` (eq. 61) and their sum.
#[derive(Debug, Clone)]
pub struct DtLoss {
    /// `-(1/B) sum log softmax(f_out(z_T))[y]`.
    pub cross_entropy: Tensor,
    /// `(1/B) sum KL(q(z_0|y) || N(0, I))`.
    pub kl: Tensor,
    /// The weighted denoising term.
    pub denoise: Tensor,
    /// The sum of the three, to back-propagate.
    pub total: Tensor,
}

/// Assembles block `t`'s loss `L_t` from its parts: the cross-entropy of the
/// head on `z_T ~ q(z_T|y)`, the KL term with `abar0 = sched.alpha_bar(0)?`,
/// and the denoising term with `weight = sched.dt_weight(t, eta)?` on the
/// block's prediction `uhat = uhat_t(z_{t-1}, x)` from
/// `z_{t-1} ~ q(z_{t-1}|y)`. The [guide](crate::guide) shows a whole step.
///
/// # Shapes
/// `head_logits`: `[B, m]` (`f_out(z_T)` with `z_T ~ q(z_T|y)`), `targets`: `[B]`,
/// `uhat`, `u`: `[B, d]`; every term is a batch mean.
pub fn dt_loss(
    head_logits: &Tensor,
    targets: &Tensor,
    uhat: &Tensor,
    u: &Tensor,
    abar0: f64,
    weight: f64,
) -> Result<DtLoss> {
    let cross_entropy = cross_entropy(head_logits, targets)?;
    let kl = kl_prior(u, abar0)?;
    let denoise = denoise_loss(uhat, u, weight)?;
    let total = ((&cross_entropy + &kl)? + &denoise)?;
    Ok(DtLoss {
        cross_entropy,
        kl,
        denoise,
        total,
    })
}

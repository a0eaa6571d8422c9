//! Class probabilities `p(y | z)` from the output head (spec section 7, eq. 14-16).
//!
//! The default reads them straight off the head, `softmax(f_out(z))`. The
//! radial alternative (the ablation of Figure 4) first maps the head's
//! probabilities to a point in embedding space, `ytilde = softmax(f_out(z)) W_embed`,
//! and scores each class by a Gaussian around its embedding.

use candle_core::{Tensor, D};

use crate::error::{check_shape, CoreError, Result};
use crate::loss::log_softmax;

/// How class probabilities are formed from the head's logits.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)
)]
pub enum ClassProbability {
    /// `p(y | z) = softmax(f_out(z))` (eq. 14), the paper's default.
    #[default]
    Softmax,
    /// `p(y | z) ∝ exp(-||ytilde - u_y||^2 / (2 sigma^2))` with
    /// `ytilde = softmax(f_out(z)) W_embed` (eq. 15-16).
    Radial {
        /// Width of the Gaussian; the paper does not give it, default 1.
        #[cfg_attr(feature = "serde", serde(default = "default_sigma"))]
        sigma: f64,
    },
}

#[cfg(feature = "serde")]
fn default_sigma() -> f64 {
    1.0
}

impl ClassProbability {
    /// Checks the parameters once (`sigma` finite and positive).
    pub fn validate(&self) -> Result<()> {
        match *self {
            ClassProbability::Softmax => Ok(()),
            ClassProbability::Radial { sigma } => check_sigma(sigma),
        }
    }

    /// `log p(y | z)` for every class from the head's logits `f_out(z)`.
    ///
    /// The result is normalised log-probabilities, so
    /// [`cross_entropy`](crate::cross_entropy) applied to it (which takes a
    /// log-softmax, a no-op on normalised log-probabilities) is the negative
    /// log-likelihood under either choice.
    ///
    /// # Shapes
    /// `head_logits`: `[B, m]`, `w_embed`: `[m, d]` (unused for softmax); returns `[B, m]`.
    pub fn log_probs(&self, head_logits: &Tensor, w_embed: &Tensor) -> Result<Tensor> {
        check_shape(
            "ClassProbability::log_probs: head_logits",
            head_logits,
            &[None, None],
            "[B, m]",
        )?;
        match *self {
            ClassProbability::Softmax => log_softmax(head_logits),
            ClassProbability::Radial { sigma } => {
                check_shape(
                    "ClassProbability::log_probs: w_embed",
                    w_embed,
                    &[Some(head_logits.dim(1)?), None],
                    "[m, d]",
                )?;
                // The same composition of ops as candle-nn's `softmax`, so a
                // trainer that used it gets the same bits from this function.
                let max = head_logits.max_keepdim(D::Minus1)?;
                let num = head_logits.broadcast_sub(&max)?.exp()?;
                let probs = num.broadcast_div(&num.sum_keepdim(D::Minus1)?)?;
                let ytilde = noprop_kernels::matmul(&probs, &w_embed.to_dtype(probs.dtype())?)?;
                radial_log_probs(&ytilde, w_embed, sigma)
            }
        }
    }
}

fn check_sigma(sigma: f64) -> Result<()> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(CoreError::BadArgument {
            name: "sigma",
            value: sigma,
            reason: "must be finite and > 0",
        });
    }
    Ok(())
}

/// The radial class log-probabilities of eq. 16:
/// `log p(y | z) = log_softmax_y(-||ytilde - u_y||^2 / (2 sigma^2))`.
///
/// The squared distance is expanded as `||ytilde||^2 - 2 ytilde . u_y + ||u_y||^2`
/// and the first term, equal for every class, dropped before the
/// normalisation; this avoids a `[B, m, d]` intermediate for large
/// (prototype) embeddings.
///
/// # Shapes
/// `ytilde`: `[B, d]`, `w_embed`: `[m, d]`; returns `[B, m]`.
pub fn radial_log_probs(ytilde: &Tensor, w_embed: &Tensor, sigma: f64) -> Result<Tensor> {
    check_shape("radial_log_probs: ytilde", ytilde, &[None, None], "[B, d]")?;
    check_shape(
        "radial_log_probs: w_embed",
        w_embed,
        &[None, Some(ytilde.dim(1)?)],
        "[m, d]",
    )?;
    check_sigma(sigma)?;
    let w = w_embed.to_dtype(ytilde.dtype())?;
    let cross = noprop_kernels::matmul(ytilde, &w.t()?)?; // [B, m]
    let norms = w.sqr()?.sum(1)?; // [m]
    let scale = 1.0 / (2.0 * sigma * sigma);
    // -(||u||^2 - 2 y.u) / (2 sigma^2)
    let logits = cross
        .affine(2.0, 0.0)?
        .broadcast_sub(&norms)?
        .affine(scale, 0.0)?;
    log_softmax(&logits)
}

//! Continuous-time noise schedules for NoProp-CT (spec sections 1, 2 and 8).
//!
//! Time runs in NoProp's direction on `t` in `[0, 1]`: `t = 0` is (nearly)
//! pure noise and `t = 1` (nearly) the clean label embedding. A schedule is
//! given by its log-inverse-SNR `gamma(t)`, *decreasing* in `t`:
//!
//! - `SNR(t) = exp(-gamma(t))`, increasing in `t`;
//! - `alpha_bar(t) = sigmoid(-gamma(t)) = SNR / (1 + SNR)`;
//! - `SNR'(t) = -gamma'(t) exp(-gamma(t)) >= 0`, the weight of the CT loss.
//!
//! Every schedule works two ways: on tensors of shape `[B]`, so that autograd
//! reaches a learnable schedule's parameters through the loss, and on host
//! `f64` values, which the samplers use to compute their coefficients.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{check_shape, CoreError, Result, ScheduleError};
use crate::rng::NoiseRng;

/// A continuous-time noise schedule `gamma(t)` on `t` in `[0, 1]`, decreasing in `t`.
///
/// Implementors give `gamma` and `gamma'` on tensors and on host values; the
/// other quantities follow. Implementations must keep `gamma'(t) <= 0`
/// *exactly* (not just up to rounding) so that `SNR'(t) >= 0` and the CT
/// loss never rewards a worse denoiser.
///
/// # Shapes
/// Every tensor method takes `t`: `[B]` and returns `[B]`.
pub trait ContinuousSchedule {
    /// `gamma(t)`, the log of the inverse signal-to-noise ratio.
    fn gamma(&self, t: &Tensor) -> Result<Tensor>;

    /// `gamma'(t) = d gamma / dt` (`<= 0`).
    fn gamma_derivative(&self, t: &Tensor) -> Result<Tensor>;

    /// `gamma(t)` for one host value.
    fn gamma_at(&self, t: f64) -> Result<f64>;

    /// `gamma'(t)` for one host value (`<= 0`).
    fn gamma_derivative_at(&self, t: f64) -> Result<f64>;

    /// `gamma` and `gamma'` at many host times at once. The default calls
    /// [`gamma_at`](Self::gamma_at) and
    /// [`gamma_derivative_at`](Self::gamma_derivative_at) per time;
    /// schedules whose parameters live on a device override it to copy them
    /// to the host only once.
    fn gamma_table(&self, ts: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        let mut g = Vec::with_capacity(ts.len());
        let mut dg = Vec::with_capacity(ts.len());
        for &t in ts {
            g.push(self.gamma_at(t)?);
            dg.push(self.gamma_derivative_at(t)?);
        }
        Ok((g, dg))
    }

    /// Every host quantity of the schedule at each of `ts`, from one
    /// [`gamma_table`](Self::gamma_table) call: a learnable schedule copies
    /// its parameters to the host once for the whole grid. Each value equals
    /// what the matching `*_at` method returns for the same `t`.
    fn points(&self, ts: &[f64]) -> Result<Vec<SchedulePoint>> {
        let (g, dg) = self.gamma_table(ts)?;
        Ok(ts
            .iter()
            .zip(g.into_iter().zip(dg))
            .map(|(&t, (gamma, gamma_derivative))| SchedulePoint::new(t, gamma, gamma_derivative))
            .collect())
    }

    /// `alpha_bar(t) = sigmoid(-gamma(t))`, computed as `exp(-softplus(gamma))`
    /// so that it stays accurate (and its gradient finite) at both ends.
    fn alpha_bar(&self, t: &Tensor) -> Result<Tensor> {
        let g = self.gamma(t)?;
        Ok(softplus(&g)?.neg()?.exp()?)
    }

    /// `1 - alpha_bar(t) = sigmoid(gamma(t))`, computed directly rather than by
    /// subtraction (which would round to 0 in `f32` near `t = 1`).
    fn one_minus_alpha_bar(&self, t: &Tensor) -> Result<Tensor> {
        let g = self.gamma(t)?;
        Ok(softplus(&g.neg()?)?.neg()?.exp()?)
    }

    /// `SNR(t) = exp(-gamma(t))`.
    fn snr(&self, t: &Tensor) -> Result<Tensor> {
        Ok(self.gamma(t)?.neg()?.exp()?)
    }

    /// `SNR'(t) = -gamma'(t) exp(-gamma(t))`, which is `>= 0`.
    fn snr_derivative(&self, t: &Tensor) -> Result<Tensor> {
        let dg = self.gamma_derivative(t)?;
        Ok((dg.neg()? * self.snr(t)?)?)
    }

    /// `alpha_bar(t)` for one host value.
    fn alpha_bar_at(&self, t: f64) -> Result<f64> {
        Ok(sigmoid_f64(-self.gamma_at(t)?))
    }

    /// `SNR(t)` for one host value.
    fn snr_at(&self, t: f64) -> Result<f64> {
        Ok((-self.gamma_at(t)?).exp())
    }

    /// `SNR'(t)` for one host value (`>= 0`).
    fn snr_derivative_at(&self, t: f64) -> Result<f64> {
        Ok(snr_derivative_f64(
            self.gamma_derivative_at(t)?,
            self.gamma_at(t)?,
        ))
    }
}

/// A schedule's host quantities at one time `t`, from
/// [`ContinuousSchedule::points`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulePoint {
    /// The time, in `[0, 1]` (`0` noisy, `1` clean).
    pub t: f64,
    /// `gamma(t)`.
    pub gamma: f64,
    /// `gamma'(t)` (`<= 0`).
    pub gamma_derivative: f64,
    /// `alpha_bar(t) = sigmoid(-gamma(t))`.
    pub alpha_bar: f64,
    /// `SNR(t) = exp(-gamma(t))`.
    pub snr: f64,
    /// `SNR'(t) = -gamma'(t) exp(-gamma(t))` (`>= 0`).
    pub snr_derivative: f64,
}

impl SchedulePoint {
    /// The quantities that follow from `gamma(t)` and `gamma'(t)`.
    pub fn new(t: f64, gamma: f64, gamma_derivative: f64) -> Self {
        Self {
            t,
            gamma,
            gamma_derivative,
            alpha_bar: sigmoid_f64(-gamma),
            snr: (-gamma).exp(),
            snr_derivative: snr_derivative_f64(gamma_derivative, gamma),
        }
    }
}

/// `SNR' = -gamma' exp(-gamma)`, the one place the host formula lives.
fn snr_derivative_f64(gamma_derivative: f64, gamma: f64) -> f64 {
    -gamma_derivative * (-gamma).exp()
}

/// A fixed schedule with `gamma` linear in `t`:
/// `gamma(t) = gamma1 (1 - t) + gamma0 t`, so `gamma(0) = gamma1` (noisy) and
/// `gamma(1) = gamma0` (clean), both exactly; `gamma'(t) = gamma0 - gamma1 < 0`.
///
/// This is the fixed continuous schedule of variational diffusion models
/// written in NoProp's time direction, and the initial shape of
/// [`LearnableSchedule`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedLinearGamma {
    gamma0: f64,
    gamma1: f64,
}

impl FixedLinearGamma {
    /// A schedule from `gamma(1) = gamma0` to `gamma(0) = gamma1`; needs
    /// finite values with `gamma0 < gamma1`.
    pub fn new(gamma0: f64, gamma1: f64) -> std::result::Result<Self, ScheduleError> {
        check_endpoints(gamma0, gamma1)?;
        Ok(Self { gamma0, gamma1 })
    }

    /// `gamma(1)`, the clean end.
    pub fn gamma0(&self) -> f64 {
        self.gamma0
    }

    /// `gamma(0)`, the noisy end.
    pub fn gamma1(&self) -> f64 {
        self.gamma1
    }
}

impl Default for FixedLinearGamma {
    /// `gamma0 = -7`, `gamma1 = 7`: `alpha_bar(0) ~ 9e-4`, `alpha_bar(1) ~ 0.9991`.
    fn default() -> Self {
        Self {
            gamma0: -7.0,
            gamma1: 7.0,
        }
    }
}

impl ContinuousSchedule for FixedLinearGamma {
    fn gamma(&self, t: &Tensor) -> Result<Tensor> {
        check_shape("FixedLinearGamma::gamma: t", t, &[None], "[B]")?;
        // Written as two products so both ends are exact: at t = 1 the first
        // term is 1 * (-gamma1) + gamma1 = 0.
        Ok((t.affine(-self.gamma1, self.gamma1)? + t.affine(self.gamma0, 0.0)?)?)
    }

    fn gamma_derivative(&self, t: &Tensor) -> Result<Tensor> {
        check_shape("FixedLinearGamma::gamma_derivative: t", t, &[None], "[B]")?;
        Ok((t.ones_like()? * (self.gamma0 - self.gamma1))?)
    }

    fn gamma_at(&self, t: f64) -> Result<f64> {
        Ok(self.gamma1 * (1.0 - t) + self.gamma0 * t)
    }

    fn gamma_derivative_at(&self, _t: f64) -> Result<f64> {
        Ok(self.gamma0 - self.gamma1)
    }
}

/// Options of [`LearnableSchedule`].
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields, default))]
pub struct LearnableScheduleConfig {
    /// Width of the hidden layer of `gtilde`.
    pub hidden: usize,
    /// Initial `gamma(1)` (the clean end).
    pub gamma0: f64,
    /// Initial `gamma(0)` (the noisy end).
    pub gamma1: f64,
}

impl Default for LearnableScheduleConfig {
    fn default() -> Self {
        Self {
            hidden: 64,
            gamma0: -7.0,
            gamma1: 7.0,
        }
    }
}

/// The learnable schedule of the paper's Appendix B (spec section 8).
///
/// `gtilde(t) = sum_j w2_j sigmoid(w1_j t + b1_j)` is a two-layer network
/// whose weights `w1 = softplus(w1_raw)` and `w2 = softplus(w2_raw)` are
/// positive, so `gtilde` increases in `t`. Normalising,
/// `gbar(t) = (gtilde(t) - gtilde(0)) / (gtilde(1) - gtilde(0))` runs from 0
/// to 1, and
///
/// `gamma(t) = gamma1 (1 - gbar(t)) + gamma0 gbar(t)`
///
/// (the spec's `gamma0 + (gamma1 - gamma0)(1 - gbar)`, written so that
/// `gamma(0) = gamma1` and `gamma(1) = gamma0` hold exactly in floating point).
///
/// The endpoints are trainable, but parametrised as `gamma0` and a raw gap
/// with `gamma1 = gamma0 + softplus(gamma_gap)`: training can move them
/// anywhere except past each other, which would reverse the schedule and
/// make `SNR'` negative. `gamma'(t)` is computed analytically,
/// `gamma'(t) = -softplus(gamma_gap) gtilde'(t) / (gtilde(1) - gtilde(0))`
/// with `gtilde'(t) = sum_j w2_j w1_j s_j (1 - s_j)`, a product of
/// non-negative factors, so `SNR'(t) >= 0` holds exactly; it is built from
/// tensor operations, so gradients reach the parameters through `SNR'` too.
///
/// The parameters are [`Var`]s named `schedule.b1`, `schedule.gamma0`,
/// `schedule.gamma_gap`, `schedule.w1` (raw, `[H]`), `schedule.w2` (raw,
/// `[H]`); `b1` is `[H]`, the endpoints `[1]`. A trainer that applies weight
/// decay should exempt `gamma_gap`, or decay will shrink the SNR range.
///
/// `t` should lie in `[0, 1]`; outside it `gbar` leaves `[0, 1]`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use noprop_core::{ContinuousSchedule, LearnableSchedule, NoiseRng};
///
/// let sched = LearnableSchedule::new(&Default::default(), DType::F32, &Device::Cpu, &mut NoiseRng::new(0))?;
/// let t = Tensor::new(&[0f32, 0.5, 1.0], &Device::Cpu)?;
/// let snr_prime = sched.snr_derivative(&t)?; // the CT loss weight, >= 0
/// assert!(snr_prime.to_vec1::<f32>()?.iter().all(|&w| w >= 0.0));
/// assert_eq!(sched.gamma_at(0.0)?, sched.gamma1()?); // t = 0 is the noisy end
/// assert_eq!(sched.vars().len(), 5); // hand these to the optimiser
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct LearnableSchedule {
    b1: Var,
    gamma0: Var,
    gamma_gap: Var,
    w1: Var,
    w2: Var,
    hidden: usize,
}

/// The parameters of a [`LearnableSchedule`] copied to the host in `f64`.
struct HostParams {
    w1: Vec<f64>,
    b1: Vec<f64>,
    w2: Vec<f64>,
    gamma0: f64,
    gap: f64,
}

impl HostParams {
    /// `s_j(t) = sigmoid(w1_j t + b1_j)`.
    fn hidden(&self, t: f64) -> impl Iterator<Item = f64> + '_ {
        self.w1
            .iter()
            .zip(&self.b1)
            .map(move |(w, b)| sigmoid_f64(w * t + b))
    }

    /// `gtilde(t) - gtilde(0)`, summed term by term so that every term is
    /// non-negative and the value at `t = 1` is bit-for-bit the denominator.
    fn numerator(&self, t: f64) -> f64 {
        self.hidden(t)
            .zip(self.hidden(0.0))
            .zip(&self.w2)
            .map(|((s, s0), w2)| w2 * (s - s0))
            .sum()
    }

    fn gamma1(&self) -> f64 {
        self.gamma0 + self.gap
    }

    fn gamma(&self, t: f64, den: f64) -> f64 {
        let gbar = self.numerator(t) / den;
        self.gamma1() * (1.0 - gbar) + self.gamma0 * gbar
    }

    fn gamma_derivative(&self, t: f64, den: f64) -> f64 {
        let dg: f64 = self
            .hidden(t)
            .zip(self.w1.iter().zip(&self.w2))
            .map(|(s, (w1, w2))| w2 * w1 * (s * (1.0 - s)))
            .sum();
        -(self.gap * dg / den)
    }
}

impl LearnableSchedule {
    /// Names of the parameters, sorted; also the order in which they are drawn.
    pub const PARAMETER_NAMES: [&'static str; 5] = [
        "schedule.b1",
        "schedule.gamma0",
        "schedule.gamma_gap",
        "schedule.w1",
        "schedule.w2",
    ];

    /// The parameters that shape `gamma` between its endpoints and not the
    /// endpoints themselves (`gamma(0)` and `gamma(1)` depend on
    /// `schedule.gamma0` and `schedule.gamma_gap` alone, exactly): the
    /// "interior" that variance minimisation (Kingma et al. 2021) trains.
    pub const INTERIOR_PARAMETER_NAMES: [&'static str; 3] =
        ["schedule.b1", "schedule.w1", "schedule.w2"];

    /// A schedule with parameters drawn from `rng`: `b1`, `w1_raw`, `w2_raw`
    /// (in that order) from `N(0, 1)`, which makes the initial `gamma` close to
    /// linear between the configured endpoints; `gamma0 = cfg.gamma0` and
    /// `gamma_gap = softplus^-1(cfg.gamma1 - cfg.gamma0)`.
    pub fn new(
        cfg: &LearnableScheduleConfig,
        dtype: DType,
        device: &Device,
        rng: &mut NoiseRng,
    ) -> Result<Self> {
        if cfg.hidden == 0 {
            return Err(ScheduleError::BadParameter {
                name: "hidden",
                value: 0.0,
                reason: "the hidden layer needs at least one unit",
            }
            .into());
        }
        check_endpoints(cfg.gamma0, cfg.gamma1)?;
        let h = cfg.hidden;
        let b1 = Var::from_tensor(&rng.randn(&[h], dtype, device)?)?;
        let w1 = Var::from_tensor(&rng.randn(&[h], dtype, device)?)?;
        let w2 = Var::from_tensor(&rng.randn(&[h], dtype, device)?)?;
        let gamma0 = Var::from_tensor(&Tensor::new(&[cfg.gamma0], device)?.to_dtype(dtype)?)?;
        let gap = inverse_softplus(cfg.gamma1 - cfg.gamma0);
        let gamma_gap = Var::from_tensor(&Tensor::new(&[gap], device)?.to_dtype(dtype)?)?;
        Ok(Self {
            b1,
            gamma0,
            gamma_gap,
            w1,
            w2,
            hidden: h,
        })
    }

    /// The hidden width `H`.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The parameters' dtype (also the dtype of every tensor this returns).
    pub fn dtype(&self) -> DType {
        self.w1.dtype()
    }

    /// The trainable parameters with their stable names, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        Self::PARAMETER_NAMES
            .iter()
            .zip([&self.b1, &self.gamma0, &self.gamma_gap, &self.w1, &self.w2])
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect()
    }

    /// Overwrites every parameter from `tensors` (for example a checkpoint),
    /// converting dtype and device. All five names must be present with the
    /// right shapes; nothing is changed unless all are. Extra names are ignored.
    pub fn load(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut staged = Vec::with_capacity(5);
        for (name, var) in self.vars() {
            let src = tensors
                .get(&name)
                .ok_or_else(|| CoreError::MissingParameter { name: name.clone() })?;
            if src.dims() != var.dims() {
                return Err(CoreError::ParameterShape {
                    name,
                    expected: var.dims().to_vec(),
                    found: src.dims().to_vec(),
                });
            }
            let src = src.to_dtype(var.dtype())?.to_device(var.device())?;
            staged.push((var, src));
        }
        for (var, src) in staged {
            var.set(&src)?;
        }
        Ok(())
    }

    /// The endpoints `(gamma0, gamma1) = (gamma(1), gamma(0))` as `[1]` tensors
    /// connected to the parameters.
    pub fn gamma_endpoints(&self) -> Result<(Tensor, Tensor)> {
        let g0 = self.gamma0.as_tensor().clone();
        let g1 = (&g0 + softplus(self.gamma_gap.as_tensor())?)?;
        Ok((g0, g1))
    }

    /// `gamma(1)` on the host.
    pub fn gamma0(&self) -> Result<f64> {
        Ok(self.host()?.gamma0)
    }

    /// `gamma(0)` on the host.
    pub fn gamma1(&self) -> Result<f64> {
        Ok(self.host()?.gamma1())
    }

    fn host(&self) -> Result<HostParams> {
        let v = |x: &Var| -> Result<Vec<f64>> {
            Ok(x.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?)
        };
        let gap_raw = v(&self.gamma_gap)?[0];
        Ok(HostParams {
            w1: v(&self.w1)?.into_iter().map(softplus_f64).collect(),
            b1: v(&self.b1)?,
            w2: v(&self.w2)?.into_iter().map(softplus_f64).collect(),
            gamma0: v(&self.gamma0)?[0],
            gap: softplus_f64(gap_raw),
        })
    }

    /// The shared forward pass on tensors: for `t` `[B]`, the hidden
    /// activations `s` `[B, H]`, `gtilde(t) - gtilde(0)` `[B]` and the
    /// denominator `gtilde(1) - gtilde(0)` `[1]`, plus the positive weights.
    fn forward(&self, what: &'static str, t: &Tensor) -> Result<Forward> {
        check_shape(what, t, &[None], "[B]")?;
        let b = t.dim(0)?;
        let dtype = self.dtype();
        // The two endpoints go through the very same operations as the batch,
        // so gbar is exactly 0 at t = 0 and exactly 1 at t = 1.
        let ends = Tensor::new(&[0f64, 1.0], t.device())?.to_dtype(dtype)?;
        let t_ext = Tensor::cat(&[&t.to_dtype(dtype)?, &ends], 0)?;
        let w1 = softplus(self.w1.as_tensor())?;
        let w2 = softplus(self.w2.as_tensor())?;
        let pre = t_ext
            .unsqueeze(1)?
            .broadcast_mul(&w1)?
            .broadcast_add(self.b1.as_tensor())?;
        let s = sigmoid(&pre)?; // [B + 2, H]
        let s0 = s.narrow(0, b, 1)?;
        let num = s.broadcast_sub(&s0)?.broadcast_mul(&w2)?.sum(1)?; // [B + 2]
        Ok(Forward {
            s: s.narrow(0, 0, b)?,
            num: num.narrow(0, 0, b)?,
            den: num.narrow(0, b + 1, 1)?,
            w1,
            w2,
        })
    }
}

struct Forward {
    s: Tensor,
    num: Tensor,
    den: Tensor,
    w1: Tensor,
    w2: Tensor,
}

impl ContinuousSchedule for LearnableSchedule {
    fn gamma(&self, t: &Tensor) -> Result<Tensor> {
        let f = self.forward("LearnableSchedule::gamma: t", t)?;
        let gbar = f.num.broadcast_div(&f.den)?;
        let (g0, g1) = self.gamma_endpoints()?;
        let gamma = (gbar.affine(-1.0, 1.0)?.broadcast_mul(&g1)? + gbar.broadcast_mul(&g0)?)?;
        Ok(gamma.to_dtype(t.dtype())?)
    }

    fn gamma_derivative(&self, t: &Tensor) -> Result<Tensor> {
        let f = self.forward("LearnableSchedule::gamma_derivative: t", t)?;
        let ds = (&f.s * f.s.affine(-1.0, 1.0)?)?; // s (1 - s) >= 0
        let dgtilde = ds.broadcast_mul(&(&f.w1 * &f.w2)?)?.sum(1)?;
        let gap = softplus(self.gamma_gap.as_tensor())?;
        let dg = dgtilde.broadcast_mul(&gap)?.broadcast_div(&f.den)?.neg()?;
        Ok(dg.to_dtype(t.dtype())?)
    }

    fn gamma_at(&self, t: f64) -> Result<f64> {
        let p = self.host()?;
        Ok(p.gamma(t, p.numerator(1.0)))
    }

    fn gamma_derivative_at(&self, t: f64) -> Result<f64> {
        let p = self.host()?;
        Ok(p.gamma_derivative(t, p.numerator(1.0)))
    }

    fn gamma_table(&self, ts: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        let p = self.host()?;
        let den = p.numerator(1.0);
        Ok((
            ts.iter().map(|&t| p.gamma(t, den)).collect(),
            ts.iter().map(|&t| p.gamma_derivative(t, den)).collect(),
        ))
    }
}

fn check_endpoints(gamma0: f64, gamma1: f64) -> std::result::Result<(), ScheduleError> {
    for (name, value) in [("gamma0", gamma0), ("gamma1", gamma1)] {
        if !value.is_finite() {
            return Err(ScheduleError::BadParameter {
                name,
                value,
                reason: "must be finite",
            });
        }
    }
    if gamma0 >= gamma1 {
        return Err(ScheduleError::BadParameter {
            name: "gamma0",
            value: gamma0,
            reason:
                "must be below gamma1 (gamma decreases from gamma1 at t = 0 to gamma0 at t = 1)",
        });
    }
    Ok(())
}

/// `softplus(x) = log(1 + exp(x))`, as `relu(x) + log(1 + exp(-|x|))` so that
/// it neither overflows nor loses its gradient for large `|x|`.
pub(crate) fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    x.relu()? + tail
}

/// `sigmoid(x) = (1 + tanh(x / 2)) / 2`, which is stable for every `x` and has
/// a finite gradient everywhere (unlike `1 / (1 + exp(-x))`).
pub(crate) fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    x.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)
}

/// Host `sigmoid`, in the same form as the tensor one.
pub(crate) fn sigmoid_f64(x: f64) -> f64 {
    0.5 * (1.0 + (0.5 * x).tanh())
}

fn softplus_f64(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// The inverse of softplus for `y > 0`: `log(exp(y) - 1) = y + log(1 - exp(-y))`.
fn inverse_softplus(y: f64) -> f64 {
    y + (-(-y).exp_m1()).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_helpers_agree() {
        for x in [-30.0, -3.0, -0.5, 0.0, 0.5, 3.0, 30.0] {
            let want = (1.0f64 + f64::exp(x)).ln();
            assert!(
                (softplus_f64(x) - want).abs() < 1e-12 * (1.0 + want),
                "x={x}"
            );
            let t = Tensor::new(&[x], &Device::Cpu).unwrap();
            let got = softplus(&t).unwrap().to_vec1::<f64>().unwrap()[0];
            assert!((got - want).abs() < 1e-12 * (1.0 + want), "x={x}");
            let s = sigmoid(&t).unwrap().to_vec1::<f64>().unwrap()[0];
            assert!((s - 1.0 / (1.0 + (-x).exp())).abs() < 1e-15, "x={x}");
        }
        for y in [1e-3, 0.7, 14.0, 40.0] {
            assert!((softplus_f64(inverse_softplus(y)) - y).abs() < 1e-12 * y);
        }
    }
}

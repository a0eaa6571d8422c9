//! Discrete-time noise schedules and the eq. 3 coefficients (spec sections 1-3).
//!
//! Time runs in NoProp's direction: `z_0` is pure noise and `z_T` is (nearly)
//! the clean label embedding, so `alpha_bar` *increases* with `t`. All tables
//! are computed once, in f64, on the host.

use crate::error::{CoreError, Result, ScheduleError};

/// How to build the alpha-bar table of a discrete schedule.
///
/// This is the configuration-level description; [`ScheduleSpec::build`]
/// turns it into a validated [`DiscreteSchedule`] for a given `T`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)
)]
pub enum ScheduleSpec {
    /// The cosine schedule of Nichol and Dhariwal run in NoProp's time
    /// direction (spec section 3), clipped to `abar_max`.
    Cosine {
        /// Offset `s` of the cosine (0.008 in Nichol and Dhariwal).
        #[cfg_attr(feature = "serde", serde(default = "default_s"))]
        s: f64,
        /// Upper clip of alpha-bar; `abar_T` would otherwise be exactly 1.
        #[cfg_attr(feature = "serde", serde(default = "default_abar_max"))]
        abar_max: f64,
    },
    /// Alpha-bar linear in `t`, from `abar_min` at `t = 0` to `abar_max` at `t = T`.
    Linear {
        /// Alpha-bar at `t = 0`.
        abar_min: f64,
        /// Alpha-bar at `t = T`.
        abar_max: f64,
    },
    /// An explicit table `abar_0, ..., abar_T` (length must be `T + 1`).
    Explicit {
        /// The alpha-bar values.
        alpha_bar: Vec<f64>,
    },
}

#[cfg(feature = "serde")]
fn default_s() -> f64 {
    0.008
}
#[cfg(feature = "serde")]
fn default_abar_max() -> f64 {
    1.0 - 1e-4
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        ScheduleSpec::Cosine {
            s: 0.008,
            abar_max: 1.0 - 1e-4,
        }
    }
}

impl ScheduleSpec {
    /// Builds and validates the schedule for `t_max = T` blocks.
    pub fn build(&self, t_max: usize) -> std::result::Result<DiscreteSchedule, ScheduleError> {
        match self {
            ScheduleSpec::Cosine { s, abar_max } => DiscreteSchedule::cosine(t_max, *s, *abar_max),
            ScheduleSpec::Linear { abar_min, abar_max } => {
                DiscreteSchedule::linear(t_max, *abar_min, *abar_max)
            }
            ScheduleSpec::Explicit { alpha_bar } => {
                if alpha_bar.len() != t_max + 1 {
                    return Err(ScheduleError::BadParameter {
                        name: "alpha_bar",
                        value: alpha_bar.len() as f64,
                        reason: "an explicit table needs exactly T + 1 values",
                    });
                }
                DiscreteSchedule::from_alpha_bar(alpha_bar.clone())
            }
        }
    }
}

/// The coefficients of the eq. 3 update for one block `t`:
/// `z_t = a * uhat + b * z_{t-1} + sqrt(c) * eps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eq3Coefficients {
    /// Weight of the block's prediction `uhat_t`.
    pub a: f64,
    /// Weight of the previous latent `z_{t-1}`.
    pub b: f64,
    /// Variance of the added noise.
    pub c: f64,
}

/// The eq. 3 coefficients of one step from a time `s` to a later time `t`,
/// given `abar_s = alpha_bar(s)` and `abar_t = alpha_bar(t)`.
///
/// With `alpha = abar_s / abar_t` (the fraction of signal the step adds):
/// `a = sqrt(abar_t) (1 - alpha) / (1 - abar_s)`,
/// `b = sqrt(alpha) (1 - abar_t) / (1 - abar_s)`,
/// `c = (1 - abar_t) (1 - alpha) / (1 - abar_s)`.
/// The discrete schedule uses it for consecutive blocks and the continuous-time
/// sampler for consecutive grid points, so both share this one formula.
///
/// The values must satisfy `0 <= abar_s <= abar_t < 1`; anything else
/// (including NaN) is a [`CoreError::BadArgument`], because the formulas
/// would otherwise return NaN or negative variances without complaint. Then
/// `a, b, c >= 0`, and the step keeps q's marginals: if `z_s ~ q(z_s|y)` and
/// the prediction is `u_y`, then `z_t ~ q(z_t|y)`. Equal values give the
/// identity step (`a = c = 0`, `b = 1`), also when both are 0.
///
/// ```
/// let k = noprop_core::coefficients_between(0.25, 0.5)?;
/// // The mean of q is kept: a + b sqrt(abar_s) = sqrt(abar_t).
/// assert!((k.a + k.b * 0.25f64.sqrt() - 0.5f64.sqrt()).abs() < 1e-15);
/// assert!(noprop_core::coefficients_between(0.5, 0.25).is_err());
/// # Ok::<(), noprop_core::CoreError>(())
/// ```
pub fn coefficients_between(abar_s: f64, abar_t: f64) -> Result<Eq3Coefficients> {
    if !(0.0..1.0).contains(&abar_t) {
        return Err(CoreError::BadArgument {
            name: "abar_t",
            value: abar_t,
            reason: "must lie in [0, 1)",
        });
    }
    if !(0.0..=abar_t).contains(&abar_s) {
        return Err(CoreError::BadArgument {
            name: "abar_s",
            value: abar_s,
            reason: "must lie in [0, abar_t]: alpha-bar cannot decrease along a step",
        });
    }
    if abar_s == abar_t {
        // Written out so that abar_s = abar_t = 0 gives the identity step
        // rather than 0 / 0.
        return Ok(Eq3Coefficients {
            a: 0.0,
            b: 1.0,
            c: 0.0,
        });
    }
    let alpha = abar_s / abar_t;
    let den = 1.0 - abar_s;
    Ok(Eq3Coefficients {
        a: abar_t.sqrt() * (1.0 - alpha) / den,
        b: alpha.sqrt() * (1.0 - abar_t) / den,
        c: (1.0 - abar_t) * (1.0 - alpha) / den,
    })
}

impl Eq3Coefficients {
    /// Same as [`coefficients_between`].
    pub fn between(abar_s: f64, abar_t: f64) -> Result<Self> {
        coefficients_between(abar_s, abar_t)
    }
}

/// A validated discrete schedule `abar_0 < abar_1 < ... < abar_T`, all in `[0, 1)`,
/// with every derived table precomputed in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscreteSchedule {
    abar: Vec<f64>,
    snr: Vec<f64>,
    coeffs: Vec<Eq3Coefficients>,
}

impl DiscreteSchedule {
    /// Validates an explicit alpha-bar table (`T + 1` values for `t = 0..=T`).
    pub fn from_alpha_bar(abar: Vec<f64>) -> std::result::Result<Self, ScheduleError> {
        if abar.len() < 2 {
            return Err(ScheduleError::TooShort { len: abar.len() });
        }
        for (index, &value) in abar.iter().enumerate() {
            if !value.is_finite() {
                return Err(ScheduleError::NotFinite { index, value });
            }
            if !(0.0..1.0).contains(&value) {
                return Err(ScheduleError::OutOfRange { index, value });
            }
            if index > 0 && value <= abar[index - 1] {
                return Err(ScheduleError::NotIncreasing {
                    index,
                    prev: abar[index - 1],
                    value,
                });
            }
        }
        let snr = abar.iter().map(|&a| a / (1.0 - a)).collect();
        let mut coeffs = Vec::with_capacity(abar.len());
        // Index 0 has no update; it is never read (`coefficients` rejects
        // t = 0) but keeps `coeffs[t]` aligned with t.
        coeffs.push(Eq3Coefficients {
            a: f64::NAN,
            b: f64::NAN,
            c: f64::NAN,
        });
        for t in 1..abar.len() {
            // The table was validated just above (strictly increasing, in
            // [0, 1)), which is exactly what `coefficients_between` requires,
            // so its error is unreachable; it is still mapped rather than
            // unwrapped.
            let k = coefficients_between(abar[t - 1], abar[t]).map_err(|_| {
                ScheduleError::NotIncreasing {
                    index: t,
                    prev: abar[t - 1],
                    value: abar[t],
                }
            })?;
            coeffs.push(k);
        }
        Ok(Self { abar, snr, coeffs })
    }

    /// The cosine schedule of spec section 3:
    /// `f(tau) = cos^2((pi/2) (tau/T + s) / (1 + s))`, `abar_t = f(T - t) / f(0)`,
    /// clipped to `[0, abar_max]`.
    pub fn cosine(t_max: usize, s: f64, abar_max: f64) -> std::result::Result<Self, ScheduleError> {
        if t_max == 0 {
            return Err(ScheduleError::TooShort { len: 1 });
        }
        if !(s.is_finite() && s >= 0.0) {
            return Err(ScheduleError::BadParameter {
                name: "s",
                value: s,
                reason: "must be finite and >= 0",
            });
        }
        if !(abar_max > 0.0 && abar_max < 1.0) {
            return Err(ScheduleError::BadParameter {
                name: "abar_max",
                value: abar_max,
                reason: "must lie in (0, 1)",
            });
        }
        let tt = t_max as f64;
        let f = |tau: f64| {
            let v = (std::f64::consts::FRAC_PI_2 * (tau / tt + s) / (1.0 + s)).cos();
            v * v
        };
        let f0 = f(0.0);
        let abar = (0..=t_max)
            .map(|t| (f((t_max - t) as f64) / f0).clamp(0.0, abar_max))
            .collect();
        Self::from_alpha_bar(abar)
    }

    /// Alpha-bar linear in t: `abar_t = abar_min + (abar_max - abar_min) t / T`.
    pub fn linear(
        t_max: usize,
        abar_min: f64,
        abar_max: f64,
    ) -> std::result::Result<Self, ScheduleError> {
        if t_max == 0 {
            return Err(ScheduleError::TooShort { len: 1 });
        }
        let tt = t_max as f64;
        let abar = (0..=t_max)
            .map(|t| abar_min + (abar_max - abar_min) * (t as f64) / tt)
            .collect();
        Self::from_alpha_bar(abar)
    }

    /// The number of blocks `T`.
    pub fn blocks(&self) -> usize {
        self.abar.len() - 1
    }

    /// The whole alpha-bar table `abar_0..=abar_T` (always at least two values).
    pub fn alpha_bars(&self) -> &[f64] {
        &self.abar
    }

    /// `abar_t` for the time index `t` in `0..=T`; anything else is
    /// [`CoreError::TimeOutOfRange`].
    ///
    /// Block `t` (in `1..=T`) is trained on `z_{t-1} ~ q(z_{t-1}|y)`, so it
    /// needs `alpha_bar(t - 1)`; the KL term needs `alpha_bar(0)` and the
    /// cross-entropy term `alpha_bar(T)`.
    pub fn alpha_bar(&self, t: usize) -> Result<f64> {
        self.abar.get(t).copied().ok_or(CoreError::TimeOutOfRange {
            t,
            blocks: self.blocks(),
        })
    }

    /// `alpha_t = abar_t / abar_{t+1}` for `t` in `0..T` (so `alpha_{t-1}` is the
    /// signal fraction that step `t` adds); anything else is
    /// [`CoreError::AlphaOutOfRange`].
    pub fn alpha(&self, t: usize) -> Result<f64> {
        match (
            self.abar.get(t),
            t.checked_add(1).and_then(|n| self.abar.get(n)),
        ) {
            (Some(a), Some(next)) => Ok(a / next),
            _ => Err(CoreError::AlphaOutOfRange {
                t,
                blocks: self.blocks(),
            }),
        }
    }

    /// `SNR(t) = abar_t / (1 - abar_t)` for `t` in `0..=T`; anything else is
    /// [`CoreError::TimeOutOfRange`].
    pub fn snr(&self, t: usize) -> Result<f64> {
        self.snr.get(t).copied().ok_or(CoreError::TimeOutOfRange {
            t,
            blocks: self.blocks(),
        })
    }

    /// The eq. 3 coefficients of block `t` in `1..=T`; anything else is
    /// [`CoreError::BlockOutOfRange`].
    pub fn coefficients(&self, t: usize) -> Result<Eq3Coefficients> {
        self.check_block(t)?;
        Ok(self.coeffs[t])
    }

    /// The weight of block `t`'s denoising term in eq. 61,
    /// `T * eta / 2 * (SNR(t) - SNR(t-1))`, for `t` in `1..=T` (anything else
    /// is [`CoreError::BlockOutOfRange`]). It is positive because SNR
    /// increases with `t`; `eta` is the paper's hyperparameter (0.1 for DT).
    pub fn dt_weight(&self, t: usize, eta: f64) -> Result<f64> {
        self.check_block(t)?;
        Ok(self.blocks() as f64 * eta / 2.0 * (self.snr[t] - self.snr[t - 1]))
    }

    /// Checks that `t` is a block index, `1..=T`.
    pub fn check_block(&self, t: usize) -> Result<()> {
        if t == 0 || t > self.blocks() {
            return Err(CoreError::BlockOutOfRange {
                t,
                blocks: self.blocks(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_matches_closed_form() {
        // Independent evaluation of the spec's formula for T = 10.
        let s = 0.008;
        let f = |tau: f64| {
            ((std::f64::consts::PI / 2.0) * (tau / 10.0 + s) / (1.0 + s))
                .cos()
                .powi(2)
        };
        let sched = DiscreteSchedule::cosine(10, s, 1.0 - 1e-4).unwrap();
        for t in 0..10 {
            let want = f((10 - t) as f64) / f(0.0);
            assert!((sched.alpha_bar(t).unwrap() - want).abs() < 1e-15, "t={t}");
        }
        // abar_T = f(0)/f(0) = 1 is clipped.
        assert_eq!(sched.alpha_bar(10).unwrap(), 1.0 - 1e-4);
        // abar_0 = cos^2(pi/2) / f(0) is zero up to rounding.
        assert!(sched.alpha_bar(0).unwrap() < 1e-30);
        // A value worked out by hand: abar_5 = cos^2(pi/2 * 0.508/1.008) / cos^2(pi/2 * 0.008/1.008).
        let a5 = (std::f64::consts::FRAC_PI_2 * 0.508 / 1.008).cos().powi(2)
            / (std::f64::consts::FRAC_PI_2 * 0.008 / 1.008).cos().powi(2);
        assert!((sched.alpha_bar(5).unwrap() - a5).abs() < 1e-15);
        assert!((a5 - 0.493_843_590_440_6).abs() < 1e-12);
    }

    #[test]
    fn coefficients_closed_form() {
        let sched = DiscreteSchedule::from_alpha_bar(vec![0.0, 0.25, 0.5, 0.9]).unwrap();
        // t = 2: abar_1 = 0.25, abar_2 = 0.5, alpha_1 = 0.5.
        let c = sched.coefficients(2).unwrap();
        assert!((c.a - 0.5f64.sqrt() * 0.5 / 0.75).abs() < 1e-15);
        assert!((c.b - 0.5f64.sqrt() * 0.5 / 0.75).abs() < 1e-15);
        assert!((c.c - 0.5 * 0.5 / 0.75).abs() < 1e-15);
        // t = 1 from abar_0 = 0: the update ignores z_0 and is q(z_1|y) itself.
        let c = sched.coefficients(1).unwrap();
        assert!((c.a - 0.25f64.sqrt()).abs() < 1e-15);
        assert_eq!(c.b, 0.0);
        assert!((c.c - 0.75).abs() < 1e-15);
        assert!((sched.snr(3).unwrap() - 9.0).abs() < 1e-12);
        assert!((sched.dt_weight(3, 0.1).unwrap() - 3.0 * 0.1 / 2.0 * (9.0 - 1.0)).abs() < 1e-12);
        assert!((sched.alpha(1).unwrap() - 0.5).abs() < 1e-15);
    }

    #[test]
    fn validation_errors() {
        use ScheduleError::*;
        assert!(matches!(
            DiscreteSchedule::from_alpha_bar(vec![0.5]),
            Err(TooShort { len: 1 })
        ));
        assert!(matches!(
            DiscreteSchedule::from_alpha_bar(vec![0.1, 0.1]),
            Err(NotIncreasing { index: 1, .. })
        ));
        assert!(matches!(
            DiscreteSchedule::from_alpha_bar(vec![0.1, 1.0]),
            Err(OutOfRange { index: 1, .. })
        ));
        assert!(matches!(
            DiscreteSchedule::from_alpha_bar(vec![-0.1, 0.5]),
            Err(OutOfRange { index: 0, .. })
        ));
        assert!(matches!(
            DiscreteSchedule::from_alpha_bar(vec![0.1, f64::NAN]),
            Err(NotFinite { index: 1, .. })
        ));
        assert!(matches!(
            DiscreteSchedule::cosine(0, 0.008, 0.9999),
            Err(TooShort { .. })
        ));
        assert!(matches!(
            DiscreteSchedule::cosine(10, 0.008, 1.0),
            Err(BadParameter {
                name: "abar_max",
                ..
            })
        ));
        let spec = ScheduleSpec::Explicit {
            alpha_bar: vec![0.1, 0.2],
        };
        assert!(spec.build(2).is_err());
        assert!(spec.build(1).is_ok());
    }

    #[test]
    fn linear_schedule_values() {
        let s = DiscreteSchedule::linear(4, 0.0, 0.8).unwrap();
        for (t, want) in [0.0, 0.2, 0.4, 0.6, 0.8].iter().enumerate() {
            assert!((s.alpha_bar(t).unwrap() - want).abs() < 1e-15);
        }
    }
}

//! The error type of `noprop-core`.

/// Everything that can go wrong in `noprop-core`.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A noise schedule failed validation.
    #[error("invalid noise schedule: {0}")]
    Schedule(#[from] ScheduleError),
    /// A tensor argument had the wrong shape.
    #[error("{what}: expected shape {expected}, got {found:?}")]
    Shape {
        /// Which argument was wrong.
        what: &'static str,
        /// What was expected, in words (for example `[B, d]`).
        expected: String,
        /// The shape that was passed.
        found: Vec<usize>,
    },
    /// A block index outside `1..=T` (blocks are numbered from 1; block `t`
    /// maps `z_{t-1}` to `z_t`).
    #[error("block index {t} is outside 1..={blocks}")]
    BlockOutOfRange {
        /// The index that was passed.
        t: usize,
        /// The number of blocks `T`.
        blocks: usize,
    },
    /// A time index outside `0..=T` (the latents `z_0, ..., z_T` and their
    /// alpha-bar and SNR values are numbered from 0).
    #[error("time index {t} is outside 0..={blocks}")]
    TimeOutOfRange {
        /// The index that was passed.
        t: usize,
        /// The number of blocks `T`.
        blocks: usize,
    },
    /// An index of `alpha_t = abar_t / abar_{t+1}` outside `0..T`; `alpha_T`
    /// would need `abar_{T+1}`, which does not exist.
    #[error("alpha_{t} is undefined: alpha_t = abar_t / abar_(t+1) needs t in 0..{blocks}")]
    AlphaOutOfRange {
        /// The index that was passed.
        t: usize,
        /// The number of blocks `T`.
        blocks: usize,
    },
    /// A [`Denoiser`](crate::Denoiser) whose number of blocks differs from the
    /// schedule's, found before any block runs.
    #[error("the denoiser has {denoiser} block(s) but the schedule has {schedule}; build both with the same T")]
    BlockCountMismatch {
        /// `Denoiser::blocks()`.
        denoiser: usize,
        /// `DiscreteSchedule::blocks()`.
        schedule: usize,
    },
    /// A tensor that must hold floating-point values has an integer dtype,
    /// for example `u8` images passed to a sampler, which draws its latents
    /// in the input's dtype (integer noise would silently round to 0).
    #[error("{what} has dtype {dtype:?}, but a floating-point dtype is needed; convert it first (e.g. `x.to_dtype(DType::F32)`)")]
    NotFloat {
        /// Which argument was wrong.
        what: &'static str,
        /// The dtype that was passed.
        dtype: candle_core::DType,
    },
    /// A scalar argument outside its domain (for example a non-positive sigma).
    #[error("argument {name} = {value} is invalid: {reason}")]
    BadArgument {
        /// The argument's name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What it must satisfy.
        reason: &'static str,
    },
    /// A parameter that [`LearnableSchedule::load`](crate::LearnableSchedule::load) needs is absent.
    #[error("parameter {name} is missing")]
    MissingParameter {
        /// The parameter's name.
        name: String,
    },
    /// A loaded parameter has the wrong shape.
    #[error("parameter {name}: expected shape {expected:?}, got {found:?}")]
    ParameterShape {
        /// The parameter's name.
        name: String,
        /// The shape it must have.
        expected: Vec<usize>,
        /// The shape that was given.
        found: Vec<usize>,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Why a list of alpha-bar values is not a usable schedule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// `T` must be at least 1, so the table needs at least two entries.
    #[error("a schedule needs T >= 1 (T + 1 alpha-bar values), got {len} value(s)")]
    TooShort {
        /// Number of alpha-bar values given.
        len: usize,
    },
    /// An alpha-bar value is NaN or infinite.
    #[error("alpha_bar[{index}] = {value} is not finite")]
    NotFinite {
        /// Position in the table.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// An alpha-bar value is outside `[0, 1)`; at 1 the SNR is infinite.
    #[error("alpha_bar[{index}] = {value} is outside [0, 1)")]
    OutOfRange {
        /// Position in the table.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// Alpha-bar must increase strictly with t (noise decreases with t).
    #[error("alpha_bar must increase strictly with t, but alpha_bar[{index}] = {value} <= alpha_bar[{}] = {prev}", index - 1)]
    NotIncreasing {
        /// Position of the value that failed to increase.
        index: usize,
        /// The previous value.
        prev: f64,
        /// The offending value.
        value: f64,
    },
    /// A schedule parameter is out of its domain.
    #[error("schedule parameter {name} = {value} is invalid: {reason}")]
    BadParameter {
        /// The parameter's name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What it must satisfy.
        reason: &'static str,
    },
}

/// Shorthand for results in this crate.
pub type Result<T> = std::result::Result<T, CoreError>;

/// Lets `?` turn a [`CoreError`] into a [`candle_core::Error`], so that a
/// user's [`Denoiser::denoise`](crate::Denoiser::denoise) (which returns
/// `candle_core::Result`) can call this crate's functions directly.
///
/// An error that came from candle in the first place is handed back
/// unchanged; any other is wrapped with [`candle_core::Error::wrap`], which
/// keeps its message. candle's `Wrapped` variant holds only a `Display`, so
/// the structured variant cannot be recovered from the wrapped error; match
/// on the `CoreError` before converting when the variant matters.
impl From<CoreError> for candle_core::Error {
    fn from(err: CoreError) -> Self {
        match err {
            CoreError::Candle(inner) => inner,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Lets `?` turn a [`ScheduleError`] into a [`candle_core::Error`] (see the
/// conversion from [`CoreError`]).
impl From<ScheduleError> for candle_core::Error {
    fn from(err: ScheduleError) -> Self {
        candle_core::Error::wrap(CoreError::Schedule(err))
    }
}

/// Checks that `t` holds floating-point values.
pub(crate) fn check_float(what: &'static str, t: &candle_core::Tensor) -> Result<()> {
    if t.dtype().is_float() {
        Ok(())
    } else {
        Err(CoreError::NotFloat {
            what,
            dtype: t.dtype(),
        })
    }
}

pub(crate) fn check_shape(
    what: &'static str,
    t: &candle_core::Tensor,
    expected: &[Option<usize>],
    words: &str,
) -> Result<()> {
    let dims = t.dims();
    let ok = dims.len() == expected.len()
        && dims
            .iter()
            .zip(expected)
            .all(|(d, e)| e.is_none_or(|e| e == *d));
    if ok {
        Ok(())
    } else {
        Err(CoreError::Shape {
            what,
            expected: words.to_string(),
            found: dims.to_vec(),
        })
    }
}

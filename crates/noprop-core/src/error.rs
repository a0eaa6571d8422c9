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
    /// A block index outside `1..=T`.
    #[error("block index {t} is outside 1..={blocks}")]
    BlockIndex {
        /// The index that was passed.
        t: usize,
        /// The number of blocks `T`.
        blocks: usize,
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

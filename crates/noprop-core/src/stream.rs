//! The named random streams of a training run, in one place.
//!
//! Every random draw of a run comes from a ChaCha stream whose seed is
//! [`sub_seed`](crate::sub_seed)`(seed, [stream, ...])`: the run's one `seed`,
//! the stream's number below, and the indices that make each use distinct
//! (block, epoch). Keeping the numbers in one enum means a new use of
//! randomness cannot silently reuse another's draws, and a run's metadata
//! can list all of them.

/// A named random stream; its discriminant is the first `sub_seed` index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    /// Parameter initialisation: `[Init, block]` for block `t` (0 for the
    /// head and single-network models), `[Init, u64::MAX]` for a learned
    /// class embedding.
    Init = 1,
    /// Minibatch order: the batcher's key, with a stream per (epoch, pass).
    Shuffle = 2,
    /// q-sampling and time draws of training: `[Noise, epoch, block]`.
    Noise = 3,
    /// Dropout masks of training: `[Dropout, epoch, block]`.
    Dropout = 4,
    /// Sampling noise of evaluation: `[Eval, epoch, k]`, `k` = 0 for the
    /// stochastic test runs, 1 for a separate deterministic run, 2 for the
    /// training subset.
    Eval = 5,
    /// Initialisation of NoProp-CT's learnable noise schedule.
    ScheduleInit = 6,
}

impl Stream {
    /// Every stream, in the order of their numbers.
    pub const ALL: [Stream; 6] = [
        Stream::Init,
        Stream::Shuffle,
        Stream::Noise,
        Stream::Dropout,
        Stream::Eval,
        Stream::ScheduleInit,
    ];

    /// The first `sub_seed` index of this stream.
    pub fn id(self) -> u64 {
        self as u64
    }

    /// The name used in run metadata.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Init => "init",
            Stream::Shuffle => "shuffle",
            Stream::Noise => "noise",
            Stream::Dropout => "dropout",
            Stream::Eval => "eval",
            Stream::ScheduleInit => "schedule_init",
        }
    }
}

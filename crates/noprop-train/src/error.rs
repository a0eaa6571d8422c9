//! The crate's errors: [`TrainError`] for training, evaluation and run
//! folders, [`ConfigError`] with one variant per configuration rule.

use std::path::PathBuf;

/// A configuration rule that was broken; each message names the field
/// (dotted, as in the file) and what it allows.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not match the schema (an unknown field, a wrong type).
    #[error("invalid config: {reason}")]
    Schema {
        /// The deserialiser's message, which names the field.
        reason: String,
    },
    /// The file uses the format before version 0.2, whose fields moved.
    #[error("old-style config: {}; see configs/ for examples", moved.iter().map(|(old, new)| format!("{old} moved to {new}")).collect::<Vec<_>>().join(", "))]
    OldStyle {
        /// `(old, new)` for each moved field the file uses.
        moved: Vec<(&'static str, &'static str)>,
    },
    /// A value outside what its field allows.
    #[error("invalid config: {field} must {rule}, got {found}")]
    Invalid {
        /// The field, dotted.
        field: &'static str,
        /// What it allows, e.g. `be at least 1` or `lie in [0, 1)`.
        rule: String,
        /// The value given.
        found: String,
    },
    /// A value a library check refused, with its reason.
    #[error("invalid config: {field}: {reason}")]
    Nested {
        /// The field, dotted.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The model would not fit in memory.
    #[error("invalid config: the model would have {parameters} parameters, more than the {max} allowed (fewer method.blocks or a smaller model.embedding.dim)")]
    ModelTooLarge {
        /// The parameters the config asks for.
        parameters: u128,
        /// The limit.
        max: u128,
    },
}

impl ConfigError {
    /// `field` must `rule` (e.g. "be at least 1"), and `found` does not.
    pub fn invalid(
        field: &'static str,
        rule: impl Into<String>,
        found: impl std::fmt::Display,
    ) -> Self {
        ConfigError::Invalid {
            field,
            rule: rule.into(),
            found: found.to_string(),
        }
    }
    /// `field` was refused by a check that gives its own reason.
    pub fn nested(field: &'static str, reason: impl std::fmt::Display) -> Self {
        ConfigError::Nested {
            field,
            reason: reason.to_string(),
        }
    }
}

/// Errors of training, evaluation and run folders.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration rule was broken.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file could not be read or written.
    #[error("{path}: {reason}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// A checkpoint could not be read or written.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// The run folder to create already has files in it.
    #[error("run folder {path} already exists and is not empty (use --resume to continue it)")]
    RunExists {
        /// The folder.
        path: PathBuf,
    },
    /// The folder is not a run folder.
    #[error("{path} is not a run folder (no config.json)")]
    NotARun {
        /// The folder.
        path: PathBuf,
    },
    /// A checkpoint does not fit the run it should resume.
    #[error("cannot resume: {reason}")]
    Resume {
        /// Why.
        reason: String,
    },
    /// Training produced a non-finite value in a tensor the checkpoint would hold.
    #[error("training diverged in epoch {epoch}: {tensor} holds {count} non-finite values (the last good checkpoint is kept)")]
    NonFiniteState {
        /// Epoch.
        epoch: usize,
        /// The tensor's checkpoint name (`.m`/`.v` for optimizer moments).
        tensor: String,
        /// How many values are NaN or infinite.
        count: usize,
    },
    /// The run folder is in use by another process.
    #[error("run folder {path} is in use by another noprop process{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    RunLocked {
        /// The folder.
        path: PathBuf,
        /// The holder's process id, if it wrote one.
        pid: Option<u32>,
    },
    /// What a resume would continue under differs from what the run used.
    #[error("cannot resume {path}: its {what} changed ({}); pass --accept-changes to continue anyway (recorded in meta.json)", differences.join(", "))]
    ResumeMismatch {
        /// The run folder.
        path: PathBuf,
        /// `config` or `data`.
        what: &'static str,
        /// The differences.
        differences: Vec<String>,
    },
    /// Too little data to train or test on.
    #[error("{what}")]
    NotEnoughData {
        /// What is missing.
        what: String,
    },
    /// Another worker of a parallel run failed, or the workers disagree.
    #[error("worker {worker}: {reason}")]
    Worker {
        /// The worker that failed.
        worker: usize,
        /// What happened.
        reason: String,
    },
    /// The loss became NaN or infinite.
    #[error("training diverged at epoch {epoch}, block {block}: loss {loss}")]
    Diverged {
        /// Epoch.
        epoch: usize,
        /// Block.
        block: usize,
        /// The loss value.
        loss: f64,
    },
    /// From the data crate.
    #[error(transparent)]
    Data(#[from] noprop_data::DataError),
    /// From the model crate.
    #[error(transparent)]
    Model(#[from] noprop_models::ModelError),
    /// From the core crate.
    #[error(transparent)]
    Core(#[from] noprop_core::CoreError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

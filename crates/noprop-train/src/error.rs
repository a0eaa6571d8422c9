//! The crate's errors: [`TrainError`] for training, evaluation and run
//! folders, [`ConfigError`] with one variant per configuration rule.

use std::path::PathBuf;

/// A configuration rule that was broken. Each variant names the field
/// (dotted, as in the file) and the allowed range.
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
    /// A count below its minimum.
    #[error("invalid config: {field} must be at least {min}, got {found}")]
    TooSmall {
        /// The field.
        field: &'static str,
        /// The smallest allowed value.
        min: usize,
        /// The value given.
        found: usize,
    },
    /// A size above the limit that keeps allocations bounded.
    #[error("invalid config: {field} must be at most {max}, got {found}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// The largest allowed value.
        max: usize,
        /// The value given.
        found: usize,
    },
    /// The model would not fit in memory.
    #[error("invalid config: the model would have {parameters} parameters, more than the {max} allowed (fewer method.blocks or a smaller model.embedding.dim)")]
    ModelTooLarge {
        /// The parameters the config asks for.
        parameters: u128,
        /// The limit.
        max: u128,
    },
    /// A number that must be finite and positive.
    #[error("invalid config: {field} must be a finite number > 0, got {found}")]
    NotPositive {
        /// The field.
        field: &'static str,
        /// The value given.
        found: f64,
    },
    /// A number that must be finite and not negative.
    #[error("invalid config: {field} must be a finite number >= 0, got {found}")]
    Negative {
        /// The field.
        field: &'static str,
        /// The value given.
        found: f64,
    },
    /// A number outside an interval.
    #[error("invalid config: {field} must lie in {range}, got {found}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The interval, e.g. `[0, 1)`.
        range: &'static str,
        /// The value given.
        found: f64,
    },
    /// The time embedding's dimension must be even (sine and cosine pairs).
    #[error("invalid config: method.time_dim must be even and positive, got {found}")]
    OddTimeDim {
        /// The value given.
        found: usize,
    },
    /// The class probabilities' parameters are invalid.
    #[error("invalid config: model.class_probability: {source}")]
    ClassProbability {
        /// Why.
        source: noprop_core::CoreError,
    },
    /// The noise schedule is invalid.
    #[error("invalid config: method.schedule: {source}")]
    Schedule {
        /// Why.
        source: noprop_core::ScheduleError,
    },
    /// An orthogonal embedding needs at least as many dimensions as classes.
    #[error("invalid config: model.embedding.init = \"orthogonal\" needs d >= m, got d = {dim} < {classes}")]
    OrthogonalTooNarrow {
        /// `d`.
        dim: usize,
        /// `m`.
        classes: usize,
    },
    /// A prototype initialisation needs `d = C*H*W`.
    #[error("invalid config: model.embedding.init = \"prototype\" needs d = C*H*W = {image}, got d = {dim}")]
    PrototypeNotImageSized {
        /// `d`.
        dim: usize,
        /// `C*H*W`.
        image: usize,
    },
    /// The Figure-6 networks pool twice by 2.
    #[error("invalid config: data.dataset {dataset} has {height}x{width} images; the networks need both a multiple of 4")]
    ImageSize {
        /// The data set.
        dataset: &'static str,
        /// `H`.
        height: usize,
        /// `W`.
        width: usize,
    },
    /// An inference integrator that the method cannot use.
    #[error("invalid config: {method} integrates with {allowed}, not {found}")]
    Sampler {
        /// The method.
        method: &'static str,
        /// The integrators it can use.
        allowed: &'static str,
        /// The one asked for.
        found: String,
    },
}

impl ConfigError {
    /// The dotted field the rule is about (`""` for schema errors, which
    /// name it in their message).
    pub fn field(&self) -> &'static str {
        match self {
            ConfigError::Schema { .. } | ConfigError::OldStyle { .. } => "",
            ConfigError::TooSmall { field, .. }
            | ConfigError::TooLarge { field, .. }
            | ConfigError::NotPositive { field, .. }
            | ConfigError::Negative { field, .. }
            | ConfigError::OutOfRange { field, .. } => field,
            ConfigError::OddTimeDim { .. } => "method.time_dim",
            ConfigError::ClassProbability { .. } => "model.class_probability",
            ConfigError::Schedule { .. } => "method.schedule",
            ConfigError::OrthogonalTooNarrow { .. }
            | ConfigError::PrototypeNotImageSized { .. } => "model.embedding.init",
            ConfigError::ImageSize { .. } => "data.dataset",
            ConfigError::ModelTooLarge { .. } => "method.blocks",
            ConfigError::Sampler { .. } => "method.sampler",
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
    /// A method was handed another method's configuration.
    #[error("a {model} model cannot run a {config} configuration")]
    MethodMismatch {
        /// The model's method.
        model: &'static str,
        /// The configuration's method.
        config: &'static str,
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

//! Training NoProp models: NoProp-DT (Algorithm 1) with evaluation by the
//! eq. 3 sampler, AdamW with saveable state, safetensors checkpoints and the
//! run folder.
//!
//! The trainer reports progress through an [`Observer`] and the `tracing`
//! facade; it never prints.
//!
//! ```
//! use noprop_train::config::Config;
//! use noprop_data::DatasetKind;
//!
//! let cfg = Config::paper_dt(DatasetKind::Mnist).validate()?;
//! assert_eq!(cfg.schedule().blocks(), 10);
//! # Ok::<(), noprop_train::TrainError>(())
//! ```

use std::path::PathBuf;

pub mod backprop;
pub mod checkpoint;
pub mod config;
pub mod memory;
pub mod ct;
pub mod dt;
pub mod observer;
pub mod optim;
pub mod run;
pub mod trainer;

pub use config::{Config, ValidConfig};
pub use backprop::BackpropTrainer;
pub use ct::CtTrainer;
pub use dt::{DeviceData, DtTrainer};
pub use trainer::{build_trainer, load_for_eval, Trainer};
pub use observer::{EvalReport, Event, Observer, PassMetrics, Silent};
pub use run::{fit, RunData, RunDir};

/// Errors of training, evaluation and run folders.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration rule was broken.
    #[error("invalid config: {field} {reason}")]
    InvalidConfig {
        /// The dotted field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
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

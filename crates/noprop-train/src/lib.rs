//! Training NoProp models: one training skeleton ([`Trainer`]) around one
//! small type per method ([`Dt`], [`Ct`], [`Fm`], [`Backprop`], [`Adjoint`],
//! each implementing [`Method`]), a checked configuration ([`Config`]),
//! AdamW with saveable state, safetensors checkpoints with typed metadata,
//! and the run folder ([`RunDir`]).
//!
//! The trainer reports progress through an [`Observer`]; it never prints.
//!
//! ```
//! use noprop_train::{build_trainer, RawConfig};
//! use noprop_data::DatasetKind;
//!
//! let mut raw = RawConfig::paper_dt(DatasetKind::Mnist);
//! raw.train.epochs = 1;
//! let cfg = raw.validate()?;
//! assert_eq!(cfg.method.params().blocks(), Some(10));
//! let trainer = build_trainer(cfg, candle_core::Device::Cpu, None)?;
//! assert!(trainer.named_tensors().contains_key("blocks.10.fuse.out.weight"));
//! # Ok::<(), noprop_train::TrainError>(())
//! ```

pub mod adjoint;
pub mod backprop;
pub mod checkpoint;
pub mod collective;
pub mod config;
mod continuous;
pub mod ct;
pub mod data;
pub mod dt;
pub mod error;
pub mod fm;
pub mod groups;
pub mod memory;
pub mod method;
pub mod observer;
pub mod optim;
pub mod run;
mod sections;
pub mod trainer;

pub use adjoint::Adjoint;
pub use backprop::Backprop;
pub use collective::{Collective, ThreadCollective};
pub use config::{Config, InferenceChange, RawConfig};
pub use ct::Ct;
pub use data::{DataIdentity, DeviceData, LoadedData, RunData};
pub use dt::Dt;
pub use error::{ConfigError, TrainError};
pub use fm::Fm;
pub use method::{Method, MethodParams, Setup};
pub use observer::{EvalReport, Event, Observer, PassMetrics, Silent};
pub use run::{fit, RunDir, RunMeta};
pub use trainer::{build_trainer, load_for_eval, CheckpointData, Trainer};

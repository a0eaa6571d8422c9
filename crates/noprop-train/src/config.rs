//! The checked configuration: [`RawConfig::validate`] turns the file's
//! schema (`raw.rs`, re-exported here) into a [`Config`] whose every value has been
//! checked once, with defaults resolved, enums where the file has names, and
//! the method's own settings in the method's variant. Nothing downstream
//! reads the raw file; [`Config::to_raw`] writes it back out (with every
//! default filled in) for `config.json` and checkpoint metadata.

use std::path::PathBuf;

use noprop_core::{
    ClassProbability, DiscreteSchedule, LearnableScheduleConfig, OdeSolver, ScheduleSpec,
};
use noprop_data::DatasetKind;
use noprop_models::{EmbeddingKind, Kernels};

use crate::error::ConfigError;
pub use crate::raw::{
    old_style_fields, CtSampler, EmbeddingInit, HeadInit, OptimizerKind, RawCheckpoint, RawConfig,
    RawData, RawEmbedding, RawEval, RawMethod, RawModel, RawTrain, ScheduleTraining, TimeSampling,
    TrainOrder, MOVED_FIELDS,
};

/// Limits that keep every allocation a config can cause bounded; far above
/// anything the paper uses.
pub mod limits {
    /// Blocks `T`.
    pub const BLOCKS: usize = 1_000;
    /// A learned embedding's `d`.
    pub const EMBEDDING_DIM: usize = 1 << 16;
    /// The time embedding's dimension.
    pub const TIME_DIM: usize = 1 << 14;
    /// A training minibatch.
    pub const BATCH: usize = 1 << 16;
    /// Rows of one evaluation forward pass.
    pub const EVAL_BATCH: usize = 1 << 20;
    /// Inference runs per evaluation.
    pub const RUNS: usize = 1_000;
    /// ODE or sampler steps.
    pub const STEPS: usize = 10_000_000;
    /// Epochs.
    pub const EPOCHS: usize = 1_000_000;
    /// Trainable parameters of the whole model (1 GiB of `f32`; with the
    /// gradients and AdamW's two moments about 4 GiB). The paper's largest
    /// model, CIFAR-100 prototype NoProp-DT, has about 1/10 of this.
    pub const PARAMETERS: u128 = 1 << 28;
}

/// Which NoProp variant (or baseline) a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// NoProp-DT, Algorithm 1.
    Dt,
    /// NoProp-CT, Algorithm 2.
    Ct,
    /// NoProp-FM, Algorithm 3.
    Fm,
    /// Baseline: the DT blocks chained by eq. 17-19, trained end to end.
    Backprop,
    /// Baseline: a neural ODE trained with the adjoint method.
    Adjoint,
}

impl std::str::FromStr for Method {
    type Err = String;
    /// `dt`, `ct`, `fm`, `backprop` or `adjoint`.
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Method::Dt,
            Method::Ct,
            Method::Fm,
            Method::Backprop,
            Method::Adjoint,
        ]
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| format!("unknown method {s:?}"))
    }
}

impl Method {
    /// The name used in configs and checkpoint metadata.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dt => "dt",
            Method::Ct => "ct",
            Method::Fm => "fm",
            Method::Backprop => "backprop",
            Method::Adjoint => "adjoint",
        }
    }
}

/// `[data]`, checked.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DataSettings {
    /// The data set.
    pub dataset: DatasetKind,
    /// The data folder, if the config names one.
    pub dir: Option<PathBuf>,
    /// Train on the first N training examples only.
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test examples only.
    pub test_limit: Option<usize>,
}

/// `[model]`, checked: the class embedding and what every network shares.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ModelSettings {
    /// The class embedding and its latent dimension.
    pub embedding: EmbeddingKind,
    /// How a learned embedding starts (`None` for one-hot).
    pub embedding_init: Option<EmbeddingInit>,
    /// A learned embedding's own learning rate, if it has one.
    pub embedding_lr: Option<f64>,
    /// Whether the denoising or flow target `u_y` passes its gradient to a
    /// learned `W_embed` (`true`, the paper's loss; always `true` for one-hot).
    pub embedding_target_grad: bool,
    /// Dropout probability of the image path.
    pub dropout: f64,
    /// The kernels of the image path.
    pub kernels: Kernels,
    /// Class probabilities.
    pub class_probability: ClassProbability,
    /// How `f_out` starts.
    pub head_init: HeadInit,
}

/// The sinusoidal time embedding of the continuous-time network.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct TimeEmbedding {
    /// Its dimension (even).
    pub dim: usize,
    /// `t` is embedded as `scale * t`.
    pub scale: f64,
}

/// NoProp-DT's settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DtSettings {
    /// The order in which blocks are trained.
    pub order: TrainOrder,
    /// The denoising weight `eta`.
    pub eta: f64,
    /// The validated schedule; its `blocks()` is `T`.
    pub schedule: DiscreteSchedule,
    spec: ScheduleSpec,
}

/// NoProp-CT's settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CtSettings {
    /// The denoising weight `eta`.
    pub eta: f64,
    /// The time embedding.
    pub time: TimeEmbedding,
    /// The learnable schedule's initialisation.
    pub schedule: LearnableScheduleConfig,
    /// The integrator at inference.
    pub sampler: CtSampler,
    /// Integration steps at inference.
    pub steps: usize,
    /// How the training times are drawn.
    pub t_sampling: TimeSampling,
    /// How the learnable schedule is trained.
    pub schedule_training: ScheduleTraining,
}

/// NoProp-FM's settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FmSettings {
    /// Standard deviation of the interpolation noise.
    pub sigma: f64,
    /// The time embedding.
    pub time: TimeEmbedding,
    /// The ODE solver at inference.
    pub solver: OdeSolver,
    /// Integration steps at inference.
    pub steps: usize,
    /// How the training times are drawn.
    pub t_sampling: TimeSampling,
}

/// The back-propagation baseline's settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BackpropSettings {
    /// Blocks `T`.
    pub blocks: usize,
    /// The initial `alpha_t`.
    pub alpha_init: f64,
}

/// The adjoint baseline's settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AdjointSettings {
    /// The time embedding.
    pub time: TimeEmbedding,
    /// Euler steps of the training solves.
    pub train_steps: usize,
    /// Euler steps at inference.
    pub steps: usize,
}

/// The method and its own settings.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodSettings {
    /// NoProp-DT.
    Dt(DtSettings),
    /// NoProp-CT.
    Ct(CtSettings),
    /// NoProp-FM.
    Fm(FmSettings),
    /// The back-propagation baseline.
    Backprop(BackpropSettings),
    /// The adjoint baseline.
    Adjoint(AdjointSettings),
}

impl MethodSettings {
    /// Which method.
    pub fn method(&self) -> Method {
        match self {
            MethodSettings::Dt(_) => Method::Dt,
            MethodSettings::Ct(_) => Method::Ct,
            MethodSettings::Fm(_) => Method::Fm,
            MethodSettings::Backprop(_) => Method::Backprop,
            MethodSettings::Adjoint(_) => Method::Adjoint,
        }
    }

    /// The number of discrete blocks (`T` for DT and back-propagation), or
    /// `None` for the single continuous-time network.
    pub fn blocks(&self) -> Option<usize> {
        match self {
            MethodSettings::Dt(s) => Some(s.schedule.blocks()),
            MethodSettings::Backprop(s) => Some(s.blocks),
            _ => None,
        }
    }

    /// Network evaluations of one inference run: `T` blocks for DT and
    /// back-propagation, the solver's or sampler's `steps` otherwise.
    pub fn inference_steps(&self) -> usize {
        match self {
            MethodSettings::Dt(s) => s.schedule.blocks(),
            MethodSettings::Backprop(s) => s.blocks,
            MethodSettings::Ct(s) => s.steps,
            MethodSettings::Fm(s) => s.steps,
            MethodSettings::Adjoint(s) => s.steps,
        }
    }

    /// The time embedding of the continuous-time network, if the method has one.
    pub fn time(&self) -> Option<TimeEmbedding> {
        match self {
            MethodSettings::Ct(s) => Some(s.time),
            MethodSettings::Fm(s) => Some(s.time),
            MethodSettings::Adjoint(s) => Some(s.time),
            _ => None,
        }
    }
}

/// One method's own settings, found in a checked config by type.
pub trait MethodSpecific: Sized {
    /// The method they belong to.
    const METHOD: Method;
    /// These settings, if `settings` are this method's.
    fn of(settings: &MethodSettings) -> Option<&Self>;
}

macro_rules! method_specific {
    ($($ty:ident => $variant:ident),* $(,)?) => {$(
        impl MethodSpecific for $ty {
            const METHOD: Method = Method::$variant;
            fn of(settings: &MethodSettings) -> Option<&Self> {
                match settings {
                    MethodSettings::$variant(s) => Some(s),
                    _ => None,
                }
            }
        }
    )*};
}

method_specific!(DtSettings => Dt, CtSettings => Ct, FmSettings => Fm, BackpropSettings => Backprop, AdjointSettings => Adjoint);

/// `[train]`, checked.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TrainSettings {
    /// Epochs.
    pub epochs: usize,
    /// Minibatch size.
    pub batch_size: usize,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// The root seed.
    pub seed: u64,
    /// The optimizer family.
    pub optimizer: OptimizerKind,
}

/// `[eval]`, checked.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EvalSettings {
    /// Stochastic inference runs.
    pub runs: usize,
    /// Also a deterministic run, where the sampler has noise.
    pub deterministic: bool,
    /// Rows per evaluation forward pass.
    pub batch_size: usize,
    /// Train accuracy on the first N training examples (0: skip).
    pub train_subset: usize,
    /// Evaluate every N epochs.
    pub every: usize,
}

/// A configuration that passed [`RawConfig::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    data: DataSettings,
    model: ModelSettings,
    method: MethodSettings,
    train: TrainSettings,
    eval: EvalSettings,
    keep_last: usize,
}

impl Config {
    /// `[data]`.
    pub fn data(&self) -> &DataSettings {
        &self.data
    }
    /// `[model]`.
    pub fn model(&self) -> &ModelSettings {
        &self.model
    }
    /// `[method]`.
    pub fn method(&self) -> &MethodSettings {
        &self.method
    }
    /// `[train]`.
    pub fn train(&self) -> &TrainSettings {
        &self.train
    }
    /// `[eval]`.
    pub fn eval(&self) -> &EvalSettings {
        &self.eval
    }
    /// How many epoch checkpoints to keep (0: all).
    pub fn keep_last(&self) -> usize {
        self.keep_last
    }
    /// The data set.
    pub fn dataset(&self) -> DatasetKind {
        self.data.dataset
    }
    /// The latent dimension `d` of `W_embed`.
    pub fn latent_dim(&self) -> usize {
        let (c, h, w) = self.data.dataset.shape();
        self.model
            .embedding
            .latent_dim(self.data.dataset.num_classes(), c * h * w)
    }

    /// The trainable parameters the model will have (BatchNorm statistics
    /// included), at most [`limits::PARAMETERS`].
    pub fn parameters(&self) -> u128 {
        parameter_count(self.data.dataset, self.latent_dim(), &self.method)
    }

    /// The configuration as a file would say it, every default filled in.
    pub fn to_raw(&self) -> RawConfig {
        let m = &self.model;
        let embedding = match m.embedding {
            EmbeddingKind::OneHot => RawEmbedding::OneHot,
            EmbeddingKind::Learned { dim } => RawEmbedding::Learned {
                dim,
                init: m.embedding_init,
                lr: m.embedding_lr,
                target_grad: m.embedding_target_grad,
            },
            EmbeddingKind::Prototype => RawEmbedding::Prototype {
                init: m.embedding_init,
                lr: m.embedding_lr,
                target_grad: m.embedding_target_grad,
            },
        };
        let method = match &self.method {
            MethodSettings::Dt(s) => RawMethod::Dt {
                blocks: s.schedule.blocks(),
                eta: s.eta,
                order: s.order,
                schedule: s.spec.clone(),
            },
            MethodSettings::Ct(s) => RawMethod::Ct {
                eta: s.eta,
                time_dim: s.time.dim,
                time_scale: s.time.scale,
                schedule: s.schedule.clone(),
                sampler: s.sampler,
                steps: s.steps,
                t_sampling: s.t_sampling,
                schedule_training: s.schedule_training,
            },
            MethodSettings::Fm(s) => RawMethod::Fm {
                sigma: s.sigma,
                time_dim: s.time.dim,
                time_scale: s.time.scale,
                solver: s.solver,
                steps: s.steps,
                t_sampling: s.t_sampling,
            },
            MethodSettings::Backprop(s) => RawMethod::Backprop {
                blocks: s.blocks,
                alpha_init: s.alpha_init,
            },
            MethodSettings::Adjoint(s) => RawMethod::Adjoint {
                time_dim: s.time.dim,
                time_scale: s.time.scale,
                train_steps: s.train_steps,
                steps: s.steps,
            },
        };
        let (d, t, e) = (&self.data, &self.train, &self.eval);
        RawConfig {
            data: RawData {
                dataset: d.dataset,
                dir: d.dir.clone(),
                train_limit: d.train_limit,
                test_limit: d.test_limit,
            },
            model: RawModel {
                embedding,
                dropout: m.dropout,
                kernels: m.kernels,
                class_probability: m.class_probability,
                head_init: Some(m.head_init),
            },
            method,
            train: RawTrain {
                epochs: t.epochs,
                batch_size: t.batch_size,
                lr: t.lr,
                weight_decay: t.weight_decay,
                seed: t.seed,
                optimizer: t.optimizer,
            },
            eval: RawEval {
                runs: e.runs,
                deterministic: e.deterministic,
                batch_size: e.batch_size,
                train_subset: e.train_subset,
                every: e.every,
            },
            checkpoint: RawCheckpoint {
                keep_last: self.keep_last,
            },
        }
    }

    /// This configuration with other inference settings (the `eval`
    /// command's `--runs`, `--steps`, `--sampler`, `--train-subset`, `--test-limit`).
    pub fn with_inference(&self, change: InferenceChange) -> Result<Config, ConfigError> {
        let mut raw = self.to_raw();
        if let Some(n) = change.runs {
            raw.eval.runs = n;
        }
        if let Some(n) = change.train_subset {
            raw.eval.train_subset = n;
        }
        if let Some(n) = change.test_limit {
            raw.data.test_limit = Some(n);
        }
        match &mut raw.method {
            RawMethod::Ct { sampler, steps, .. } => {
                *sampler = change.sampler.unwrap_or(*sampler);
                *steps = change.steps.unwrap_or(*steps);
            }
            RawMethod::Fm { solver, steps, .. } => {
                match change.sampler {
                    Some(CtSampler::Flow(s)) => *solver = s,
                    Some(CtSampler::Eq3) => {
                        return Err(ConfigError::Sampler {
                            method: "NoProp-FM",
                            allowed: "euler or heun",
                            found: "eq3".into(),
                        })
                    }
                    None => {}
                }
                *steps = change.steps.unwrap_or(*steps);
            }
            RawMethod::Adjoint { steps, .. } => {
                if let Some(s) = change
                    .sampler
                    .filter(|s| *s != CtSampler::Flow(OdeSolver::Euler))
                {
                    return Err(ConfigError::Sampler {
                        method: "the adjoint baseline",
                        allowed: "euler",
                        found: s.to_string(),
                    });
                }
                *steps = change.steps.unwrap_or(*steps);
            }
            RawMethod::Dt { .. } | RawMethod::Backprop { .. } => {
                if let Some(s) = change.sampler {
                    return Err(ConfigError::Sampler {
                        method: "a discrete-time model",
                        allowed: "its own blocks (no --sampler)",
                        found: s.to_string(),
                    });
                }
                if change.steps.is_some() {
                    return Err(ConfigError::Sampler {
                        method: "a discrete-time model",
                        allowed: "its own blocks (no --steps)",
                        found: "--steps".into(),
                    });
                }
            }
        }
        raw.validate()
    }
}

/// The trainable parameters of the Figure-6 networks a config asks for
/// (BatchNorm statistics included), counted from the shapes without
/// building anything, in `u128` so that no size can overflow.
fn parameter_count(dataset: DatasetKind, d: usize, method: &MethodSettings) -> u128 {
    let (c, h, w) = dataset.shape();
    let (c, h, w, d, m) = (
        c as u128,
        h as u128,
        w as u128,
        d as u128,
        dataset.num_classes() as u128,
    );
    let linear = |i: u128, o: u128| i * o + o;
    let image = linear(9 * c, 32)
        + linear(9 * 32, 64)
        + linear(9 * 64, 128)
        + linear(128 * (h / 4) * (w / 4), 256)
        + 4 * 256;
    let prototype = d == c * h * w;
    let dt_block = image
        + if prototype {
            image
        } else {
            linear(d, 256) + 2 * linear(256, 256) + 3 * 4 * 256
        }
        + linear(512, 256)
        + linear(256, 128)
        + 4 * (256 + 128)
        + linear(128, m);
    // The continuous-time network's image path ends in a ReLU, not a BatchNorm.
    let ct_image = image - 4 * 256;
    let ct_net = |time_dim: usize| {
        ct_image
            + if prototype { ct_image } else { linear(d, 256) }
            + linear(time_dim as u128, 256)
            + linear(768, 256)
            + linear(256, 128)
            + linear(128, m)
    };
    let shared = linear(d, m) + m * d;
    shared
        + match method {
            MethodSettings::Dt(s) => s.schedule.blocks() as u128 * dt_block,
            // And `w_t`, one per block.
            MethodSettings::Backprop(s) => s.blocks as u128 * (dt_block + 1),
            // The learnable schedule: `b1`, `w1`, `w2` of its hidden layer and two endpoints.
            MethodSettings::Ct(s) => ct_net(s.time.dim) + 3 * s.schedule.hidden as u128 + 2,
            MethodSettings::Fm(s) => ct_net(s.time.dim),
            MethodSettings::Adjoint(s) => ct_net(s.time.dim),
        }
}

/// The settings (dotted paths, with both values) in which two configs
/// differ, `train.epochs` aside (a resume may extend a run).
pub fn config_differences(a: &RawConfig, b: &RawConfig) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let null = serde_json::Value::Null;
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b && path != "train.epochs" => out.push(format!("{path} {a} -> {b}")),
            _ => {}
        }
    }
    let (a, b) = (serde_json::to_value(a), serde_json::to_value(b));
    let mut out = vec![];
    match (a, b) {
        (Ok(a), Ok(b)) => walk("", &a, &b, &mut out),
        _ => out.push("the configs cannot be compared".into()),
    }
    out
}

/// Inference settings to change in [`Config::with_inference`]; `None` keeps the config's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InferenceChange {
    /// Stochastic inference runs.
    pub runs: Option<usize>,
    /// Integration steps (continuous-time methods).
    pub steps: Option<usize>,
    /// The integrator (continuous-time methods).
    pub sampler: Option<CtSampler>,
    /// Train accuracy on the first N training examples (0: skip).
    pub train_subset: Option<usize>,
    /// Evaluate on the first N test examples.
    pub test_limit: Option<usize>,
}

fn at_least(field: &'static str, found: usize, min: usize) -> Result<usize, ConfigError> {
    if found < min {
        Err(ConfigError::TooSmall { field, min, found })
    } else {
        Ok(found)
    }
}

fn between(
    field: &'static str,
    found: usize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    at_least(field, found, min)?;
    if found > max {
        return Err(ConfigError::TooLarge { field, max, found });
    }
    Ok(found)
}

fn positive(field: &'static str, found: f64) -> Result<f64, ConfigError> {
    if found.is_finite() && found > 0.0 {
        Ok(found)
    } else {
        Err(ConfigError::NotPositive { field, found })
    }
}

fn non_negative(field: &'static str, found: f64) -> Result<f64, ConfigError> {
    if found.is_finite() && found >= 0.0 {
        Ok(found)
    } else {
        Err(ConfigError::Negative { field, found })
    }
}

fn time_embedding(dim: usize, scale: f64) -> Result<TimeEmbedding, ConfigError> {
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(ConfigError::OddTimeDim { found: dim });
    }
    between("method.time_dim", dim, 2, limits::TIME_DIM)?;
    Ok(TimeEmbedding {
        dim,
        scale: positive("method.time_scale", scale)?,
    })
}

fn steps(field: &'static str, n: usize) -> Result<usize, ConfigError> {
    between(field, n, 1, limits::STEPS)
}

impl RawConfig {
    /// Reads a configuration from its JSON form (a TOML file converted to
    /// JSON values reads the same way). A config in the format before 0.2
    /// gets an error listing what moved where.
    pub fn from_json_value(v: serde_json::Value) -> Result<RawConfig, ConfigError> {
        let moved = old_style_fields(&v);
        if !moved.is_empty() {
            return Err(ConfigError::OldStyle { moved });
        }
        serde_json::from_value(v).map_err(|e| ConfigError::Schema {
            reason: e.to_string(),
        })
    }

    /// Checks every rule once and resolves every default.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let dataset = self.data.dataset;
        let (c, h, w) = dataset.shape();
        let m = dataset.num_classes();
        if h % 4 != 0 || w % 4 != 0 {
            return Err(ConfigError::ImageSize {
                dataset: dataset.name(),
                height: h,
                width: w,
            });
        }
        let data = DataSettings {
            dataset,
            dir: self.data.dir,
            train_limit: self
                .data
                .train_limit
                .map(|n| at_least("data.train_limit", n, 1))
                .transpose()?,
            test_limit: self
                .data
                .test_limit
                .map(|n| at_least("data.test_limit", n, 1))
                .transpose()?,
        };

        let raw_model = self.model;
        if !(raw_model.dropout.is_finite() && (0.0..1.0).contains(&raw_model.dropout)) {
            return Err(ConfigError::OutOfRange {
                field: "model.dropout",
                range: "[0, 1)",
                found: raw_model.dropout,
            });
        }
        raw_model
            .class_probability
            .validate()
            .map_err(|source| ConfigError::ClassProbability { source })?;
        let (embedding, init, embedding_lr, target_grad) = match raw_model.embedding {
            RawEmbedding::OneHot => (EmbeddingKind::OneHot, None, None, true),
            RawEmbedding::Learned {
                dim,
                init,
                lr,
                target_grad,
            } => {
                between("model.embedding.dim", dim, 1, limits::EMBEDDING_DIM)?;
                let init = init.unwrap_or(if dim >= m {
                    EmbeddingInit::Orthogonal
                } else {
                    EmbeddingInit::Normal
                });
                (EmbeddingKind::Learned { dim }, Some(init), lr, target_grad)
            }
            RawEmbedding::Prototype {
                init,
                lr,
                target_grad,
            } => (
                EmbeddingKind::Prototype,
                Some(init.unwrap_or(EmbeddingInit::Prototype)),
                lr,
                target_grad,
            ),
        };
        let d = embedding.latent_dim(m, c * h * w);
        match init {
            Some(EmbeddingInit::Orthogonal) if d < m => {
                return Err(ConfigError::OrthogonalTooNarrow { dim: d, classes: m })
            }
            Some(EmbeddingInit::Prototype) if d != c * h * w => {
                return Err(ConfigError::PrototypeNotImageSized {
                    dim: d,
                    image: c * h * w,
                })
            }
            _ => {}
        }
        let embedding_lr = embedding_lr
            .map(|lr| non_negative("model.embedding.lr", lr))
            .transpose()?;

        let method = match self.method {
            RawMethod::Dt {
                blocks,
                eta,
                order,
                schedule,
            } => {
                between("method.blocks", blocks, 1, limits::BLOCKS)?;
                let eta = non_negative("method.eta", eta)?;
                let built = schedule
                    .build(blocks)
                    .map_err(|source| ConfigError::Schedule { source })?;
                MethodSettings::Dt(DtSettings {
                    order,
                    eta,
                    schedule: built,
                    spec: schedule,
                })
            }
            RawMethod::Ct {
                eta,
                time_dim,
                time_scale,
                schedule,
                sampler,
                steps: n,
                t_sampling,
                schedule_training,
            } => {
                at_least("method.schedule.hidden", schedule.hidden, 1)?;
                MethodSettings::Ct(CtSettings {
                    eta: non_negative("method.eta", eta)?,
                    time: time_embedding(time_dim, time_scale)?,
                    schedule,
                    sampler,
                    steps: steps("method.steps", n)?,
                    t_sampling,
                    schedule_training,
                })
            }
            RawMethod::Fm {
                sigma,
                time_dim,
                time_scale,
                solver,
                steps: n,
                t_sampling,
            } => MethodSettings::Fm(FmSettings {
                sigma: non_negative("method.sigma", sigma)?,
                time: time_embedding(time_dim, time_scale)?,
                solver,
                steps: steps("method.steps", n)?,
                t_sampling,
            }),
            RawMethod::Backprop { blocks, alpha_init } => {
                between("method.blocks", blocks, 1, limits::BLOCKS)?;
                if !(alpha_init.is_finite() && alpha_init.abs() < 1.0) {
                    return Err(ConfigError::OutOfRange {
                        field: "method.alpha_init",
                        range: "(-1, 1)",
                        found: alpha_init,
                    });
                }
                MethodSettings::Backprop(BackpropSettings { blocks, alpha_init })
            }
            RawMethod::Adjoint {
                time_dim,
                time_scale,
                train_steps,
                steps: n,
            } => MethodSettings::Adjoint(AdjointSettings {
                time: time_embedding(time_dim, time_scale)?,
                train_steps: steps("method.train_steps", train_steps)?,
                steps: steps("method.steps", n)?,
            }),
        };
        // The baselines have no denoising or flow target to detach; a
        // `target_grad = false` there would be silently ignored.
        if !target_grad
            && matches!(
                method,
                MethodSettings::Backprop(_) | MethodSettings::Adjoint(_)
            )
        {
            return Err(ConfigError::Schema {
                reason: format!(
                    "model.embedding.target_grad = false applies to dt, ct and fm only; method {} has no denoising target",
                    method.method().name()
                ),
            });
        }
        let parameters = parameter_count(dataset, d, &method);
        if parameters > limits::PARAMETERS {
            return Err(ConfigError::ModelTooLarge {
                parameters,
                max: limits::PARAMETERS,
            });
        }
        let head_init = raw_model.head_init.unwrap_or(match method {
            MethodSettings::Backprop(_) => HeadInit::Embedding,
            _ => HeadInit::Uniform,
        });
        let model = ModelSettings {
            embedding,
            embedding_init: init,
            embedding_lr,
            embedding_target_grad: target_grad,
            dropout: raw_model.dropout,
            kernels: raw_model.kernels,
            class_probability: raw_model.class_probability,
            head_init,
        };

        let t = self.train;
        let train = TrainSettings {
            epochs: between("train.epochs", t.epochs, 1, limits::EPOCHS)?,
            batch_size: between("train.batch_size", t.batch_size, 2, limits::BATCH)?,
            lr: positive("train.lr", t.lr)?,
            weight_decay: non_negative("train.weight_decay", t.weight_decay)?,
            seed: t.seed,
            optimizer: t.optimizer,
        };
        let e = self.eval;
        let eval = EvalSettings {
            runs: between("eval.runs", e.runs, 1, limits::RUNS)?,
            deterministic: e.deterministic,
            batch_size: between("eval.batch_size", e.batch_size, 1, limits::EVAL_BATCH)?,
            train_subset: e.train_subset,
            every: at_least("eval.every", e.every, 1)?,
        };
        Ok(Config {
            data,
            model,
            method,
            train,
            eval,
            keep_last: self.checkpoint.keep_last,
        })
    }
}

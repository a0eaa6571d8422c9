//! Run configuration: a raw, deserialised form (`Config`) that is checked once
//! by [`Config::validate`] into [`ValidConfig`], with one error variant per rule.

use std::path::PathBuf;

use noprop_core::{ClassProbability, DiscreteSchedule, LearnableScheduleConfig, OdeSolver, ScheduleSpec};
use noprop_data::DatasetKind;
use noprop_models::Kernels;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Which NoProp variant (or baseline) a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// NoProp-DT, Algorithm 1.
    Dt,
    /// NoProp-CT, Algorithm 2.
    Ct,
    /// NoProp-FM, Algorithm 3.
    Fm,
    /// Baseline: the DT blocks chained by eq. 17-19, trained end to end by back-propagation.
    Backprop,
    /// Baseline: a neural ODE on the continuous-time network, gradients by the adjoint method.
    Adjoint,
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

/// The class embedding (spec section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Embedding {
    /// `W_embed = I_m`, fixed, `d = m`.
    OneHot,
    /// Learned, `d = model.embedding_dim` ("dim=20" in the paper).
    Learned,
    /// Learned, `d = C*H*W`, initialised from training images.
    Prototype,
}

/// How a learned `W_embed` starts (the paper's Figure 5 ablation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingInit {
    /// Orthonormal rows (needs `d >= m`).
    Orthogonal,
    /// Independent N(0, 1) entries.
    Normal,
    /// Per class, the training image of smallest median distance to the rest
    /// of its class (needs `d = C*H*W`).
    Prototype,
}

/// How the classifier head `f_out` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadInit {
    /// The usual Linear initialisation, uniform in `±1/sqrt(d)`.
    Uniform,
    /// Aligned with the embedding: `W_out U^T = g I` (`g` times the
    /// ridge-regularised dual basis of the rows `u_y` of `W_embed`, `g` such
    /// that `softmax(f_out(u_y))` gives `y` probability 0.9), bias 0.
    Embedding,
}

/// How the blocks are visited during an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOrder {
    /// Algorithm 1: for t = 1..T, one full pass over the data for block t.
    Sequential,
    /// One pass over the data per epoch that trains every block on each
    /// minibatch (each on its own noisy `z_{t-1}`), the head after each
    /// block: every parameter gets as many updates as in `Sequential`.
    Fused,
}

/// `[data]`: which data set and where it lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `mnist`, `cifar10` or `cifar100`.
    #[serde(with = "dataset_kind")]
    pub dataset: DatasetKind,
    /// The data folder; when absent, `$NOPROP_DATA/<dataset>` or `./data/<dataset>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Use only the first N training examples (0: all of them).
    #[serde(default)]
    pub train_limit: usize,
    /// Use only the first N test examples (0: all of them).
    #[serde(default)]
    pub test_limit: usize,
}

mod dataset_kind {
    use noprop_data::DatasetKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &DatasetKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.name())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DatasetKind, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `[model]`: the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The training method.
    pub method: Method,
    /// Number of blocks `T` (10 in the paper).
    pub blocks: usize,
    /// The class embedding.
    pub embedding: Embedding,
    /// Dropout probability of the image path (0.2 in Figure 6).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// `fast` (hand-written CPU kernels) or `stock` (candle's ops).
    #[serde(default = "default_kernels")]
    pub kernels: String,
    /// `d` of a learned embedding (20 in the paper).
    #[serde(default = "default_embedding_dim")]
    pub embedding_dim: usize,
    /// Class probabilities: softmax (eq. 14) or radial (eq. 15-16).
    #[serde(default)]
    pub class_probability: ClassProbability,
    /// CT/FM: dimension of the sinusoidal time embedding.
    #[serde(default = "default_time_dim")]
    pub time_dim: usize,
    /// CT/FM: `t` is embedded as `time_scale * t` (not given by the paper).
    #[serde(default = "default_time_scale")]
    pub time_scale: f64,
    /// FM: standard deviation `sigma` of the interpolation noise.
    #[serde(default)]
    pub fm_sigma: f64,
    /// CT: the learnable noise schedule (Appendix B).
    #[serde(default)]
    pub ct_schedule: LearnableScheduleConfig,
    /// Initialisation of a learned embedding; when absent, `prototype` for
    /// `embedding = "prototype"`, else `orthogonal` when `d >= m` and `normal` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_init: Option<EmbeddingInit>,
    /// Back-propagation baseline: the initial `alpha_t = tanh(w_t)` of every
    /// block, in (-1, 1) (the paper does not say; default 0.5).
    #[serde(default = "default_alpha_init")]
    pub alpha_init: f64,
    /// Adjoint baseline: Euler steps of the ODE solve in training (1000 in the paper).
    #[serde(default = "default_steps")]
    pub ode_steps: usize,
    /// Initialisation of `f_out`; when absent, `embedding` for the
    /// back-propagation baseline and `uniform` otherwise (the paper does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_init: Option<HeadInit>,
}

fn default_alpha_init() -> f64 {
    0.5
}

fn default_embedding_dim() -> usize {
    20
}
fn default_time_dim() -> usize {
    64
}
fn default_time_scale() -> f64 {
    1000.0
}

fn default_dropout() -> f64 {
    0.2
}
fn default_kernels() -> String {
    "fast".into()
}

/// `[train]`: optimisation (Table 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Number of epochs; one DT epoch is `T` passes over the data.
    pub epochs: usize,
    /// Minibatch size.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW (decoupled) weight decay.
    pub weight_decay: f64,
    /// The denoising weight `eta` of eq. 61.
    pub eta: f64,
    /// The root seed; initialisation, shuffling, noise and dropout use sub-streams of it.
    #[serde(default)]
    pub seed: u64,
    /// The order in which blocks are trained.
    #[serde(default = "default_order")]
    pub order: TrainOrder,
    /// `adamw` (decoupled decay; Table 3 for DT) or `adam` (decay as an L2
    /// term in the gradient, PyTorch's Adam; Table 3 for CT and FM).
    #[serde(default = "default_optimizer")]
    pub optimizer: Optimizer,
    /// Learning rate of a learned `W_embed`; when absent, `lr` (the paper
    /// gives one rate for everything). Its decoupled decay scales with it,
    /// and 0 keeps the embedding at its initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_lr: Option<f64>,
}

/// The optimizer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// AdamW.
    Adamw,
    /// Adam with L2 weight decay.
    Adam,
}

fn default_optimizer() -> Optimizer {
    Optimizer::Adamw
}

/// How CT and FM integrate from t = 0 to t = 1 at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// CT: the eq. 3 update on the grid `k / steps`.
    Eq3,
    /// Euler steps of the probability-flow ODE (CT) or the flow (FM).
    Euler,
    /// Heun steps.
    Heun,
}

impl Sampler {
    /// The ODE solver, if this is one.
    pub fn solver(self) -> Option<OdeSolver> {
        match self {
            Sampler::Eq3 => None,
            Sampler::Euler => Some(OdeSolver::Euler),
            Sampler::Heun => Some(OdeSolver::Heun),
        }
    }
}

fn default_order() -> TrainOrder {
    TrainOrder::Sequential
}

/// `[eval]`: how accuracy is measured after each epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Number of stochastic inference runs averaged (5 in the paper).
    #[serde(default = "default_runs")]
    pub runs: usize,
    /// Also report deterministic inference (eps = 0).
    #[serde(default = "default_true")]
    pub deterministic: bool,
    /// Rows per evaluation forward pass, the inference runs of a batch of
    /// images stacked together (so `batch_size / runs` images per pass).
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Train accuracy is measured on the first N training examples (0: skip).
    #[serde(default = "default_train_subset")]
    pub train_subset: usize,
    /// Evaluate every N epochs (and always after the last one).
    #[serde(default = "default_one")]
    pub every: usize,
    /// CT/FM: integration steps from t = 0 to 1 (1000 in the paper).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// CT/FM: the integrator (`eq3` for CT only).
    #[serde(default = "default_sampler")]
    pub sampler: Sampler,
}

fn default_steps() -> usize {
    1000
}
fn default_sampler() -> Sampler {
    Sampler::Eq3
}

fn default_runs() -> usize {
    5
}
fn default_true() -> bool {
    true
}
fn default_eval_batch() -> usize {
    1000
}
fn default_train_subset() -> usize {
    10_000
}
fn default_one() -> usize {
    1
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            runs: default_runs(),
            deterministic: true,
            batch_size: default_eval_batch(),
            train_subset: default_train_subset(),
            every: 1,
            steps: default_steps(),
            sampler: default_sampler(),
        }
    }
}

/// `[checkpoint]`: what the run folder keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// How many epoch checkpoints to keep (the newest ones); 0 keeps all.
    #[serde(default = "default_keep")]
    pub keep_last: usize,
}

fn default_keep() -> usize {
    2
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { keep_last: default_keep() }
    }
}

/// A run configuration as written in a TOML or JSON file; unknown fields are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Data set.
    pub data: DataConfig,
    /// Network.
    pub model: ModelConfig,
    /// Noise schedule (cosine by default).
    #[serde(default)]
    pub schedule: ScheduleSpec,
    /// Optimisation.
    pub train: OptimConfig,
    /// Evaluation.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Checkpoints.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

/// A configuration that passed [`Config::validate`].
#[derive(Debug, Clone)]
pub struct ValidConfig {
    raw: Config,
    schedule: DiscreteSchedule,
    kernels: Kernels,
}

impl ValidConfig {
    /// The configuration as given (and as written to the run folder).
    pub fn raw(&self) -> &Config {
        &self.raw
    }
    /// The validated schedule.
    pub fn schedule(&self) -> &DiscreteSchedule {
        &self.schedule
    }
    /// The kernels to run the image path with.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }
}

fn positive(name: &'static str, v: f64) -> Result<(), TrainError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(TrainError::InvalidConfig { field: name, reason: format!("must be a finite number > 0, got {v}") })
    }
}

fn non_negative(name: &'static str, v: f64) -> Result<(), TrainError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(TrainError::InvalidConfig { field: name, reason: format!("must be a finite number >= 0, got {v}") })
    }
}

fn at_least(name: &'static str, v: usize, min: usize) -> Result<(), TrainError> {
    if v >= min {
        Ok(())
    } else {
        Err(TrainError::InvalidConfig { field: name, reason: format!("must be at least {min}, got {v}") })
    }
}

impl Config {
    /// Checks every rule once and builds the schedule.
    pub fn validate(self) -> Result<ValidConfig, TrainError> {
        at_least("model.blocks", self.model.blocks, 1)?;
        at_least("train.epochs", self.train.epochs, 1)?;
        at_least("train.batch_size", self.train.batch_size, 2)?;
        positive("train.lr", self.train.lr)?;
        non_negative("train.weight_decay", self.train.weight_decay)?;
        non_negative("train.eta", self.train.eta)?;
        if !(0.0..1.0).contains(&self.model.dropout) {
            return Err(TrainError::InvalidConfig {
                field: "model.dropout",
                reason: format!("must lie in [0, 1), got {}", self.model.dropout),
            });
        }
        at_least("eval.runs", self.eval.runs, 1)?;
        at_least("eval.batch_size", self.eval.batch_size, 1)?;
        at_least("eval.every", self.eval.every, 1)?;
        let kernels = match self.model.kernels.as_str() {
            "fast" => Kernels::Fast,
            "stock" => Kernels::Stock,
            other => {
                return Err(TrainError::InvalidConfig {
                    field: "model.kernels",
                    reason: format!("must be \"fast\" or \"stock\", got {other:?}"),
                })
            }
        };
        at_least("eval.steps", self.eval.steps, 1)?;
        at_least("model.embedding_dim", self.model.embedding_dim, 1)?;
        positive("model.time_scale", self.model.time_scale)?;
        non_negative("model.fm_sigma", self.model.fm_sigma)?;
        if self.model.time_dim == 0 || self.model.time_dim % 2 != 0 {
            return Err(TrainError::InvalidConfig { field: "model.time_dim", reason: format!("must be even and positive, got {}", self.model.time_dim) });
        }
        self.model
            .class_probability
            .validate()
            .map_err(|e| TrainError::InvalidConfig { field: "model.class_probability", reason: e.to_string() })?;
        if self.model.method == Method::Fm && self.eval.sampler == Sampler::Eq3 {
            return Err(TrainError::InvalidConfig { field: "eval.sampler", reason: "NoProp-FM integrates with \"euler\" or \"heun\"; \"eq3\" is for CT".into() });
        }
        if !(self.model.alpha_init.is_finite() && self.model.alpha_init.abs() < 1.0) {
            return Err(TrainError::InvalidConfig { field: "model.alpha_init", reason: format!("must lie in (-1, 1), got {}", self.model.alpha_init) });
        }
        at_least("model.ode_steps", self.model.ode_steps, 1)?;
        if self.model.method == Method::Adjoint && self.eval.sampler != Sampler::Euler {
            return Err(TrainError::InvalidConfig { field: "eval.sampler", reason: "the adjoint baseline integrates with \"euler\"".into() });
        }
        self.check_embedding_init()?;
        if let Some(lr) = self.train.embedding_lr {
            non_negative("train.embedding_lr", lr)?;
            if self.model.embedding == Embedding::OneHot {
                return Err(TrainError::InvalidConfig { field: "train.embedding_lr", reason: "applies to learned embeddings only; \"one-hot\" is fixed".into() });
            }
        }
        let (_, h, w) = self.data.dataset.shape();
        if h % 4 != 0 || w % 4 != 0 {
            return Err(TrainError::InvalidConfig { field: "data.dataset", reason: "images must be a multiple of 4 wide".into() });
        }
        let schedule = self
            .schedule
            .build(self.model.blocks)
            .map_err(|e| TrainError::InvalidConfig { field: "schedule", reason: e.to_string() })?;
        Ok(ValidConfig { raw: self, schedule, kernels })
    }

    /// The latent dimension `d` this config gives `W_embed`.
    pub fn latent_dim(&self) -> usize {
        let (c, h, w) = self.data.dataset.shape();
        match self.model.embedding {
            Embedding::OneHot => self.data.dataset.num_classes(),
            Embedding::Learned => self.model.embedding_dim,
            Embedding::Prototype => c * h * w,
        }
    }

    /// The initialisation of `f_out`.
    pub fn head_init(&self) -> HeadInit {
        self.model.head_init.unwrap_or(match self.model.method {
            Method::Backprop => HeadInit::Embedding,
            _ => HeadInit::Uniform,
        })
    }

    /// The initialisation of a learned embedding (`None` for one-hot).
    pub fn embedding_init(&self) -> Option<EmbeddingInit> {
        match self.model.embedding {
            Embedding::OneHot => None,
            Embedding::Prototype => Some(self.model.embedding_init.unwrap_or(EmbeddingInit::Prototype)),
            Embedding::Learned => Some(self.model.embedding_init.unwrap_or(if self.latent_dim() >= self.data.dataset.num_classes() {
                EmbeddingInit::Orthogonal
            } else {
                EmbeddingInit::Normal
            })),
        }
    }

    fn check_embedding_init(&self) -> Result<(), TrainError> {
        let bad = |reason: String| Err(TrainError::InvalidConfig { field: "model.embedding_init", reason });
        let (c, h, w) = self.data.dataset.shape();
        let (d, m) = (self.latent_dim(), self.data.dataset.num_classes());
        match (self.model.embedding, self.model.embedding_init) {
            (Embedding::OneHot, Some(_)) => bad("applies to learned embeddings only; \"one-hot\" is fixed".into()),
            (_, Some(EmbeddingInit::Orthogonal)) if d < m => bad(format!("\"orthogonal\" needs d >= m, got d = {d} < {m}")),
            (_, Some(EmbeddingInit::Prototype)) if d != c * h * w => bad(format!("\"prototype\" needs d = C*H*W = {}, got d = {d}", c * h * w)),
            _ => Ok(()),
        }
    }

    /// The paper's NoProp-DT settings for `dataset` (Table 3), one-hot embedding.
    pub fn paper_dt(dataset: DatasetKind) -> Self {
        let epochs = match dataset {
            DatasetKind::Mnist => 100,
            _ => 150,
        };
        Config {
            data: DataConfig { dataset, dir: None, train_limit: 0, test_limit: 0 },
            model: ModelConfig {
                method: Method::Dt,
                blocks: 10,
                embedding: Embedding::OneHot,
                dropout: 0.2,
                kernels: default_kernels(),
                embedding_dim: default_embedding_dim(),
                class_probability: ClassProbability::Softmax,
                time_dim: default_time_dim(),
                time_scale: default_time_scale(),
                fm_sigma: 0.0,
                ct_schedule: LearnableScheduleConfig::default(),
                embedding_init: None,
                alpha_init: default_alpha_init(),
                ode_steps: default_steps(),
                head_init: None,
            },
            schedule: ScheduleSpec::default(),
            train: OptimConfig {
                epochs,
                batch_size: 128,
                lr: 1e-3,
                weight_decay: 1e-3,
                eta: 0.1,
                seed: 0,
                order: TrainOrder::Sequential,
                optimizer: Optimizer::Adamw,
                embedding_lr: None,
            },
            eval: EvalConfig::default(),
            checkpoint: CheckpointConfig::default(),
        }
    }

    /// The paper's NoProp-CT or NoProp-FM settings for `dataset` (Table 3):
    /// Adam (L2 decay 1e-3), lr 1e-3, batch 128, eta 1; 100 / 500 / 1000 epochs.
    pub fn paper_continuous(dataset: DatasetKind, method: Method) -> Self {
        let mut c = Self::paper_dt(dataset);
        c.model.method = method;
        c.model.blocks = 1;
        c.train.eta = 1.0;
        c.train.optimizer = Optimizer::Adam;
        c.train.epochs = match dataset {
            DatasetKind::Mnist => 100,
            DatasetKind::Cifar10 => 500,
            DatasetKind::Cifar100 => 1000,
        };
        c.eval.sampler = if method == Method::Fm { Sampler::Euler } else { Sampler::Eq3 };
        c
    }

    /// The back-propagation baseline for `dataset`: NoProp-DT's blocks and
    /// Table 3 settings, trained end to end (eq. 17-19).
    pub fn paper_backprop(dataset: DatasetKind) -> Self {
        let mut c = Self::paper_dt(dataset);
        c.model.method = Method::Backprop;
        c
    }

    /// The adjoint baseline for `dataset` (Table 3): the continuous-time
    /// network, AdamW lr 1e-3 and decay 1e-3, 1000 Euler steps in training
    /// and inference, 2 epochs (MNIST) or 4 (CIFAR).
    pub fn paper_adjoint(dataset: DatasetKind) -> Self {
        let mut c = Self::paper_continuous(dataset, Method::Adjoint);
        c.train.optimizer = Optimizer::Adamw;
        c.train.epochs = if dataset == DatasetKind::Mnist { 2 } else { 4 };
        c.eval.sampler = Sampler::Euler;
        c
    }
}

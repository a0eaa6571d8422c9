//! The configuration file's schema: what a TOML or JSON config may say,
//! deserialised with `deny_unknown_fields` and checked by
//! [`RawConfig::validate`](crate::config) into a [`Config`](crate::Config).
//!
//! Each method's fields live in the `[method]` table, tagged by `kind`, so a
//! field that does not apply to the chosen method is an unknown field there
//! and is rejected by name. The class embedding is a table tagged the same
//! way. This module only describes the file; it checks nothing and imports
//! nothing from the rest of the crate.
//!
//! ```toml
//! [data]
//! dataset = "mnist"
//!
//! [model]
//! embedding = { kind = "learned", dim = 20 }
//! dropout = 0.2
//!
//! [method]
//! kind = "dt"
//! blocks = 10
//! eta = 0.1
//!
//! [train]
//! epochs = 100
//! batch_size = 128
//! lr = 1e-3
//! weight_decay = 1e-3
//! ```

use std::path::PathBuf;

use noprop_core::{ClassProbability, LearnableScheduleConfig, OdeSolver, ScheduleSpec};
use noprop_data::DatasetKind;
use noprop_models::Kernels;
use serde::{Deserialize, Serialize};

/// A run configuration as written in a TOML or JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[data]`: the data set and where it lives.
    pub data: RawData,
    /// `[model]`: what every method's network shares.
    #[serde(default)]
    pub model: RawModel,
    /// `[method]`: the training method and its own settings.
    pub method: RawMethod,
    /// `[train]`: optimisation (Table 3).
    pub train: RawTrain,
    /// `[eval]`: how accuracy is measured after each epoch.
    #[serde(default)]
    pub eval: RawEval,
    /// `[checkpoint]`: what the run folder keeps.
    #[serde(default)]
    pub checkpoint: RawCheckpoint,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    /// `mnist`, `cifar10` or `cifar100`.
    #[serde(with = "dataset_name")]
    pub dataset: DatasetKind,
    /// The data folder; when absent, `$NOPROP_DATA/<dataset>` or `./data/<dataset>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Train on the first N training examples only (at least 1; absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test examples only (at least 1; absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_limit: Option<usize>,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// The class embedding `W_embed` (spec section 6).
    #[serde(default)]
    pub embedding: RawEmbedding,
    /// Dropout probability of the image path (0.2 in Figure 6).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// `fast` (hand-written CPU kernels) or `stock` (candle's ops).
    #[serde(default, with = "kernels_name")]
    pub kernels: Kernels,
    /// Class probabilities: softmax (eq. 14) or radial (eq. 15-16).
    #[serde(default)]
    pub class_probability: ClassProbability,
    /// Initialisation of `f_out`; when absent, `embedding` for the
    /// back-propagation baseline and `uniform` otherwise. The paper does not
    /// say: PyTorch's default Linear initialisation (`uniform`) is the
    /// literal reading. Every method honours it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_init: Option<HeadInit>,
}

impl Default for RawModel {
    fn default() -> Self {
        Self {
            embedding: RawEmbedding::OneHot,
            dropout: default_dropout(),
            kernels: Kernels::Fast,
            class_probability: ClassProbability::Softmax,
            head_init: None,
        }
    }
}

/// `[model.embedding]`: the class embedding, tagged by `kind`.
///
/// It is read through a checked table of every key rather than serde's tagged-enum
/// support, which lets a unit variant (`one-hot`) accept any extra key
/// silently (serde-rs/serde#2123): here a key that does not apply to the
/// kind is an error that names it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", try_from = "EmbeddingTable")]
pub enum RawEmbedding {
    /// `W_embed = I_m`, fixed, `d = m`.
    #[default]
    OneHot,
    /// Learned, `d = dim` ("dim=20" in the paper).
    Learned {
        /// The latent dimension `d`.
        #[serde(default = "default_embedding_dim")]
        dim: usize,
        /// How it starts; when absent, `orthogonal` when `d >= m`, else `normal`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init: Option<EmbeddingInit>,
        /// Its own learning rate; when absent, `train.lr`. 0 freezes it.
        /// The paper trains `W_embed` with everything else at Table 3's
        /// rate, so absent is the literal reading.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr: Option<f64>,
        /// Whether the denoising (DT, CT) or flow (FM) term's target `u_y`
        /// passes its gradient to `W_embed`. The paper's losses (eq. 8, 9,
        /// 13) differentiate `||uhat - u_y||^2` in `u_y` too, so `true` is
        /// the literal reading and the default; `false` detaches `u_y` in
        /// that target only, while `W_embed` still learns through the
        /// cross-entropy, the KL term, the noisy input `z` and the
        /// softmax-weighted `uhat`.
        #[serde(default = "default_true")]
        target_grad: bool,
    },
    /// Learned, `d = C*H*W`, initialised from training images.
    Prototype {
        /// How it starts; when absent, `prototype`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init: Option<EmbeddingInit>,
        /// Its own learning rate; when absent, `train.lr` (the literal
        /// reading). 0 freezes it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr: Option<f64>,
        /// As for `learned`: `true` (the paper's loss, the default) lets the
        /// denoising or flow target `u_y` pass its gradient to `W_embed`.
        #[serde(default = "default_true")]
        target_grad: bool,
    },
}

/// Every key `[model.embedding]` may hold, before the kind says which apply.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingTable {
    kind: String,
    dim: Option<usize>,
    init: Option<EmbeddingInit>,
    lr: Option<f64>,
    target_grad: Option<bool>,
}

impl TryFrom<EmbeddingTable> for RawEmbedding {
    type Error = String;
    fn try_from(t: EmbeddingTable) -> Result<Self, String> {
        let given: Vec<&str> = [
            ("dim", t.dim.is_some()),
            ("init", t.init.is_some()),
            ("lr", t.lr.is_some()),
            ("target_grad", t.target_grad.is_some()),
        ]
        .iter()
        .filter(|(_, g)| *g)
        .map(|(k, _)| *k)
        .collect();
        let reject = |allowed: &[&str]| match given.iter().find(|k| !allowed.contains(k)) {
            Some(k) => Err(format!(
                "model.embedding: `{k}` does not apply to kind = \"{}\" (it takes {})",
                t.kind,
                if allowed.is_empty() {
                    "no other key".to_string()
                } else {
                    allowed.join(", ")
                }
            )),
            None => Ok(()),
        };
        match t.kind.as_str() {
            "one-hot" => reject(&[]).map(|_| RawEmbedding::OneHot),
            "learned" => {
                reject(&["dim", "init", "lr", "target_grad"]).map(|_| RawEmbedding::Learned {
                    dim: t.dim.unwrap_or_else(default_embedding_dim),
                    init: t.init,
                    lr: t.lr,
                    target_grad: t.target_grad.unwrap_or(true),
                })
            }
            "prototype" => {
                reject(&["init", "lr", "target_grad"]).map(|_| RawEmbedding::Prototype {
                    init: t.init,
                    lr: t.lr,
                    target_grad: t.target_grad.unwrap_or(true),
                })
            }
            other => Err(format!(
                "model.embedding: unknown kind {other:?}, expected one-hot, learned or prototype"
            )),
        }
    }
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

/// How the blocks of NoProp-DT are visited during an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOrder {
    /// Algorithm 1: for t = 1..T, one full pass over the data for block t.
    #[default]
    Sequential,
    /// One pass over the data per epoch that trains every block on each
    /// minibatch (each on its own noisy `z_{t-1}`), the head after each
    /// block: every parameter gets as many updates as in `Sequential`.
    Fused,
}

/// How NoProp-CT integrates from t = 0 to t = 1 at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CtSampler {
    /// The eq. 3 update on the grid `k / steps`.
    #[default]
    Eq3,
    /// The probability-flow ODE, with this solver.
    Flow(OdeSolver),
}

impl std::str::FromStr for CtSampler {
    type Err = String;
    /// `eq3`, or the name of an [`OdeSolver`] (`euler`, `heun`).
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "eq3" {
            return Ok(CtSampler::Eq3);
        }
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map(CtSampler::Flow)
            .map_err(|_| format!("unknown sampler {s:?}: expected eq3, euler or heun"))
    }
}

impl std::fmt::Display for CtSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtSampler::Eq3 => f.write_str("eq3"),
            CtSampler::Flow(solver) => match serde_json::to_value(solver) {
                Ok(serde_json::Value::String(name)) => f.write_str(&name),
                _ => write!(f, "{solver:?}"),
            },
        }
    }
}

impl Serialize for CtSampler {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CtSampler {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How NoProp-CT and NoProp-FM draw the times `t_i` of a minibatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSampling {
    /// One `t_i ~ U(0, 1)` per example, independently (Algorithms 2 and 3:
    /// the literal reading, and the default).
    #[default]
    Uniform,
    /// `t_i = (u + i / B) mod 1` with one `u ~ U(0, 1)` per minibatch: every
    /// `t_i` is still `U(0, 1)`, but the batch covers `[0, 1)` evenly, which
    /// lowers the variance of the loss estimate (the low-discrepancy sampler
    /// of Kingma et al. 2021, Variational Diffusion Models).
    Stratified,
}

/// How NoProp-CT's learnable schedule is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleTraining {
    /// The schedule's parameters get the gradient of the loss itself
    /// (spec section 8: "update theta, theta_out, the schedule parameters
    /// and W_embed together"): the literal reading, and the default.
    #[default]
    Gradient,
    /// Variance minimisation (Kingma et al. 2021, Variational Diffusion
    /// Models, section 5.3 and its appendix): the expected denoising loss
    /// depends on the schedule only through its endpoints, so the interior
    /// parameters (`schedule.b1`, `schedule.w1`, `schedule.w2`) get the
    /// gradient of `mean_i L_i^2`, the squared per-example denoising terms,
    /// which lowers the variance of the loss estimate; the endpoints
    /// (`schedule.gamma0`, `schedule.gamma_gap`) and the network keep the
    /// loss's own gradient. Costs a second backward pass per step.
    Variance,
}

/// `[method]`: the training method, tagged by `kind`, with its own fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawMethod {
    /// NoProp-DT, Algorithm 1.
    Dt {
        /// Number of blocks `T` (10 in the paper).
        blocks: usize,
        /// The denoising weight `eta` of eq. 61.
        eta: f64,
        /// The order in which blocks are trained.
        #[serde(default)]
        order: TrainOrder,
        /// The noise schedule (cosine by default).
        #[serde(default)]
        schedule: ScheduleSpec,
    },
    /// NoProp-CT, Algorithm 2.
    Ct {
        /// The denoising weight `eta`.
        eta: f64,
        /// Dimension of the sinusoidal time embedding.
        #[serde(default = "default_time_dim")]
        time_dim: usize,
        /// `t` is embedded as `time_scale * t` (not given by the paper).
        #[serde(default = "default_time_scale")]
        time_scale: f64,
        /// The learnable noise schedule (Appendix B).
        #[serde(default)]
        schedule: LearnableScheduleConfig,
        /// The integrator at inference: `eq3`, `euler` or `heun`.
        #[serde(default)]
        sampler: CtSampler,
        /// Integration steps from t = 0 to 1 at inference (1000 in the paper).
        #[serde(default = "default_steps")]
        steps: usize,
        /// How the training times `t_i` are drawn: `uniform` (the paper's,
        /// default) or `stratified`.
        #[serde(default)]
        t_sampling: TimeSampling,
        /// How the learnable schedule is trained: `gradient` (the paper's,
        /// default) or `variance`.
        #[serde(default)]
        schedule_training: ScheduleTraining,
    },
    /// NoProp-FM, Algorithm 3.
    Fm {
        /// Standard deviation `sigma` of the interpolation noise.
        #[serde(default)]
        sigma: f64,
        /// Dimension of the sinusoidal time embedding.
        #[serde(default = "default_time_dim")]
        time_dim: usize,
        /// `t` is embedded as `time_scale * t`.
        #[serde(default = "default_time_scale")]
        time_scale: f64,
        /// The ODE solver at inference.
        #[serde(default)]
        solver: OdeSolver,
        /// Integration steps at inference (1000 in the paper).
        #[serde(default = "default_steps")]
        steps: usize,
        /// How the training times `t_i` are drawn: `uniform` (the paper's,
        /// default) or `stratified`.
        #[serde(default)]
        t_sampling: TimeSampling,
    },
    /// Baseline: the DT blocks chained by eq. 17-19, trained end to end by back-propagation.
    Backprop {
        /// Number of blocks `T`.
        blocks: usize,
        /// The initial `alpha_t = tanh(w_t)` of every block, in (-1, 1)
        /// (the paper does not say).
        #[serde(default = "default_alpha_init")]
        alpha_init: f64,
    },
    /// Baseline: a neural ODE on the continuous-time network, gradients by the adjoint method.
    Adjoint {
        /// Dimension of the sinusoidal time embedding.
        #[serde(default = "default_time_dim")]
        time_dim: usize,
        /// `t` is embedded as `time_scale * t`.
        #[serde(default = "default_time_scale")]
        time_scale: f64,
        /// Euler steps of the forward and adjoint solves in training (1000 in the paper).
        #[serde(default = "default_steps")]
        train_steps: usize,
        /// Euler steps at inference (1000 in the paper).
        #[serde(default = "default_steps")]
        steps: usize,
    },
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrain {
    /// Number of epochs; one DT epoch is `T` passes over the data.
    pub epochs: usize,
    /// Minibatch size.
    pub batch_size: usize,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay (decoupled for `adamw`, an L2 term for `adam`).
    pub weight_decay: f64,
    /// The root seed; every random stream is derived from it.
    #[serde(default)]
    pub seed: u64,
    /// The optimizer family.
    #[serde(default)]
    pub optimizer: OptimizerKind,
}

/// The optimizer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW, decoupled decay (Table 3 for DT and the baselines).
    #[default]
    Adamw,
    /// Adam with the decay as an L2 term in the gradient, PyTorch's `Adam`
    /// (Table 3 for CT and FM).
    Adam,
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEval {
    /// Number of stochastic inference runs averaged (5 in the paper).
    #[serde(default = "default_runs")]
    pub runs: usize,
    /// Also report deterministic inference (eps = 0) where the sampler has noise.
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
}

impl Default for RawEval {
    fn default() -> Self {
        Self {
            runs: default_runs(),
            deterministic: true,
            batch_size: default_eval_batch(),
            train_subset: default_train_subset(),
            every: 1,
        }
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheckpoint {
    /// How many epoch checkpoints to keep (the newest ones); 0 keeps all.
    #[serde(default = "default_keep")]
    pub keep_last: usize,
}

impl Default for RawCheckpoint {
    fn default() -> Self {
        Self {
            keep_last: default_keep(),
        }
    }
}

fn default_dropout() -> f64 {
    0.2
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
fn default_steps() -> usize {
    1000
}
fn default_alpha_init() -> f64 {
    0.5
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
fn default_keep() -> usize {
    2
}

mod dataset_name {
    use noprop_data::DatasetKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &DatasetKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.name())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DatasetKind, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

mod kernels_name {
    use noprop_models::Kernels;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &Kernels, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(k)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Kernels, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl RawConfig {
    /// The paper's NoProp-DT settings for `dataset` (Table 3), one-hot embedding.
    pub fn paper_dt(dataset: DatasetKind) -> Self {
        RawConfig {
            data: RawData {
                dataset,
                dir: None,
                train_limit: None,
                test_limit: None,
            },
            model: RawModel::default(),
            method: RawMethod::Dt {
                blocks: 10,
                eta: 0.1,
                order: TrainOrder::Sequential,
                schedule: ScheduleSpec::default(),
            },
            train: RawTrain {
                epochs: if dataset == DatasetKind::Mnist {
                    100
                } else {
                    150
                },
                batch_size: 128,
                lr: 1e-3,
                weight_decay: 1e-3,
                seed: 0,
                optimizer: OptimizerKind::Adamw,
            },
            eval: RawEval::default(),
            checkpoint: RawCheckpoint::default(),
        }
    }

    /// The paper's NoProp-CT settings (Table 3): Adam (L2 decay 1e-3), lr
    /// 1e-3, batch 128, eta 1; 100 / 500 / 1000 epochs; the eq. 3 sampler.
    pub fn paper_ct(dataset: DatasetKind) -> Self {
        let mut c = Self::paper_continuous(dataset);
        c.method = RawMethod::Ct {
            eta: 1.0,
            time_dim: default_time_dim(),
            time_scale: default_time_scale(),
            schedule: LearnableScheduleConfig::default(),
            sampler: CtSampler::Eq3,
            steps: default_steps(),
            t_sampling: TimeSampling::Uniform,
            schedule_training: ScheduleTraining::Gradient,
        };
        c
    }

    /// The paper's NoProp-FM settings (Table 3), as [`Self::paper_ct`], Euler steps at inference.
    pub fn paper_fm(dataset: DatasetKind) -> Self {
        let mut c = Self::paper_continuous(dataset);
        c.method = RawMethod::Fm {
            sigma: 0.0,
            time_dim: default_time_dim(),
            time_scale: default_time_scale(),
            solver: OdeSolver::Euler,
            steps: default_steps(),
            t_sampling: TimeSampling::Uniform,
        };
        c
    }

    fn paper_continuous(dataset: DatasetKind) -> Self {
        let mut c = Self::paper_dt(dataset);
        c.train.optimizer = OptimizerKind::Adam;
        c.train.epochs = match dataset {
            DatasetKind::Mnist => 100,
            DatasetKind::Cifar10 => 500,
            _ => 1000,
        };
        c
    }

    /// The back-propagation baseline for `dataset`: NoProp-DT's blocks and
    /// Table 3 settings, trained end to end (eq. 17-19).
    pub fn paper_backprop(dataset: DatasetKind) -> Self {
        let mut c = Self::paper_dt(dataset);
        c.method = RawMethod::Backprop {
            blocks: 10,
            alpha_init: default_alpha_init(),
        };
        c
    }

    /// The adjoint baseline for `dataset` (Table 3): the continuous-time
    /// network, AdamW lr 1e-3 and decay 1e-3, 1000 Euler steps in training
    /// and inference, 2 epochs (MNIST) or 4 (CIFAR).
    pub fn paper_adjoint(dataset: DatasetKind) -> Self {
        let mut c = Self::paper_dt(dataset);
        c.method = RawMethod::Adjoint {
            time_dim: default_time_dim(),
            time_scale: default_time_scale(),
            train_steps: default_steps(),
            steps: default_steps(),
        };
        c.train.epochs = if dataset == DatasetKind::Mnist { 2 } else { 4 };
        c
    }
}

/// Where each field of the configuration format before version 0.2 (one
/// flat `[model]` table for every method) lives now: `(old, new)`.
pub const MOVED_FIELDS: &[(&str, &str)] = &[
    ("model.method", "method.kind"),
    ("model.blocks", "method.blocks (dt, backprop)"),
    ("model.embedding = \"...\"", "model.embedding.kind"),
    ("model.embedding_dim", "model.embedding.dim"),
    ("model.embedding_init", "model.embedding.init"),
    ("train.embedding_lr", "model.embedding.lr"),
    ("model.time_dim", "method.time_dim (ct, fm, adjoint)"),
    ("model.time_scale", "method.time_scale (ct, fm, adjoint)"),
    ("model.fm_sigma", "method.sigma (fm)"),
    ("model.ct_schedule", "method.schedule (ct)"),
    ("model.alpha_init", "method.alpha_init (backprop)"),
    ("model.ode_steps", "method.train_steps (adjoint)"),
    ("schedule", "method.schedule (dt)"),
    ("train.eta", "method.eta (dt, ct)"),
    ("train.order", "method.order (dt)"),
    ("eval.steps", "method.steps (ct, fm, adjoint)"),
    ("eval.sampler", "method.sampler (ct) or method.solver (fm)"),
];

/// The moved fields (see [`MOVED_FIELDS`]) that a config, as JSON, still
/// uses; empty for a config in the current format.
pub fn old_style_fields(v: &serde_json::Value) -> Vec<(&'static str, &'static str)> {
    let has = |path: &str| -> bool {
        let path = path.split(' ').next().unwrap_or(path);
        let mut cur = v;
        for key in path.split('.') {
            match cur.get(key) {
                Some(next) => cur = next,
                None => return false,
            }
        }
        true
    };
    MOVED_FIELDS
        .iter()
        .filter(|(old, _)| match *old {
            "model.embedding = \"...\"" => v
                .get("model")
                .and_then(|m| m.get("embedding"))
                .is_some_and(|e| e.is_string()),
            old => has(old),
        })
        .copied()
        .collect()
}

//! The sections of a configuration file that every method shares (`[data]`,
//! `[model]`, `[train]`, `[eval]`, `[checkpoint]`), each deserialised with
//! `deny_unknown_fields` and checked in place by its own `check`; the
//! `[method]` table belongs to the methods (see [`crate::config`]). Also the
//! size limits and the small checks every section uses.

use std::path::PathBuf;

use noprop_core::{ClassProbability, OdeSolver};
use noprop_data::DatasetKind;
use noprop_models::{EmbeddingKind, Kernels};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

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

/// `Ok(found)` when `min <= found <= max`, else an error naming `field`.
pub fn between(
    field: &'static str,
    found: usize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    if found < min {
        return Err(ConfigError::invalid(
            field,
            format!("be at least {min}"),
            found,
        ));
    }
    if found > max {
        return Err(ConfigError::invalid(
            field,
            format!("be at most {max}"),
            found,
        ));
    }
    Ok(found)
}

/// `Ok(found)` when `found` is finite and above 0 (or at least 0 with `zero_ok`).
pub fn finite(field: &'static str, found: f64, zero_ok: bool) -> Result<f64, ConfigError> {
    match (found.is_finite(), zero_ok) {
        (true, true) if found >= 0.0 => Ok(found),
        (true, false) if found > 0.0 => Ok(found),
        (_, true) => Err(ConfigError::invalid(
            field,
            "be a finite number >= 0",
            found,
        )),
        (_, false) => Err(ConfigError::invalid(field, "be a finite number > 0", found)),
    }
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    /// `mnist`, `cifar10` or `cifar100`.
    #[serde(with = "by_name")]
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

impl RawData {
    /// Checks the limits and that the Figure-6 networks (two 2x poolings) fit the images.
    pub fn check(&self) -> Result<(), ConfigError> {
        let (_, h, w) = self.dataset.shape();
        if h % 4 != 0 || w % 4 != 0 {
            let found = format!("{h}x{w} images");
            return Err(ConfigError::invalid(
                "data.dataset",
                "have a height and width that are multiples of 4",
                found,
            ));
        }
        for (field, n) in [
            ("data.train_limit", self.train_limit),
            ("data.test_limit", self.test_limit),
        ] {
            n.map(|n| between(field, n, 1, usize::MAX)).transpose()?;
        }
        Ok(())
    }
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
    #[serde(default, with = "by_name")]
    pub kernels: Kernels,
    /// Class probabilities: softmax (eq. 14) or radial (eq. 15-16).
    #[serde(default)]
    pub class_probability: ClassProbability,
    /// Initialisation of `f_out`; when absent, `embedding` for the
    /// back-propagation baseline and `uniform` otherwise (filled in by
    /// validation). The paper does not say: PyTorch's default Linear
    /// initialisation (`uniform`) is the literal reading. Every method honours it.
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

impl RawModel {
    /// Checks the section for `dataset` and resolves the embedding's
    /// initialisation when the file leaves it out.
    pub fn check(&mut self, dataset: DatasetKind) -> Result<(), ConfigError> {
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(ConfigError::invalid(
                "model.dropout",
                "lie in [0, 1)",
                self.dropout,
            ));
        }
        self.class_probability
            .validate()
            .map_err(|e| ConfigError::nested("model.class_probability", e))?;
        let (c, h, w) = dataset.shape();
        let m = dataset.num_classes();
        let d = self.embedding.kind().latent_dim(m, c * h * w);
        let (init, lr) = match &mut self.embedding {
            RawEmbedding::OneHot => return Ok(()),
            RawEmbedding::Learned { dim, init, lr, .. } => {
                between("model.embedding.dim", *dim, 1, limits::EMBEDDING_DIM)?;
                let default = if *dim >= m {
                    EmbeddingInit::Orthogonal
                } else {
                    EmbeddingInit::Normal
                };
                (init.get_or_insert(default), lr)
            }
            RawEmbedding::Prototype { init, lr, .. } => {
                (init.get_or_insert(EmbeddingInit::Prototype), lr)
            }
        };
        let rule = match *init {
            EmbeddingInit::Orthogonal if d < m => {
                Some(format!("be d >= m = {m} for orthogonal rows"))
            }
            EmbeddingInit::Prototype if d != c * h * w => {
                Some(format!("be d = C*H*W = {} for prototypes", c * h * w))
            }
            _ => None,
        };
        if let Some(rule) = rule {
            return Err(ConfigError::invalid(
                "model.embedding.init",
                rule,
                format!("{:?} with d = {d}", *init),
            ));
        }
        lr.map(|lr| finite("model.embedding.lr", lr, true))
            .transpose()?;
        Ok(())
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
        target_grad: bool,
    },
}

impl RawEmbedding {
    /// The embedding's kind, which fixes `d`.
    pub fn kind(&self) -> EmbeddingKind {
        match *self {
            RawEmbedding::OneHot => EmbeddingKind::OneHot,
            RawEmbedding::Learned { dim, .. } => EmbeddingKind::Learned { dim },
            RawEmbedding::Prototype { .. } => EmbeddingKind::Prototype,
        }
    }
    /// How a learned embedding starts (`None` for one-hot, or before validation).
    pub fn init(&self) -> Option<EmbeddingInit> {
        match *self {
            RawEmbedding::OneHot => None,
            RawEmbedding::Learned { init, .. } | RawEmbedding::Prototype { init, .. } => init,
        }
    }
    /// A learned embedding's own learning rate, if it has one.
    pub fn lr(&self) -> Option<f64> {
        match *self {
            RawEmbedding::OneHot => None,
            RawEmbedding::Learned { lr, .. } | RawEmbedding::Prototype { lr, .. } => lr,
        }
    }
    /// Whether the denoising or flow target passes its gradient to `W_embed`
    /// (always `true` for one-hot).
    pub fn target_grad(&self) -> bool {
        match *self {
            RawEmbedding::OneHot => true,
            RawEmbedding::Learned { target_grad, .. }
            | RawEmbedding::Prototype { target_grad, .. } => target_grad,
        }
    }
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
        let given = [
            ("dim", t.dim.is_some()),
            ("init", t.init.is_some()),
            ("lr", t.lr.is_some()),
            ("target_grad", t.target_grad.is_some()),
        ];
        let reject = |allowed: &[&str]| match given.iter().find(|(k, g)| *g && !allowed.contains(k))
        {
            Some((k, _)) => Err(format!(
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
        let (init, lr, target_grad) = (t.init, t.lr, t.target_grad.unwrap_or(true));
        match t.kind.as_str() {
            "one-hot" => reject(&[]).map(|_| RawEmbedding::OneHot),
            "learned" => {
                reject(&["dim", "init", "lr", "target_grad"]).map(|_| RawEmbedding::Learned {
                    dim: t.dim.unwrap_or(20),
                    init,
                    lr,
                    target_grad,
                })
            }
            "prototype" => {
                reject(&["init", "lr", "target_grad"]).map(|_| RawEmbedding::Prototype {
                    init,
                    lr,
                    target_grad,
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

/// How a continuous-time method integrates from t = 0 to t = 1 at inference
/// (also what `noprop eval --sampler` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CtSampler {
    /// NoProp-CT's eq. 3 update on the grid `k / steps`.
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

/// The sinusoidal time embedding of the continuous-time network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeEmbedding {
    /// Its dimension (even).
    pub dim: usize,
    /// `t` is embedded as `scale * t`.
    pub scale: f64,
}

impl TimeEmbedding {
    /// `t` embedded as `scale * t` in `dim` sine and cosine features.
    pub fn new(dim: usize, scale: f64) -> Self {
        Self { dim, scale }
    }
    /// Checks `method.time_dim` (even, within the limit) and `method.time_scale` (> 0).
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.dim == 0 || !self.dim.is_multiple_of(2) {
            return Err(ConfigError::invalid(
                "method.time_dim",
                "be even and positive",
                self.dim,
            ));
        }
        between("method.time_dim", self.dim, 2, limits::TIME_DIM)?;
        finite("method.time_scale", self.scale, false).map(|_| ())
    }
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

impl RawTrain {
    /// Checks every field's range.
    pub fn check(&self) -> Result<(), ConfigError> {
        between("train.epochs", self.epochs, 1, limits::EPOCHS)?;
        between("train.batch_size", self.batch_size, 2, limits::BATCH)?;
        finite("train.lr", self.lr, false)?;
        finite("train.weight_decay", self.weight_decay, true).map(|_| ())
    }
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
#[serde(deny_unknown_fields, default)]
pub struct RawEval {
    /// Number of stochastic inference runs averaged (5 in the paper).
    pub runs: usize,
    /// Also report deterministic inference (eps = 0) where the sampler has noise.
    pub deterministic: bool,
    /// Rows per evaluation forward pass, the inference runs of a batch of
    /// images stacked together (so `batch_size / runs` images per pass).
    pub batch_size: usize,
    /// Train accuracy is measured on the first N training examples (0: skip).
    pub train_subset: usize,
    /// Evaluate every N epochs (and always after the last one).
    pub every: usize,
}

impl Default for RawEval {
    fn default() -> Self {
        Self {
            runs: 5,
            deterministic: true,
            batch_size: 1000,
            train_subset: 10_000,
            every: 1,
        }
    }
}

impl RawEval {
    /// Checks every field's range.
    pub fn check(&self) -> Result<(), ConfigError> {
        between("eval.runs", self.runs, 1, limits::RUNS)?;
        between("eval.batch_size", self.batch_size, 1, limits::EVAL_BATCH)?;
        between("eval.every", self.every, 1, usize::MAX).map(|_| ())
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCheckpoint {
    /// How many epoch checkpoints to keep (the newest ones); 0 keeps all.
    pub keep_last: usize,
}

impl Default for RawCheckpoint {
    fn default() -> Self {
        Self { keep_last: 2 }
    }
}

fn default_dropout() -> f64 {
    0.2
}

/// Serde by name for the types that parse from and print their config name.
pub mod by_name {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(k: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(k)
    }
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr<Err: std::fmt::Display>,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

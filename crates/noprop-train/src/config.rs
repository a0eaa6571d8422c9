//! The run configuration: [`RawConfig`] is what a TOML or JSON file says,
//! read with `deny_unknown_fields`; [`Config`] is the same value after
//! [`RawConfig::validate`] checked every rule once and filled in the
//! defaults that depend on other fields. Nothing is copied into a second
//! shape: a `Config` dereferences to its `RawConfig`, which is what
//! `config.json` and checkpoint metadata hold.
//!
//! The `[method]` table deserialises straight into the chosen method's own
//! parameters ([`RawMethod`], tagged by `kind`), so a field that does not
//! apply to the method is an unknown field there and is rejected by name.
//! Each method's parameters live in its own module and check themselves
//! ([`MethodParams`]); this module holds the registry of methods and the
//! rules that cross sections.
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

use std::ops::Deref;

use candle_core::Device;
use noprop_data::{Dataset, DatasetKind};
use serde::{Deserialize, Serialize};

pub use crate::adjoint::AdjointParams;
pub use crate::backprop::BackpropParams;
pub use crate::ct::CtParams;
pub use crate::dt::DtParams;
use crate::error::{ConfigError, TrainError};
pub use crate::fm::FmParams;
use crate::method::Method;
pub use crate::method::{MethodParams, Setup};
use crate::sections::between;
pub use crate::sections::{
    limits, CtSampler, EmbeddingInit, HeadInit, OptimizerKind, RawCheckpoint, RawData,
    RawEmbedding, RawEval, RawModel, RawTrain, TimeEmbedding, TimeSampling,
};
pub use crate::{ct::ScheduleTraining, dt::TrainOrder};

/// A run configuration as written in a TOML or JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[data]`: the data set and where it lives.
    pub data: RawData,
    /// `[model]`: what every method's network shares.
    #[serde(default)]
    pub model: RawModel,
    /// `[method]`: the training method and its own parameters.
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

/// The registry of methods: each line is a variant of [`RawMethod`], its
/// parameters' type and its method's type (both in the method's own
/// module, the method built by `new(params, setup, device, train)`) and its
/// `kind` name.
/// Adding a method is one module and one line here; every `match` over
/// methods elsewhere is exhaustive, so the compiler lists what else to decide.
macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident($params:ty) => $method:ty = $kind:literal,)*) => {
        /// `[method]`: the training method, tagged by `kind`, with its own parameters.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind")]
        pub enum RawMethod {
            $($(#[$doc])* #[serde(rename = $kind)] $variant($params),)*
        }

        impl RawMethod {
            /// Every method's `kind`, in registry order.
            pub const KINDS: &'static [&'static str] = &[$($kind),*];

            /// This method's `kind` (the name in configs and checkpoints).
            pub fn kind(&self) -> &'static str {
                match self { $(RawMethod::$variant(_) => $kind,)* }
            }
            /// Its parameters, as every method's parameters are seen.
            pub fn params(&self) -> &dyn MethodParams {
                match self { $(RawMethod::$variant(p) => p,)* }
            }
            /// Its parameters, to change.
            pub fn params_mut(&mut self) -> &mut dyn MethodParams {
                match self { $(RawMethod::$variant(p) => p,)* }
            }
            /// The method with a fresh model; prototype embeddings are initialised
            /// from `train` (zeros when `None`, for weights that will be loaded).
            pub fn build(&self, setup: &Setup, device: &Device, train: Option<&Dataset>) -> Result<Box<dyn Method>, TrainError> {
                Ok(match self { $(RawMethod::$variant(p) => Box::new(<$method>::new(p, setup, device, train)?),)* })
            }
        }
    };
}

registry! {
    /// NoProp-DT, Algorithm 1.
    Dt(DtParams) => crate::dt::Dt = "dt",
    /// NoProp-CT, Algorithm 2.
    Ct(CtParams) => crate::ct::Ct = "ct",
    /// NoProp-FM, Algorithm 3.
    Fm(FmParams) => crate::fm::Fm = "fm",
    /// Baseline: the DT blocks chained by eq. 17-19, trained end to end by back-propagation.
    Backprop(BackpropParams) => crate::backprop::Backprop = "backprop",
    /// Baseline: a neural ODE on the continuous-time network, gradients by the adjoint method.
    Adjoint(AdjointParams) => crate::adjoint::Adjoint = "adjoint",
}

impl RawConfig {
    /// Table 3's settings for `method` on `dataset`, one-hot embedding:
    /// batch 128, lr 1e-3, decay 1e-3, and the method's epochs and
    /// optimizer ([`MethodParams::paper_training`]).
    pub fn paper(dataset: DatasetKind, method: RawMethod) -> Self {
        let (epochs, optimizer) = method.params().paper_training(dataset);
        RawConfig {
            data: RawData {
                dataset,
                dir: None,
                train_limit: None,
                test_limit: None,
            },
            model: RawModel::default(),
            method,
            train: RawTrain {
                epochs,
                batch_size: 128,
                lr: 1e-3,
                weight_decay: 1e-3,
                seed: 0,
                optimizer,
            },
            eval: RawEval::default(),
            checkpoint: RawCheckpoint::default(),
        }
    }

    /// [`Self::paper`] for NoProp-DT with its Table 3 parameters.
    pub fn paper_dt(dataset: DatasetKind) -> Self {
        Self::paper(dataset, RawMethod::Dt(DtParams::default()))
    }
    /// [`Self::paper`] for NoProp-CT (eta 1, the eq. 3 sampler).
    pub fn paper_ct(dataset: DatasetKind) -> Self {
        Self::paper(dataset, RawMethod::Ct(CtParams::default()))
    }
    /// [`Self::paper`] for NoProp-FM (Euler steps at inference).
    pub fn paper_fm(dataset: DatasetKind) -> Self {
        Self::paper(dataset, RawMethod::Fm(FmParams::default()))
    }
    /// [`Self::paper`] for the back-propagation baseline: NoProp-DT's blocks, trained end to end.
    pub fn paper_backprop(dataset: DatasetKind) -> Self {
        Self::paper(dataset, RawMethod::Backprop(BackpropParams::default()))
    }
    /// [`Self::paper`] for the adjoint baseline: 1000 Euler steps in training and inference.
    pub fn paper_adjoint(dataset: DatasetKind) -> Self {
        Self::paper(dataset, RawMethod::Adjoint(AdjointParams::default()))
    }

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

    /// Checks every rule once, section by section and then across sections,
    /// and fills in the defaults that depend on other fields (a learned
    /// embedding's `init`, `model.head_init`).
    pub fn validate(mut self) -> Result<Config, ConfigError> {
        let dataset = self.data.dataset;
        self.data.check()?;
        self.model.check(dataset)?;
        let params = self.method.params();
        params.check()?;
        if let Some(time) = params.time() {
            time.check()?;
        }
        between("method.steps", params.inference_steps(), 1, limits::STEPS)?;
        // The baselines have no denoising or flow target to detach; a
        // `target_grad = false` there would be silently ignored.
        if !self.model.embedding.target_grad() && !params.has_target() {
            return Err(ConfigError::Schema {
                reason: format!(
                    "model.embedding.target_grad = false applies to dt, ct and fm only; method {} has no denoising target",
                    self.method.kind()
                ),
            });
        }
        self.model
            .head_init
            .get_or_insert(params.default_head_init());
        self.train.check()?;
        self.eval.check()?;
        let cfg = Config(self);
        let parameters = cfg.parameters();
        if parameters > limits::PARAMETERS {
            return Err(ConfigError::ModelTooLarge {
                parameters,
                max: limits::PARAMETERS,
            });
        }
        Ok(cfg)
    }
}

/// A [`RawConfig`] that passed [`RawConfig::validate`], its dependent
/// defaults filled in; read it through `Deref`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config(RawConfig);

impl Deref for Config {
    type Target = RawConfig;
    fn deref(&self) -> &RawConfig {
        &self.0
    }
}

impl Config {
    /// The configuration as a file says it, every default filled in.
    pub fn raw(&self) -> &RawConfig {
        &self.0
    }
    /// The data set.
    pub fn dataset(&self) -> DatasetKind {
        self.data.dataset
    }
    /// What every method reads besides its own parameters.
    pub fn setup(&self) -> Setup {
        Setup {
            dataset: self.data.dataset,
            model: self.model.clone(),
            seed: self.train.seed,
        }
    }
    /// The latent dimension `d` of `W_embed`.
    pub fn latent_dim(&self) -> usize {
        self.setup().latent_dim()
    }
    /// The trainable parameters the model will have (BatchNorm statistics
    /// included), at most [`limits::PARAMETERS`].
    pub fn parameters(&self) -> u128 {
        self.method.params().parameters(&self.setup().net_shape())
    }

    /// This configuration with other inference settings (the `eval`
    /// command's `--runs`, `--steps`, `--sampler`, `--train-subset`, `--test-limit`).
    pub fn with_inference(&self, change: InferenceChange) -> Result<Config, ConfigError> {
        let mut raw = self.0.clone();
        raw.eval.runs = change.runs.unwrap_or(raw.eval.runs);
        raw.eval.train_subset = change.train_subset.unwrap_or(raw.eval.train_subset);
        raw.data.test_limit = change.test_limit.or(raw.data.test_limit);
        raw.method
            .params_mut()
            .set_inference(change.steps, change.sampler)?;
        raw.validate()
    }
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

/// The settings (dotted paths, with both values) in which two configs
/// differ, `train.epochs` aside (a resume may extend a run).
pub fn config_differences(a: &RawConfig, b: &RawConfig) -> Vec<String> {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => json_differences(&a, &b, &["train.epochs"]),
        _ => vec!["the configs cannot be compared".into()],
    }
}

/// The dotted paths (with both values) at which two JSON values differ,
/// the paths in `ignore` aside.
pub fn json_differences(
    a: &serde_json::Value,
    b: &serde_json::Value,
    ignore: &[&str],
) -> Vec<String> {
    fn walk(
        path: &str,
        a: &serde_json::Value,
        b: &serde_json::Value,
        ignore: &[&str],
        out: &mut Vec<String>,
    ) {
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
                        ignore,
                        out,
                    );
                }
            }
            _ if a != b && !ignore.contains(&path) => out.push(format!("{path} {a} -> {b}")),
            _ => {}
        }
    }
    let mut out = vec![];
    walk("", a, b, ignore, &mut out);
    out
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
    let at = |path: &str| {
        path.split(' ')
            .next()
            .unwrap_or(path)
            .split('.')
            .try_fold(v, |cur, key| cur.get(key))
    };
    MOVED_FIELDS
        .iter()
        .filter(|(old, _)| match *old {
            "model.embedding = \"...\"" => at("model.embedding").is_some_and(|e| e.is_string()),
            old => at(old).is_some(),
        })
        .copied()
        .collect()
}

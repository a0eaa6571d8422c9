//! What a training method supplies to the shared skeleton
//! ([`Trainer`](crate::Trainer)): its parameter groups, the passes of an
//! epoch, the gradients of one step, its prediction, and its tensors. The
//! skeleton owns everything the methods share: the configuration, device,
//! clock, optimizers, the epoch and evaluation loops, checkpoints and resume.
//!
//! This module also builds what several methods share (the class embedding,
//! the DT and CT models). It imports nothing above it.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use noprop_core::{Inference, NoiseRng, Stream};
use noprop_data::Dataset;
use noprop_models::{
    ClassEmbedding, CtModel, CtNetConfig, DtBlockConfig, DtModel, DtModelConfig, EmbeddingKind,
};

use crate::config::{Config, EmbeddingInit, HeadInit, MethodSpecific, TimeEmbedding, TimeSampling};
use crate::error::TrainError;
use crate::groups::{trainable, ParamGroup, EMBED};

/// One pass over the data within an epoch: its minibatch order is keyed by
/// `key`, and each minibatch trains every lane in `lanes` in turn (a lane is
/// a block `t`, or 0 for a single network), each with its own q-noise and
/// dropout streams keyed by (epoch, lane).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    /// The shuffle key of the pass.
    pub key: usize,
    /// The lanes trained on each minibatch.
    pub lanes: Vec<usize>,
}

/// The gradients of one training step.
pub struct StepGrads {
    /// The gradients (without Adam's L2 term: the skeleton adds it).
    pub grads: GradStore,
    /// `[total, cross-entropy, KL, denoising]` of the step's loss.
    pub losses: [f64; 4],
    /// The parameter groups (indices into [`Method::param_groups`]) that step.
    pub groups: Vec<usize>,
}

/// How a method's deterministic inference run is made, if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeterministicRun {
    /// Stacked with the stochastic runs, drawing from the same stream.
    Stacked,
    /// On its own, from its own stream.
    Separate,
    /// None: the sampler has no noise to switch off.
    None,
}

/// Predictions for a batch of images `[B, C, H, W]`: one run per entry of
/// `modes`, stacked (`modes.len() * B` class indices, run by run).
pub type Predict<'a> =
    Box<dyn Fn(&Tensor, &[Inference], &mut NoiseRng) -> Result<Vec<u32>, TrainError> + 'a>;

/// A training method: one small type per method implements this.
pub trait Method {
    /// The parameter groups, each stepped by its own optimizer (called once).
    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError>;
    /// The passes of one epoch; by default one pass with one lane (a single
    /// network stepped on every minibatch).
    fn epoch_plan(&self, _cfg: &Config) -> Result<Vec<Pass>, TrainError> {
        Ok(vec![Pass {
            key: 0,
            lanes: vec![0],
        }])
    }
    /// The loss of lane `lane` on a minibatch and its gradients.
    fn gradients(
        &self,
        cfg: &Config,
        lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError>;
    /// A predictor for evaluation, with whatever it precomputes once.
    fn predictor<'a>(&'a self, cfg: &'a Config) -> Result<Predict<'a>, TrainError>;
    /// How the deterministic run is made.
    fn deterministic_run(&self, cfg: &Config) -> Result<DeterministicRun, TrainError>;
    /// The model's tensors under their checkpoint names.
    fn tensors(&self) -> BTreeMap<String, Tensor>;
    /// Loads tensors saved by [`Self::tensors`].
    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), TrainError>;
    /// The class embedding `W_embed` `[m, d]`.
    fn embed(&self) -> &Tensor;
}

impl Method for Box<dyn Method> {
    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError> {
        (**self).param_groups()
    }
    fn epoch_plan(&self, cfg: &Config) -> Result<Vec<Pass>, TrainError> {
        (**self).epoch_plan(cfg)
    }
    fn gradients(
        &self,
        cfg: &Config,
        lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        (**self).gradients(cfg, lane, x, y, noise, dropout)
    }
    fn predictor<'a>(&'a self, cfg: &'a Config) -> Result<Predict<'a>, TrainError> {
        (**self).predictor(cfg)
    }
    fn deterministic_run(&self, cfg: &Config) -> Result<DeterministicRun, TrainError> {
        (**self).deterministic_run(cfg)
    }
    fn tensors(&self) -> BTreeMap<String, Tensor> {
        (**self).tensors()
    }
    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        (**self).load_tensors(tensors)
    }
    fn embed(&self) -> &Tensor {
        (**self).embed()
    }
}

/// A method's own settings in `cfg`; an error if `cfg` is another method's.
pub fn settings<S: MethodSpecific>(cfg: &Config) -> Result<&S, TrainError> {
    S::of(cfg.method()).ok_or_else(|| TrainError::MethodMismatch {
        model: S::METHOD.name(),
        config: cfg.method().method().name(),
    })
}

/// `log p(y | z)` `[B, m]` from the head's logits under the configured class probabilities.
pub fn class_log_probs(
    cfg: &Config,
    logits: &Tensor,
    w_embed: &Tensor,
) -> Result<Tensor, TrainError> {
    Ok(cfg.model().class_probability.log_probs(logits, w_embed)?)
}

/// The predicted classes of a batch: the argmax of `log p(y | z)` under the
/// configured class probabilities, from the head's `logits` `[B, m]`.
pub fn predicted_classes(
    cfg: &Config,
    logits: &Tensor,
    w_embed: &Tensor,
) -> Result<Vec<u32>, TrainError> {
    Ok(class_log_probs(cfg, logits, w_embed)?
        .argmax(candle_core::D::Minus1)?
        .to_vec1()?)
}

/// `x` `[B, ...]` repeated for `runs` stacked inference runs (`[runs * B, ...]`).
pub fn stack_runs(x: &Tensor, runs: usize) -> candle_core::Result<Tensor> {
    if runs == 1 {
        Ok(x.clone())
    } else {
        Tensor::cat(&vec![x; runs], 0)
    }
}

/// A scalar loss tensor as `f64`.
pub fn scalar(t: &Tensor) -> Result<f64, TrainError> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The class embedding a config asks for; prototypes are initialised from
/// `train` (zeros when it is `None`, for weights that will be loaded).
pub fn build_embedding(
    cfg: &Config,
    train: Option<&Dataset>,
    device: &Device,
) -> Result<ClassEmbedding, TrainError> {
    let m = cfg.dataset().num_classes();
    let d = cfg.latent_dim();
    let init = match cfg.model().embedding_init {
        None => return Ok(ClassEmbedding::one_hot(m, DType::F32, device)?),
        Some(init @ (EmbeddingInit::Orthogonal | EmbeddingInit::Normal)) => {
            let mut rng = NoiseRng::derived(cfg.train().seed, &[Stream::Init.id(), u64::MAX]);
            noprop_models::random_init(
                m,
                d,
                init == EmbeddingInit::Orthogonal,
                &mut rng,
                DType::F32,
                device,
            )?
        }
        Some(EmbeddingInit::Prototype) => match train {
            Some(ds) => {
                let idx = noprop_models::prototype_indices(&ds.images, &ds.labels, d, m, device)?;
                let rows: Vec<f32> = idx
                    .iter()
                    .flat_map(|&i| ds.image(i).iter().copied())
                    .collect();
                Tensor::from_vec(rows, (m, d), device)?
            }
            None => Tensor::zeros((m, d), DType::F32, device)?,
        },
    };
    Ok(ClassEmbedding::trainable(cfg.model().embedding, &init)?)
}

/// Whether a freshly built model should align `f_out` with `W_embed`
/// (`[model] head_init = "embedding"`). A prototype embedding built without
/// training data is all zeros, a placeholder for weights that will be
/// loaded (head included), so it is left alone: its dual basis does not exist.
pub fn aligns_head(cfg: &Config, train: Option<&Dataset>) -> bool {
    cfg.model().head_init == HeadInit::Embedding
        && (train.is_some() || cfg.model().embedding_init != Some(EmbeddingInit::Prototype))
}

/// The denoising or flow target `u_y` `[B, d]`: `u` itself, or `u`
/// detached from `W_embed` when `[model.embedding] target_grad = false`.
pub fn denoise_target(cfg: &Config, u: &Tensor) -> Tensor {
    if cfg.model().embedding_target_grad {
        u.clone()
    } else {
        u.detach()
    }
}

/// The training times `t_i` `[B]` of a minibatch, as `[method] t_sampling` says.
pub fn draw_times(
    sampling: TimeSampling,
    batch: usize,
    device: &Device,
    noise: &mut NoiseRng,
) -> Result<Tensor, TrainError> {
    Ok(match sampling {
        TimeSampling::Uniform => noprop_core::sample_t(batch, DType::F32, device, noise)?,
        TimeSampling::Stratified => {
            noprop_core::sample_t_stratified(batch, DType::F32, device, noise)?
        }
    })
}

/// The `T` blocks, head and embedding of NoProp-DT (and the back-propagation
/// baseline), initialised from the config's seed, the head aligned with the
/// embedding when `head_init = "embedding"`.
pub fn build_dt_model(
    cfg: &Config,
    blocks: usize,
    device: &Device,
    train: Option<&Dataset>,
) -> Result<DtModel, TrainError> {
    let (c, h, w) = cfg.dataset().shape();
    let embedding: EmbeddingKind = cfg.model().embedding;
    let block = DtBlockConfig {
        in_channels: c,
        height: h,
        width: w,
        latent_dim: cfg.latent_dim(),
        classes: cfg.dataset().num_classes(),
        dropout: cfg.model().dropout,
        kernels: cfg.model().kernels,
    };
    let embed = build_embedding(cfg, train, device)?;
    let model = DtModel::new(
        DtModelConfig {
            block,
            blocks,
            embedding,
        },
        embed,
        cfg.train().seed,
        DType::F32,
        device,
    )?;
    if aligns_head(cfg, train) {
        model.align_head()?;
    }
    Ok(model)
}

/// The group of everything a continuous-time model trains: the network,
/// the head and a learned embedding (named [`EMBED`]), with weight decay.
pub fn network_group(model: &CtModel) -> Result<ParamGroup, TrainError> {
    let mut vars = trainable(model.net_vars())?;
    vars.extend(trainable(model.head_vars())?);
    if let Some(v) = model.embedding().var() {
        vars.push((EMBED.into(), v.clone()));
    }
    Ok(ParamGroup { vars, decay: true })
}

/// The continuous-time network, head and embedding of NoProp-CT, NoProp-FM
/// and the adjoint baseline, the head aligned with the embedding when
/// `head_init = "embedding"`.
pub fn build_ct_model(
    cfg: &Config,
    time: TimeEmbedding,
    device: &Device,
    train: Option<&Dataset>,
) -> Result<CtModel, TrainError> {
    let (c, h, w) = cfg.dataset().shape();
    let net = CtNetConfig {
        in_channels: c,
        height: h,
        width: w,
        latent_dim: cfg.latent_dim(),
        classes: cfg.dataset().num_classes(),
        dropout: cfg.model().dropout,
        time_dim: time.dim,
        time_scale: time.scale,
        kernels: cfg.model().kernels,
    };
    let embed = build_embedding(cfg, train, device)?;
    let model = CtModel::new(net, embed, cfg.train().seed, DType::F32, device)?;
    if aligns_head(cfg, train) {
        model.align_head()?;
    }
    Ok(model)
}

//! What a training method supplies to the shared skeleton
//! ([`Trainer`](crate::Trainer)): its parameter groups, the passes of an
//! epoch, the gradients of one step, its prediction, and its tensors. The
//! skeleton owns everything the methods share: the configuration, device,
//! clock, optimizers, the epoch and evaluation loops, checkpoints and resume.
//!
//! Each method also owns its typed parameters, the `[method]` table of a
//! config ([`MethodParams`]). This module builds what several methods share
//! (the class embedding, the DT and CT models). It imports nothing above it.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use noprop_core::{Inference, NoiseRng, Stream};
use noprop_data::{Dataset, DatasetKind};
use noprop_models::{
    ClassEmbedding, CtModel, CtNetConfig, DtBlockConfig, DtModel, DtModelConfig, EmbeddingKind,
    NetShape,
};

use crate::error::{ConfigError, TrainError};
use crate::groups::{trainable, ParamGroup, EMBED};
use crate::sections::{
    CtSampler, EmbeddingInit, HeadInit, OptimizerKind, RawModel, TimeEmbedding, TimeSampling,
};

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
    /// Whether the lanes step the shared group (0) once per minibatch, with
    /// the sum of their gradients in lane order, rather than each in turn.
    pub summed: bool,
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
    fn epoch_plan(&self) -> Result<Vec<Pass>, TrainError> {
        Ok(vec![Pass {
            key: 0,
            lanes: vec![0],
            summed: false,
        }])
    }
    /// The loss of lane `lane` on a minibatch and its gradients.
    fn gradients(
        &self,
        lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError>;
    /// A predictor for evaluation, with whatever it precomputes once.
    fn predictor(&self) -> Result<Predict<'_>, TrainError>;
    /// How the deterministic run is made.
    fn deterministic_run(&self) -> DeterministicRun;
    /// The model's tensors under their checkpoint names.
    fn tensors(&self) -> BTreeMap<String, Tensor>;
    /// Loads tensors saved by [`Self::tensors`].
    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), TrainError>;
    /// The class embedding `W_embed` `[m, d]`.
    fn embed(&self) -> &Tensor;
    /// The method's own parameters, to change its inference settings
    /// ([`MethodParams::set_inference`]).
    fn params_mut(&mut self) -> &mut dyn MethodParams;
    /// The lanes that workers of a parallel run may train apart (each
    /// lane's parameter group is the group of the same index), or why
    /// this configuration cannot be split.
    fn split_lanes(&self) -> Result<Vec<usize>, String> {
        Err("only NoProp-DT's blocks train on separate workers".into())
    }
    /// Every variable of lane `lane` (parameters and buffers), by name.
    fn lane_vars(&self, _lane: usize) -> Vec<(String, Var)> {
        vec![]
    }
    /// The shared parameters' part of lane `lane`'s step, on a worker that
    /// does not train the lane: the same draws from `noise` as
    /// [`Self::gradients`] and the gradients of the shared group (0) alone,
    /// equal bit for bit to those of the whole step.
    fn shared_gradients(
        &self,
        _lane: usize,
        _y: &Tensor,
        _noise: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        Err(TrainError::Worker {
            worker: 0,
            reason: "this method has no lanes to train apart".into(),
        })
    }
}

impl Method for Box<dyn Method> {
    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError> {
        (**self).param_groups()
    }
    fn epoch_plan(&self) -> Result<Vec<Pass>, TrainError> {
        (**self).epoch_plan()
    }
    fn gradients(
        &self,
        lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        (**self).gradients(lane, x, y, noise, dropout)
    }
    fn predictor(&self) -> Result<Predict<'_>, TrainError> {
        (**self).predictor()
    }
    fn deterministic_run(&self) -> DeterministicRun {
        (**self).deterministic_run()
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
    fn params_mut(&mut self) -> &mut dyn MethodParams {
        (**self).params_mut()
    }
    fn split_lanes(&self) -> Result<Vec<usize>, String> {
        (**self).split_lanes()
    }
    fn lane_vars(&self, lane: usize) -> Vec<(String, Var)> {
        (**self).lane_vars(lane)
    }
    fn shared_gradients(
        &self,
        lane: usize,
        y: &Tensor,
        noise: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        (**self).shared_gradients(lane, y, noise)
    }
}

/// A method's own parameters: what the `[method]` table deserialises into
/// (with `kind` naming the method in [`RawMethod`](crate::config::RawMethod)'s
/// registry), checked in place, and what the rest of the crate asks of a
/// method before it is built.
pub trait MethodParams: std::fmt::Debug {
    /// Checks the method's own fields, naming each (`method.<field>`); the
    /// time embedding and the inference steps are checked for every method
    /// by [`RawConfig::validate`](crate::RawConfig::validate).
    fn check(&self) -> Result<(), ConfigError>;
    /// The number of discrete blocks `T`, or `None` for one continuous-time network.
    fn blocks(&self) -> Option<usize> {
        None
    }
    /// `T` when the blocks learn independently (NoProp-DT), so that each can
    /// be trained, timed or placed on its own; `None` otherwise.
    fn independent_blocks(&self) -> Option<usize> {
        None
    }
    /// Table 3's epochs and optimizer family for this method on `dataset`.
    fn paper_training(&self, dataset: DatasetKind) -> (usize, OptimizerKind);
    /// Network evaluations of one inference run: `T` blocks, or the solver's steps.
    fn inference_steps(&self) -> usize;
    /// The time embedding of the continuous-time network, if the method has one.
    fn time(&self) -> Option<TimeEmbedding> {
        None
    }
    /// The trainable parameters of the networks for `shape` (BatchNorm
    /// statistics included), without building anything.
    fn parameters(&self, shape: &NetShape) -> u128;
    /// How `f_out` starts when the config does not say.
    fn default_head_init(&self) -> HeadInit {
        HeadInit::Uniform
    }
    /// Whether the loss has a denoising or flow target (so that
    /// `model.embedding.target_grad` applies).
    fn has_target(&self) -> bool {
        true
    }
    /// NoProp-DT's `alpha_bar_0..=T`, recorded in checkpoints.
    fn alpha_bars(&self) -> Option<Vec<f64>> {
        None
    }
    /// Changes the inference integrator and its steps (`noprop eval
    /// --sampler/--steps`); an error where the method has no such choice.
    fn set_inference(
        &mut self,
        steps: Option<usize>,
        sampler: Option<CtSampler>,
    ) -> Result<(), ConfigError>;
}

/// The error for `--sampler`/`--steps` on a method without that choice.
pub fn no_such_sampler(method: &str, allowed: &str, found: impl std::fmt::Display) -> ConfigError {
    ConfigError::invalid(
        "method.sampler",
        format!("be {allowed} for {method}"),
        found,
    )
}

/// [`MethodParams::set_inference`] of a discrete-time model, which
/// integrates with its own blocks: only "no change" is accepted.
pub fn blocks_only(steps: Option<usize>, sampler: Option<CtSampler>) -> Result<(), ConfigError> {
    match (steps, sampler) {
        (_, Some(s)) => Err(no_such_sampler(
            "a discrete-time model",
            "its own blocks (no --sampler)",
            s,
        )),
        (Some(n), None) => Err(ConfigError::invalid(
            "method.steps",
            "be its own blocks (no --steps)",
            n,
        )),
        (None, None) => Ok(()),
    }
}

/// What every method reads from a checked config besides its own
/// parameters: the data set, `[model]` (with its defaults filled in) and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    /// The data set, which fixes the image shape and the classes.
    pub dataset: DatasetKind,
    /// `[model]`.
    pub model: RawModel,
    /// The root seed.
    pub seed: u64,
}

impl Setup {
    /// The latent dimension `d` of `W_embed`.
    pub fn latent_dim(&self) -> usize {
        let (c, h, w) = self.dataset.shape();
        self.model
            .embedding
            .kind()
            .latent_dim(self.dataset.num_classes(), c * h * w)
    }
    /// The shapes the networks are built for.
    pub fn net_shape(&self) -> NetShape {
        let (c, h, w) = self.dataset.shape();
        NetShape {
            channels: c,
            height: h,
            width: w,
            latent_dim: self.latent_dim(),
            classes: self.dataset.num_classes(),
        }
    }
}

/// `log p(y | z)` `[B, m]` from the head's logits under the configured class probabilities.
pub fn class_log_probs(
    setup: &Setup,
    logits: &Tensor,
    w_embed: &Tensor,
) -> Result<Tensor, TrainError> {
    Ok(setup.model.class_probability.log_probs(logits, w_embed)?)
}

/// The predicted classes of a batch: the argmax of `log p(y | z)` under the
/// configured class probabilities, from the head's `logits` `[B, m]`.
pub fn predicted_classes(
    setup: &Setup,
    logits: &Tensor,
    w_embed: &Tensor,
) -> Result<Vec<u32>, TrainError> {
    Ok(class_log_probs(setup, logits, w_embed)?
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
    setup: &Setup,
    train: Option<&Dataset>,
    device: &Device,
) -> Result<ClassEmbedding, TrainError> {
    let m = setup.dataset.num_classes();
    let d = setup.latent_dim();
    let init = match setup.model.embedding.init() {
        None => return Ok(ClassEmbedding::one_hot(m, DType::F32, device)?),
        Some(init @ (EmbeddingInit::Orthogonal | EmbeddingInit::Normal)) => {
            let mut rng = NoiseRng::derived(setup.seed, &[Stream::Init.id(), u64::MAX]);
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
    Ok(ClassEmbedding::trainable(
        setup.model.embedding.kind(),
        &init,
    )?)
}

/// Whether a freshly built model should align `f_out` with `W_embed`
/// (`[model] head_init = "embedding"`). A prototype embedding built without
/// training data is all zeros, a placeholder for weights that will be
/// loaded (head included), so it is left alone: its dual basis does not exist.
pub fn aligns_head(setup: &Setup, train: Option<&Dataset>) -> bool {
    setup.model.head_init == Some(HeadInit::Embedding)
        && (train.is_some() || setup.model.embedding.init() != Some(EmbeddingInit::Prototype))
}

/// The denoising or flow target `u_y` `[B, d]`: `u` itself, or `u`
/// detached from `W_embed` when `[model.embedding] target_grad = false`.
pub fn denoise_target(setup: &Setup, u: &Tensor) -> Tensor {
    if setup.model.embedding.target_grad() {
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
    setup: &Setup,
    blocks: usize,
    device: &Device,
    train: Option<&Dataset>,
) -> Result<DtModel, TrainError> {
    let (c, h, w) = setup.dataset.shape();
    let embedding: EmbeddingKind = setup.model.embedding.kind();
    let block = DtBlockConfig {
        in_channels: c,
        height: h,
        width: w,
        latent_dim: setup.latent_dim(),
        classes: setup.dataset.num_classes(),
        dropout: setup.model.dropout,
        kernels: setup.model.kernels,
    };
    let embed = build_embedding(setup, train, device)?;
    let model = DtModel::new(
        DtModelConfig {
            block,
            blocks,
            embedding,
        },
        embed,
        setup.seed,
        DType::F32,
        device,
    )?;
    if aligns_head(setup, train) {
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
    setup: &Setup,
    time: TimeEmbedding,
    device: &Device,
    train: Option<&Dataset>,
) -> Result<CtModel, TrainError> {
    let (c, h, w) = setup.dataset.shape();
    let net = CtNetConfig {
        in_channels: c,
        height: h,
        width: w,
        latent_dim: setup.latent_dim(),
        classes: setup.dataset.num_classes(),
        dropout: setup.model.dropout,
        time_dim: time.dim,
        time_scale: time.scale,
        kernels: setup.model.kernels,
    };
    let embed = build_embedding(setup, train, device)?;
    let model = CtModel::new(net, embed, setup.seed, DType::F32, device)?;
    if aligns_head(setup, train) {
        model.align_head()?;
    }
    Ok(model)
}

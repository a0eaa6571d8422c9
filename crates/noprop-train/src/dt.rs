//! NoProp-DT training (Algorithm 1) and evaluation with the eq. 3 sampler.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use noprop_core::{dt_loss, dt_step, q_sample, Inference, NoiseRng};
use noprop_data::Dataset;
use noprop_models::{ClassEmbedding, DtBlockConfig, DtModel, DtModelConfig, EmbeddingKind, Mode};

use crate::config::{Embedding, EmbeddingInit, EvalConfig, TrainOrder, ValidConfig};
use crate::trainer::{add_l2, check_resume, class_log_probs, mean_se, meta_epoch, model_meta, percentages, run_pass, optimizer, tally_runs, trainable, Trainer, EMBED};
use crate::observer::{EvalReport, Event, Observer, PassMetrics};
use crate::optim::{AdamW, AdamWParams};
use crate::TrainError;

/// Sub-seed streams derived from the run's seed (see [`noprop_core::sub_seed`]).
pub mod streams {
    /// Minibatch order of each (epoch, block) pass.
    pub const SHUFFLE: u64 = 2;
    /// q-sampling noise of each pass.
    pub const NOISE: u64 = 3;
    /// Dropout masks of each pass.
    pub const DROPOUT: u64 = 4;
    /// Sampling noise of the evaluation after each epoch.
    pub const EVAL: u64 = 5;
}

/// A data set moved to the device once: images `[N, C, H, W]` and labels `[N]`.
pub struct DeviceData {
    images: Tensor,
    labels: Tensor,
    host_labels: Vec<u32>,
}

impl DeviceData {
    /// Copies `ds` to `device` in `dtype`.
    pub fn new(ds: &Dataset, dtype: DType, device: &Device) -> Result<Self, TrainError> {
        let n = ds.len();
        let images = Tensor::from_slice(&ds.images, (n, ds.channels, ds.height, ds.width), device)?.to_dtype(dtype)?;
        let labels = Tensor::from_slice(&ds.labels, n, device)?;
        Ok(Self { images, labels, host_labels: ds.labels.clone() })
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.host_labels.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.host_labels.is_empty()
    }

    /// The first `n` examples.
    pub fn head(&self, n: usize) -> Result<Self, TrainError> {
        let n = n.min(self.len());
        Ok(Self {
            images: self.images.narrow(0, 0, n)?,
            labels: self.labels.narrow(0, 0, n)?,
            host_labels: self.host_labels[..n].to_vec(),
        })
    }

    /// Images `[N, C, H, W]` on the device.
    pub fn images(&self) -> &Tensor {
        &self.images
    }

    /// Labels on the host.
    pub fn labels_host(&self) -> &[u32] {
        &self.host_labels
    }

    pub(crate) fn batch(&self, idx: &[usize]) -> Result<(Tensor, Tensor), TrainError> {
        let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        let ids = Tensor::from_vec(ids, idx.len(), self.images.device())?;
        Ok((self.images.index_select(&ids, 0)?, self.labels.index_select(&ids, 0)?))
    }
}

/// The model, its optimizers and the training clock: everything a checkpoint holds.
pub struct DtTrainer {
    cfg: ValidConfig,
    device: Device,
    model: DtModel,
    block_opts: Vec<AdamW>,
    head_opt: AdamW,
    /// With `optimizer = "adam"`: per block, then shared, the variables that get L2 decay.
    l2: Option<(Vec<Vec<(String, candle_core::Var)>>, Vec<(String, candle_core::Var)>)>,
    epochs_done: usize,
    train_seconds: f64,
}

/// The class embedding a config asks for; prototypes are initialised from
/// `train` (zeros when it is `None`, for weights that will be loaded).
pub fn build_embedding(cfg: &ValidConfig, train: Option<&Dataset>, device: &Device) -> Result<ClassEmbedding, TrainError> {
    let raw = cfg.raw();
    let m = raw.data.dataset.num_classes();
    let d = raw.latent_dim();
    let init = match raw.embedding_init() {
        None => return Ok(ClassEmbedding::one_hot(m, DType::F32, device)?),
        Some(init @ (EmbeddingInit::Orthogonal | EmbeddingInit::Normal)) => {
            let mut rng = NoiseRng::derived(raw.train.seed, &[noprop_models::STREAM_INIT, u64::MAX]);
            noprop_models::random_init(m, d, init == EmbeddingInit::Orthogonal, &mut rng, DType::F32, device)?
        }
        Some(EmbeddingInit::Prototype) => match train {
            Some(ds) => {
                let idx = noprop_models::prototype_indices(&ds.images, &ds.labels, d, m, device)?;
                let rows: Vec<f32> = idx.iter().flat_map(|&i| ds.image(i).iter().copied()).collect();
                Tensor::from_vec(rows, (m, d), device)?
            }
            None => Tensor::zeros((m, d), DType::F32, device)?,
        },
    };
    Ok(ClassEmbedding::trainable(embedding_kind(cfg), &init)?)
}

/// The model-level embedding kind of a config.
pub(crate) fn embedding_kind(cfg: &ValidConfig) -> EmbeddingKind {
    let raw = cfg.raw();
    match raw.model.embedding {
        Embedding::OneHot => EmbeddingKind::OneHot,
        Embedding::Learned => EmbeddingKind::Learned { dim: raw.model.embedding_dim },
        Embedding::Prototype => EmbeddingKind::Prototype,
    }
}

/// The blocks, head and embedding a config asks for, initialised from its seed.
pub(crate) fn build_model(cfg: &ValidConfig, device: &Device, train: Option<&Dataset>) -> Result<DtModel, TrainError> {
    let raw = cfg.raw();
    let (c, h, w) = raw.data.dataset.shape();
    let m = raw.data.dataset.num_classes();
    let embedding = embedding_kind(cfg);
    let embed = build_embedding(cfg, train, device)?;
    let block = DtBlockConfig {
        in_channels: c,
        height: h,
        width: w,
        latent_dim: embedding.latent_dim(m, c * h * w),
        classes: m,
        dropout: raw.model.dropout,
        kernels: cfg.kernels(),
    };
    Ok(DtModel::new(DtModelConfig { block, blocks: raw.model.blocks, embedding }, embed, raw.train.seed, DType::F32, device)?)
}

impl DtTrainer {
    /// A fresh model initialised from the config's seed (one-hot or learned embeddings).
    pub fn new(cfg: ValidConfig, device: Device) -> Result<Self, TrainError> {
        Self::with_data(cfg, device, None)
    }

    /// A fresh model; prototype embeddings are initialised from `train`.
    pub fn with_data(cfg: ValidConfig, device: Device, train: Option<&Dataset>) -> Result<Self, TrainError> {
        let model = build_model(&cfg, &device, train)?;
        let raw = cfg.raw();
        let adam = raw.train.optimizer == crate::config::Optimizer::Adam;
        // Adam's decay is an L2 term added to the gradients; AdamW's is decoupled.
        let params = AdamWParams::new(raw.train.lr, if adam { 0.0 } else { raw.train.weight_decay });
        let block_opts = (1..=raw.model.blocks)
            .map(|t| AdamW::new(trainable(model.block_vars(t)), params))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The head and a learned embedding are shared by all blocks: one optimizer, stepped every minibatch.
        let mut shared = trainable(model.head_vars());
        if let Some(var) = model.embedding().var() {
            shared.push((EMBED.to_string(), var.clone()));
        }
        let l2 = adam.then(|| ((1..=raw.model.blocks).map(|t| trainable(model.block_vars(t))).collect(), shared.clone()));
        let head_opt = optimizer(&cfg, shared, params)?;
        Ok(Self { cfg, device, model, block_opts, head_opt, l2, epochs_done: 0, train_seconds: 0.0 })
    }

    /// The model.
    pub fn model(&self) -> &DtModel {
        &self.model
    }

    /// One Algorithm 1 update of block `t` (and the head) on a minibatch;
    /// returns `(total, ce, kl, denoise)`.
    pub fn train_step(
        &mut self,
        t: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<[f64; 4], TrainError> {
        let (mut grads, losses) = self.block_grads(t, x, y, noise, dropout)?;
        if let Some((_, shared)) = &self.l2 {
            add_l2(&mut grads, shared, self.cfg.raw().train.weight_decay)?;
        }
        self.block_opts[t - 1].step(&grads)?;
        self.head_opt.step(&grads)?;
        Ok(losses)
    }

    /// Block `t`'s loss `L_t` on a minibatch and its gradients (with Adam's
    /// L2 term for the block's parameters); returns the gradients and
    /// `(total, ce, kl, denoise)`.
    fn block_grads(
        &self,
        t: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<(candle_core::backprop::GradStore, [f64; 4]), TrainError> {
        let sched = self.cfg.schedule();
        let eta = self.cfg.raw().train.eta;
        let u = self.model.embed().index_select(y, 0)?;
        let z_prev = q_sample(&u, sched.alpha_bar(t - 1), noise)?;
        let z_last = q_sample(&u, sched.alpha_bar(sched.blocks()), noise)?;
        let uhat = self.model.denoise_mode(t, &z_prev, x, &mut Mode::Train(dropout))?;
        // log p(y | z_T) as "logits": log_softmax leaves log-probabilities unchanged.
        let logp = class_log_probs(&self.model.classify(&z_last)?, self.model.embed(), self.cfg.raw().model.class_probability)?;
        let loss = dt_loss(&logp, y, &uhat, &u, sched.alpha_bar(0), sched.dt_weight(t, eta))?;
        let mut grads = loss.total.backward()?;
        if let Some((blocks, _)) = &self.l2 {
            add_l2(&mut grads, &blocks[t - 1], self.cfg.raw().train.weight_decay)?;
        }
        let v = |t: &Tensor| -> Result<f64, TrainError> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        Ok((grads, [v(&loss.total)?, v(&loss.cross_entropy)?, v(&loss.kl)?, v(&loss.denoise)?]))
    }

    /// One fused update (`[train] order = "fused"`) on a minibatch: for
    /// `t = 1..=T`, block `t` and the shared head (and a learned embedding)
    /// each take one AdamW step on the gradient of block `t`'s `L_t`, with
    /// its own `z_{t-1}`, `z_T` and dropout masks drawn from `streams[t - 1]`
    /// (q-noise, dropout) exactly as [`Self::train_step`] draws them. Returns
    /// each block's `(total, ce, kl, denoise)`.
    ///
    /// Every parameter thus gets the updates Algorithm 1 gives it, each on a
    /// single `L_t` (whose expectation over `t` is eq. 8's objective): one
    /// per block and minibatch, and `T` per minibatch for the shared ones;
    /// only the order differs. One shared step per minibatch on the mean of
    /// the `L_t` would follow eq. 8 exactly but moves the head `T` times less
    /// often: on 12k MNIST images, one epoch left it at chance.
    pub fn fused_step(&mut self, x: &Tensor, y: &Tensor, streams: &mut [(NoiseRng, NoiseRng)]) -> Result<Vec<[f64; 4]>, TrainError> {
        let blocks = self.block_opts.len();
        if streams.len() != blocks {
            return Err(TrainError::InvalidConfig {
                field: "train.order",
                reason: format!("a fused step needs {blocks} noise streams, got {}", streams.len()),
            });
        }
        (1..=blocks)
            .zip(streams.iter_mut())
            .map(|(t, (noise, dropout))| self.train_step(t, x, y, noise, dropout))
            .collect()
    }

    /// Epoch `epoch` in fused order: one shuffled pass over `data` (the
    /// minibatch order keyed by block 0), each block drawing q-noise and
    /// dropout from its own (epoch, block) streams as in the sequential
    /// order. Reports one [`Event::PassStart`] with block 0, a step event per
    /// minibatch (the blocks' mean loss) and one pass per block, each with an
    /// equal share of the pass's time.
    fn fused_epoch(&mut self, data: &DeviceData, epoch: usize, observer: &mut dyn Observer) -> Result<Vec<PassMetrics>, TrainError> {
        let (seed, batch, blocks) = (self.cfg.raw().train.seed, self.cfg.raw().train.batch_size, self.cfg.raw().model.blocks);
        observer.on_event(&Event::PassStart { epoch, block: 0 });
        let start = Instant::now();
        let stream = noprop_data::pass_stream(epoch as u64, 0);
        let batcher = noprop_data::Batcher::new(data.len(), batch, noprop_core::sub_seed(seed, &[streams::SHUFFLE]), stream)?.min_batch_len(2);
        let mut rngs: Vec<(NoiseRng, NoiseRng)> = (1..=blocks as u64)
            .map(|t| {
                (
                    NoiseRng::derived(seed, &[streams::NOISE, epoch as u64, t]),
                    NoiseRng::derived(seed, &[streams::DROPOUT, epoch as u64, t]),
                )
            })
            .collect();
        let mut sums = vec![[0.0f64; 4]; blocks];
        let mut count = 0usize;
        for idx in batcher.batches() {
            let (x, y) = data.batch(idx)?;
            let l = self.fused_step(&x, &y, &mut rngs)?;
            for (t, (s, l)) in sums.iter_mut().zip(&l).enumerate() {
                if !l[0].is_finite() {
                    return Err(TrainError::Diverged { epoch, block: t + 1, loss: l[0] });
                }
                for (s, v) in s.iter_mut().zip(l) {
                    *s += v;
                }
            }
            count += 1;
            observer.on_event(&Event::Step { loss: l.iter().map(|l| l[0]).sum::<f64>() / blocks as f64 });
        }
        let seconds = start.elapsed().as_secs_f64();
        let n = count.max(1) as f64;
        let passes: Vec<PassMetrics> = sums
            .iter()
            .enumerate()
            .map(|(t, s)| PassMetrics {
                epoch,
                block: t + 1,
                loss: s[0] / n,
                ce: s[1] / n,
                kl: s[2] / n,
                denoise: s[3] / n,
                batches: count,
                seconds: seconds / blocks as f64,
            })
            .collect();
        for p in &passes {
            observer.on_event(&Event::PassEnd(p));
        }
        Ok(passes)
    }

}

/// Accuracy (percent) over `data` of one sampling run per entry of `modes`.
///
/// The image path does not depend on `z`, so each block's image features are
/// computed once per batch and shared by all runs, which are stacked into one
/// batch of `runs * B` latents; deterministic runs get `eps = 0`.
pub fn accuracy_runs(
    model: &DtModel,
    sched: &noprop_core::DiscreteSchedule,
    data: &DeviceData,
    modes: &[Inference],
    batch_size: usize,
    class_prob: noprop_core::ClassProbability,
    rng: &mut NoiseRng,
) -> Result<Vec<f64>, TrainError> {
    let runs = modes.len();
    let n = data.len();
    let d = model.config().block.latent_dim;
    let mut correct = vec![0usize; runs];
    let dev = data.images.device();
    // Evaluation-mode BatchNorm folded into the Linear layers before it.
    let blocks = (1..=sched.blocks()).map(|t| model.block(t).folded()).collect::<candle_core::Result<Vec<_>>>()?;
    // `batch_size` bounds the rows of one forward pass, all runs stacked: a
    // prototype label path sends every row through its own convolutions.
    let per_batch = (batch_size / runs.max(1)).max(1);
    let mut start = 0;
    while start < n {
        let b = per_batch.min(n - start);
        let x = data.images.narrow(0, start, b)?;
        let feats = blocks.iter().map(|blk| blk.image_features(&x)).collect::<candle_core::Result<Vec<_>>>()?;
        let rows = runs * b;
        let mut z = rng.randn(&[rows, d], x.dtype(), dev)?;
        // Rows of deterministic runs get no sampling noise.
        let noise_mask: Vec<f32> = modes
            .iter()
            .flat_map(|m| std::iter::repeat_n(if *m == Inference::Stochastic { 1f32 } else { 0.0 }, b))
            .collect();
        let noise_mask = Tensor::from_vec(noise_mask, (rows, 1), dev)?.to_dtype(x.dtype())?;
        let any_noise = modes.contains(&Inference::Stochastic);
        for t in 1..=sched.blocks() {
            let fx = if runs == 1 { feats[t - 1].clone() } else { Tensor::cat(&vec![&feats[t - 1]; runs], 0)? };
            let uhat = noprop_models::layers::softmax_embed(&blocks[t - 1].logits_from_features(&z, &fx)?, model.embed())?;
            let eps = if any_noise {
                Some(rng.randn(&[rows, d], x.dtype(), dev)?.broadcast_mul(&noise_mask)?)
            } else {
                None
            };
            z = dt_step(sched, t, &uhat, &z, eps.as_ref())?;
        }
        let pred: Vec<u32> = class_log_probs(&model.classify(&z)?, model.embed(), class_prob)?.argmax(D::Minus1)?.to_vec1()?;
        tally_runs(&mut correct, &pred, &data.host_labels[start..start + b]);
        start += b;
    }
    Ok(percentages(correct, n))
}

impl Trainer for DtTrainer {
    fn config(&self) -> &ValidConfig {
        &self.cfg
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn epochs_done(&self) -> usize {
        self.epochs_done
    }
    fn train_seconds(&self) -> f64 {
        self.train_seconds
    }
    /// Epoch `epochs_done + 1` of Algorithm 1: for t = 1..T, one shuffled pass over `data`.
    fn train_epoch(&mut self, data: &DeviceData, observer: &mut dyn Observer) -> Result<Vec<PassMetrics>, TrainError> {
        let epoch = self.epochs_done + 1;
        let (seed, batch, blocks) = (self.cfg.raw().train.seed, self.cfg.raw().train.batch_size, self.cfg.raw().model.blocks);
        let passes = match self.cfg.raw().train.order {
            TrainOrder::Sequential => {
                let mut passes = Vec::with_capacity(blocks);
                for t in 1..=blocks {
                    passes.push(run_pass(data, seed, batch, epoch, t, observer, |x, y, noise, drop| self.train_step(t, x, y, noise, drop))?);
                }
                passes
            }
            TrainOrder::Fused => self.fused_epoch(data, epoch, observer)?,
        };
        self.train_seconds += passes.iter().map(|p| p.seconds).sum::<f64>();
        self.epochs_done = epoch;
        Ok(passes)
    }

    /// Test accuracy of the eq. 3 sampler (mean and standard error over
    /// `eval.runs` stochastic runs, and deterministic if configured), and
    /// train accuracy on `train_subset` if given. Draws come from a stream
    /// fixed by the seed and `epoch`.
    fn evaluate(&self, test: &DeviceData, train_subset: Option<&DeviceData>, epoch: usize) -> Result<EvalReport, TrainError> {
        let start = Instant::now();
        let ev = &self.cfg.raw().eval;
        let seed = self.cfg.raw().train.seed;
        let mut rng = NoiseRng::derived(seed, &[streams::EVAL, epoch as u64, 0]);
        // The stochastic runs and the deterministic one share each batch's image features.
        let mut modes = vec![Inference::Stochastic; ev.runs];
        if ev.deterministic {
            modes.push(Inference::Deterministic);
        }
        let mut runs = accuracy_runs(&self.model, self.cfg.schedule(), test, &modes, ev.batch_size, self.cfg.raw().model.class_probability, &mut rng)?;
        let det = if ev.deterministic { runs.pop() } else { None };
        let (mean, se) = mean_se(&runs);
        let train_acc = match train_subset {
            Some(d) if !d.is_empty() => {
                let mut rng = NoiseRng::derived(seed, &[streams::EVAL, epoch as u64, 2]);
                Some(accuracy_runs(&self.model, self.cfg.schedule(), d, &[Inference::Stochastic], ev.batch_size, self.cfg.raw().model.class_probability, &mut rng)?[0])
            }
            _ => None,
        };
        Ok(EvalReport {
            epoch,
            test_acc: mean,
            test_acc_se: se,
            test_acc_runs: runs,
            test_acc_deterministic: det,
            train_acc,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The model's tensors and the checkpoint metadata for the current epoch.
    fn model_checkpoint(&self) -> (BTreeMap<String, Tensor>, HashMap<String, String>) {
        (self.model.named_tensors(), model_meta(&self.cfg, self.epochs_done, self.train_seconds))
    }

    /// The optimizers' state (moments and step counts).
    fn optimizer_checkpoint(&self) -> (BTreeMap<String, Tensor>, HashMap<String, String>) {
        let mut tensors = self.head_opt.state("");
        let mut steps = vec![self.head_opt.steps()];
        for opt in &self.block_opts {
            tensors.extend(opt.state(""));
            steps.push(opt.steps());
        }
        let mut meta = HashMap::new();
        meta.insert("epoch".into(), self.epochs_done.to_string());
        meta.insert("steps".into(), serde_json::to_string(&steps).unwrap_or_default());
        (tensors, meta)
    }

    /// Restores the state saved by [`Self::model_checkpoint`] and [`Self::optimizer_checkpoint`].
    fn restore(
        &mut self,
        model: &BTreeMap<String, Tensor>,
        model_meta: &HashMap<String, String>,
        optim: &BTreeMap<String, Tensor>,
        optim_meta: &HashMap<String, String>,
    ) -> Result<(), TrainError> {
        let bad = |reason: String| TrainError::Resume { reason };
        let (epoch, seconds, steps) = check_resume(model_meta, optim_meta, self.block_opts.len() + 1)?;
        self.model.load_tensors(model)?;
        self.head_opt.load_state("", optim, steps[0]).map_err(bad)?;
        for (opt, &s) in self.block_opts.iter_mut().zip(&steps[1..]) {
            opt.load_state("", optim, s).map_err(bad)?;
        }
        self.epochs_done = epoch;
        self.train_seconds = seconds;
        Ok(())
    }
    fn load_weights(&mut self, model: &BTreeMap<String, Tensor>, model_meta: &HashMap<String, String>) -> Result<(), TrainError> {
        self.model.load_tensors(model)?;
        (self.epochs_done, self.train_seconds) = meta_epoch(model_meta)?;
        Ok(())
    }
    fn set_eval_config(&mut self, eval: EvalConfig) -> Result<(), TrainError> {
        let mut raw = self.cfg.raw().clone();
        raw.eval = eval;
        self.cfg = raw.validate()?;
        Ok(())
    }
}

//! What every method's trainer offers the epoch loop and the run folder.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor, D};
use noprop_core::{radial_log_probs, ClassProbability, NoiseRng};
use noprop_data::Dataset;

use crate::config::{EvalConfig, Method, ValidConfig};
use crate::dt::{DeviceData, DtTrainer};
use crate::observer::{EvalReport, Event, Observer, PassMetrics};
use crate::optim::{AdamW, AdamWParams};
use crate::TrainError;

/// A model with its optimizers and training clock.
pub trait Trainer {
    /// The validated configuration.
    fn config(&self) -> &ValidConfig;
    /// The device the model lives on.
    fn device(&self) -> &Device;
    /// Epochs completed so far.
    fn epochs_done(&self) -> usize;
    /// Seconds spent in training steps so far (across resumes).
    fn train_seconds(&self) -> f64;
    /// Trains epoch `epochs_done() + 1`; returns one entry per pass over the data.
    fn train_epoch(&mut self, data: &DeviceData, observer: &mut dyn Observer) -> Result<Vec<PassMetrics>, TrainError>;
    /// Test accuracy (and train accuracy on `train_subset`) after `epoch`.
    fn evaluate(&self, test: &DeviceData, train_subset: Option<&DeviceData>, epoch: usize) -> Result<EvalReport, TrainError>;
    /// The model's tensors and checkpoint metadata.
    fn model_checkpoint(&self) -> (BTreeMap<String, Tensor>, HashMap<String, String>);
    /// The optimizer state and its metadata.
    fn optimizer_checkpoint(&self) -> (BTreeMap<String, Tensor>, HashMap<String, String>);
    /// Restores both checkpoints (for `--resume`).
    fn restore(
        &mut self,
        model: &BTreeMap<String, Tensor>,
        model_meta: &HashMap<String, String>,
        optim: &BTreeMap<String, Tensor>,
        optim_meta: &HashMap<String, String>,
    ) -> Result<(), TrainError>;
    /// Loads weights only (for evaluation) and the epoch counter from metadata.
    fn load_weights(&mut self, model: &BTreeMap<String, Tensor>, model_meta: &HashMap<String, String>) -> Result<(), TrainError>;
    /// Replaces the evaluation settings.
    fn set_eval_config(&mut self, eval: EvalConfig) -> Result<(), TrainError>;
    /// The model's tensors (as in the checkpoint).
    fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.model_checkpoint().0
    }
}

/// A trainer for the configured method. `train` is the training set, used
/// to initialise prototype embeddings (pass `None` when weights will be loaded).
pub fn build_trainer(cfg: ValidConfig, device: Device, train: Option<&Dataset>) -> Result<Box<dyn Trainer>, TrainError> {
    Ok(match cfg.raw().model.method {
        Method::Dt => Box::new(DtTrainer::with_data(cfg, device, train)?),
        Method::Ct | Method::Fm | Method::Adjoint => Box::new(crate::ct::CtTrainer::new(cfg, device, train)?),
        Method::Backprop => Box::new(crate::backprop::BackpropTrainer::new(cfg, device, train)?),
    })
}

/// A trainer restored from a model checkpoint file alone (weights and the
/// config in its metadata), for evaluation; optimizer state is not loaded.
pub fn load_for_eval(path: &std::path::Path, device: &Device) -> Result<Box<dyn Trainer>, TrainError> {
    let (tensors, meta) = crate::checkpoint::load_safetensors(path, device)?;
    let bad = |reason: String| TrainError::Checkpoint { path: path.to_path_buf(), reason };
    let cfg: crate::Config = meta
        .get("config")
        .ok_or_else(|| bad("no config in its metadata (not written by noprop?)".into()))
        .and_then(|c| serde_json::from_str(c).map_err(|e| bad(format!("config in metadata: {e}"))))?;
    let mut trainer = build_trainer(cfg.validate()?, device.clone(), None)?;
    trainer.load_weights(&tensors, &meta)?;
    Ok(trainer)
}

/// `log p(y | z)` `[B, m]` from the head's logits: softmax (eq. 14) or radial (eq. 15-16).
pub fn class_log_probs(logits: &Tensor, w_embed: &Tensor, cp: ClassProbability) -> Result<Tensor, TrainError> {
    Ok(match cp {
        ClassProbability::Softmax => noprop_core::log_softmax(logits)?,
        ClassProbability::Radial { sigma } => {
            let p = candle_nn::ops::softmax(logits, D::Minus1)?;
            radial_log_probs(&p.matmul(w_embed)?, w_embed, sigma)?
        }
    })
}

/// Mean and standard error of per-run accuracies.
pub(crate) fn mean_se(runs: &[f64]) -> (f64, f64) {
    let k = runs.len() as f64;
    let mean = runs.iter().sum::<f64>() / k.max(1.0);
    let se = if runs.len() > 1 { (runs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (k - 1.0)).sqrt() / k.sqrt() } else { 0.0 };
    (mean, se)
}

/// Per-run hit counts of stacked inference runs: `pred` holds `runs` blocks
/// of `labels.len()` predictions, run `r`'s hits go to `correct[r]`.
pub(crate) fn tally_runs(correct: &mut [usize], pred: &[u32], labels: &[u32]) {
    let b = labels.len();
    for (r, c) in correct.iter_mut().enumerate() {
        *c += pred[r * b..(r + 1) * b].iter().zip(labels).filter(|(p, y)| p == y).count();
    }
}

/// Hit counts as percentages of `n` examples.
pub(crate) fn percentages(correct: Vec<usize>, n: usize) -> Vec<f64> {
    correct.into_iter().map(|c| 100.0 * c as f64 / n.max(1) as f64).collect()
}

/// The name of a learned `W_embed` in the optimizers and checkpoints.
pub(crate) const EMBED: &str = "embed";

/// AdamW over `vars`, the learned embedding among them (named [`EMBED`])
/// at `train.embedding_lr` when the config sets it.
pub(crate) fn optimizer(cfg: &ValidConfig, vars: Vec<(String, candle_core::Var)>, params: AdamWParams) -> candle_core::Result<AdamW> {
    let mut opt = AdamW::new(vars, params)?;
    if let Some(lr) = cfg.raw().train.embedding_lr {
        opt.set_lr(EMBED, lr);
    }
    Ok(opt)
}

/// Named trainable variables of a `VarMap` (BatchNorm buffers excluded).
pub(crate) fn trainable(vars: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    vars.data()
        .lock()
        .map(|d| d.iter().filter(|(k, _)| !noprop_models::layers::is_buffer(k)).map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// Checkpoint metadata common to all methods.
pub(crate) fn model_meta(cfg: &ValidConfig, epoch: usize, train_seconds: f64) -> HashMap<String, String> {
    let mut meta = HashMap::new();
    meta.insert("format".into(), "noprop/1".into());
    meta.insert("method".into(), cfg.raw().model.method.name().into());
    meta.insert("epoch".into(), epoch.to_string());
    meta.insert("train_seconds".into(), format!("{train_seconds:.3}"));
    meta.insert("config".into(), serde_json::to_string(cfg.raw()).unwrap_or_default());
    meta
}

/// The epoch and training clock recorded in a model checkpoint.
pub(crate) fn meta_epoch(meta: &HashMap<String, String>) -> Result<(usize, f64), TrainError> {
    let epoch = meta.get("epoch").and_then(|e| e.parse().ok()).ok_or_else(|| TrainError::Resume { reason: "checkpoint has no epoch".into() })?;
    Ok((epoch, meta.get("train_seconds").and_then(|s| s.parse().ok()).unwrap_or(0.0)))
}

/// Adam's weight decay as PyTorch's `Adam` applies it: `g += wd * p` before
/// the moment updates (an L2 term), for every variable in `vars` that has a
/// gradient. Used with an [`AdamW`](crate::optim::AdamW) whose own decoupled
/// decay is 0.
pub(crate) fn add_l2(grads: &mut candle_core::backprop::GradStore, vars: &[(String, candle_core::Var)], wd: f64) -> Result<(), TrainError> {
    if wd == 0.0 {
        return Ok(());
    }
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let g = (g + (var.as_tensor().detach() * wd)?)?;
            grads.insert(var.as_tensor(), g);
        }
    }
    Ok(())
}

/// One shuffled pass over `data` for `block` (0 for the single network of CT
/// and FM) in `epoch`: draws the minibatch order, q-noise and dropout from
/// the streams keyed by (seed, epoch, block), calls `step` per minibatch
/// (which returns `[total, ce, kl, denoise]`), reports to `observer`, and
/// returns the pass's mean losses.
pub(crate) fn run_pass(
    data: &DeviceData,
    seed: u64,
    batch_size: usize,
    epoch: usize,
    block: usize,
    observer: &mut dyn Observer,
    mut step: impl FnMut(&Tensor, &Tensor, &mut NoiseRng, &mut NoiseRng) -> Result<[f64; 4], TrainError>,
) -> Result<PassMetrics, TrainError> {
    use crate::dt::streams;
    observer.on_event(&Event::PassStart { epoch, block });
    let start = std::time::Instant::now();
    let stream = noprop_data::pass_stream(epoch as u64, block as u64);
    let batcher = noprop_data::Batcher::new(data.len(), batch_size, noprop_core::sub_seed(seed, &[streams::SHUFFLE]), stream)?.min_batch_len(2);
    let mut noise = NoiseRng::derived(seed, &[streams::NOISE, epoch as u64, block as u64]);
    let mut drop = NoiseRng::derived(seed, &[streams::DROPOUT, epoch as u64, block as u64]);
    let mut sums = [0.0f64; 4];
    let mut count = 0usize;
    for idx in batcher.batches() {
        let (x, y) = data.batch(idx)?;
        let l = step(&x, &y, &mut noise, &mut drop)?;
        if !l[0].is_finite() {
            return Err(TrainError::Diverged { epoch, block, loss: l[0] });
        }
        for (s, v) in sums.iter_mut().zip(l) {
            *s += v;
        }
        count += 1;
        observer.on_event(&Event::Step { loss: l[0] });
    }
    let n = count.max(1) as f64;
    let pass = PassMetrics {
        epoch,
        block,
        loss: sums[0] / n,
        ce: sums[1] / n,
        kl: sums[2] / n,
        denoise: sums[3] / n,
        batches: count,
        seconds: start.elapsed().as_secs_f64(),
    };
    observer.on_event(&Event::PassEnd(&pass));
    Ok(pass)
}

/// Checks that a model and an optimizer checkpoint belong to the same epoch;
/// returns that epoch, the training clock and the optimizers' step counts.
pub(crate) fn check_resume(
    model_meta: &HashMap<String, String>,
    optim_meta: &HashMap<String, String>,
    optimizers: usize,
) -> Result<(usize, f64, Vec<u64>), TrainError> {
    let bad = |reason: String| TrainError::Resume { reason };
    let (epoch, seconds) = meta_epoch(model_meta)?;
    let optim_epoch: usize = optim_meta.get("epoch").and_then(|e| e.parse().ok()).unwrap_or(usize::MAX);
    if optim_epoch != epoch {
        return Err(bad(format!("model is at epoch {epoch} but optimizer state at {optim_epoch}")));
    }
    let steps: Vec<u64> = optim_meta
        .get("steps")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("optimizer state has no step counts".into()))?;
    if steps.len() != optimizers {
        return Err(bad(format!("optimizer state has {} step counts, expected {optimizers}", steps.len())));
    }
    Ok((epoch, seconds, steps))
}

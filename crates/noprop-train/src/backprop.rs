//! The back-propagation baseline (spec section 10, eq. 17-19): NoProp-DT's
//! blocks and head chained into one network,
//!
//! ```text
//! z_0 ~ N(0, I),   z_t = (1 - alpha_t) z_{t-1} + alpha_t uhat_t(z_{t-1}, x),   alpha_t = tanh(w_t),
//! ```
//!
//! with the cross-entropy of `f_out(z_T)` as the only loss, trained end to
//! end by back-propagation through all `T` blocks.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use noprop_core::NoiseRng;
use noprop_data::Dataset;
use noprop_models::{DtModel, Mode};

use crate::config::{EvalConfig, HeadInit, Optimizer, ValidConfig};
use crate::dt::{build_model, streams, DeviceData};
use crate::observer::{EvalReport, Observer, PassMetrics};
use crate::optim::{AdamW, AdamWParams};
use crate::trainer::{add_l2, check_resume, class_log_probs, mean_se, meta_epoch, model_meta, percentages, run_pass, optimizer, tally_runs, trainable, Trainer, EMBED};
use crate::TrainError;

/// The checkpoint name of the `[T]` vector of `w_t`.
pub const ALPHA_NAME: &str = "alpha.w";

/// The chained model, its optimizers and training clock.
pub struct BackpropTrainer {
    cfg: ValidConfig,
    device: Device,
    model: DtModel,
    /// `w_t`, `alpha_t = tanh(w_t)`, `[T]`.
    alpha: Var,
    /// Blocks, head and a learned embedding.
    opt: AdamW,
    /// `w`: the same learning rate, no weight decay (which would pull every `alpha_t` to 0).
    alpha_opt: AdamW,
    /// With `optimizer = "adam"`: the variables that get L2 decay.
    l2_vars: Vec<(String, Var)>,
    epochs_done: usize,
    train_seconds: f64,
}

impl BackpropTrainer {
    /// A fresh model; prototype embeddings are initialised from `train`.
    pub fn new(cfg: ValidConfig, device: Device, train: Option<&Dataset>) -> Result<Self, TrainError> {
        let model = build_model(&cfg, &device, train)?;
        if cfg.raw().head_init() == HeadInit::Embedding {
            model.align_head()?;
        }
        let raw = cfg.raw();
        let w0 = raw.model.alpha_init.atanh() as f32;
        let alpha = Var::from_tensor(&Tensor::full(w0, raw.model.blocks, &device)?)?;
        let mut vars: Vec<(String, Var)> = (1..=raw.model.blocks).flat_map(|t| trainable(model.block_vars(t))).collect();
        vars.extend(trainable(model.head_vars()));
        if let Some(v) = model.embedding().var() {
            vars.push((EMBED.into(), v.clone()));
        }
        let (params, l2_vars) = match raw.train.optimizer {
            Optimizer::Adamw => (AdamWParams::new(raw.train.lr, raw.train.weight_decay), vec![]),
            Optimizer::Adam => (AdamWParams::new(raw.train.lr, 0.0), vars.clone()),
        };
        let opt = optimizer(&cfg, vars, params)?;
        let alpha_opt = AdamW::new(vec![(ALPHA_NAME.into(), alpha.clone())], AdamWParams::new(raw.train.lr, 0.0))?;
        Ok(Self { cfg, device, model, alpha, opt, alpha_opt, l2_vars, epochs_done: 0, train_seconds: 0.0 })
    }

    /// The model (blocks, head, embedding).
    pub fn model(&self) -> &DtModel {
        &self.model
    }

    /// `alpha_t = tanh(w_t)` for `t = 1..=T`.
    pub fn alphas(&self) -> Result<Vec<f32>, TrainError> {
        Ok(self.alpha.as_tensor().tanh()?.to_vec1()?)
    }

    /// One end-to-end update on a minibatch; returns `(ce, ce, 0, 0)`.
    pub fn train_step(&mut self, x: &Tensor, y: &Tensor, noise: &mut NoiseRng, dropout: &mut NoiseRng) -> Result<[f64; 4], TrainError> {
        let (ce, grads) = self.gradients(x, y, noise, dropout)?;
        self.opt.step(&grads)?;
        self.alpha_opt.step(&grads)?;
        Ok([ce, ce, 0.0, 0.0])
    }

    /// The cross-entropy of a minibatch and the gradients of every trainable
    /// variable (L2 decay included when configured), without updating.
    pub fn gradients(
        &self,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<(f64, candle_core::backprop::GradStore), TrainError> {
        let raw = self.cfg.raw();
        let d = self.model.config().block.latent_dim;
        let alpha = self.alpha.as_tensor().tanh()?;
        let mut z = noise.randn(&[x.dim(0)?, d], DType::F32, &self.device)?;
        let mut mode = Mode::Train(dropout);
        for t in 1..=raw.model.blocks {
            let uhat = self.model.denoise_mode(t, &z, x, &mut mode)?;
            z = chain(&z, &uhat, &alpha.narrow(0, t - 1, 1)?)?;
        }
        let logp = class_log_probs(&self.model.classify(&z)?, self.model.embed(), raw.model.class_probability)?;
        let ce = noprop_core::cross_entropy(&logp, y)?;
        let mut grads = ce.backward()?;
        add_l2(&mut grads, &self.l2_vars, raw.train.weight_decay)?;
        Ok((ce.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads))
    }

    /// Accuracy (percent) over `data` of `runs` inference runs, which differ
    /// only in their draw of `z_0`; each block's image features are computed
    /// once per batch for all runs.
    fn accuracy(&self, data: &DeviceData, runs: usize, rng: &mut NoiseRng) -> Result<Vec<f64>, TrainError> {
        let ev = &self.cfg.raw().eval;
        let alpha = self.alpha.as_tensor().tanh()?;
        let d = self.model.config().block.latent_dim;
        let n = data.len();
        let mut correct = vec![0usize; runs];
        let mut start = 0;
        // At most `eval.batch_size` rows per forward pass, all runs stacked.
        let per_batch = (ev.batch_size / runs.max(1)).max(1);
        while start < n {
            let b = per_batch.min(n - start);
            let feats = self.model.image_features(&data.images().narrow(0, start, b)?)?;
            let mut z = rng.randn(&[runs * b, d], DType::F32, &self.device)?;
            for (t, fx) in feats.iter().enumerate() {
                let fx = if runs == 1 { fx.clone() } else { Tensor::cat(&vec![fx; runs], 0)? };
                let uhat = self.model.denoise_from_features(t + 1, &z, &fx)?;
                z = chain(&z, &uhat, &alpha.narrow(0, t, 1)?)?;
            }
            let logp = class_log_probs(&self.model.classify(&z)?, self.model.embed(), self.cfg.raw().model.class_probability)?;
            let pred: Vec<u32> = logp.argmax(D::Minus1)?.to_vec1()?;
            tally_runs(&mut correct, &pred, &data.labels_host()[start..start + b]);
            start += b;
        }
        Ok(percentages(correct, n))
    }
}

/// Eq. 17: `(1 - alpha) z + alpha uhat` with `alpha` of shape `[1]`.
fn chain(z: &Tensor, uhat: &Tensor, alpha: &Tensor) -> candle_core::Result<Tensor> {
    z.broadcast_sub(&z.broadcast_mul(alpha)?)?.broadcast_add(&uhat.broadcast_mul(alpha)?)
}

impl Trainer for BackpropTrainer {
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

    /// One shuffled pass over `data`, reported as block 0.
    fn train_epoch(&mut self, data: &DeviceData, observer: &mut dyn Observer) -> Result<Vec<PassMetrics>, TrainError> {
        let epoch = self.epochs_done + 1;
        let (seed, batch) = (self.cfg.raw().train.seed, self.cfg.raw().train.batch_size);
        let pass = run_pass(data, seed, batch, epoch, 0, observer, |x, y, noise, drop| self.train_step(x, y, noise, drop))?;
        self.train_seconds += pass.seconds;
        self.epochs_done = epoch;
        Ok(vec![pass])
    }

    /// Test accuracy over `eval.runs` draws of `z_0` (no deterministic run:
    /// the chain has no other noise), and train accuracy on `train_subset`.
    fn evaluate(&self, test: &DeviceData, train_subset: Option<&DeviceData>, epoch: usize) -> Result<EvalReport, TrainError> {
        let start = Instant::now();
        let seed = self.cfg.raw().train.seed;
        let mut rng = NoiseRng::derived(seed, &[streams::EVAL, epoch as u64, 0]);
        let runs = self.accuracy(test, self.cfg.raw().eval.runs, &mut rng)?;
        let (mean, se) = mean_se(&runs);
        let train_acc = match train_subset {
            Some(d) if !d.is_empty() => {
                let mut rng = NoiseRng::derived(seed, &[streams::EVAL, epoch as u64, 2]);
                Some(self.accuracy(d, 1, &mut rng)?[0])
            }
            _ => None,
        };
        Ok(EvalReport {
            epoch,
            test_acc: mean,
            test_acc_se: se,
            test_acc_runs: runs,
            test_acc_deterministic: None,
            train_acc,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    fn model_checkpoint(&self) -> (BTreeMap<String, Tensor>, HashMap<String, String>) {
        let mut tensors = self.model.named_tensors();
        tensors.insert(ALPHA_NAME.into(), self.alpha.as_tensor().clone());
        (tensors, model_meta(&self.cfg, self.epochs_done, self.train_seconds))
    }

    fn optimizer_checkpoint(&self) -> (BTreeMap<String, Tensor>, HashMap<String, String>) {
        let mut tensors = self.opt.state("");
        tensors.extend(self.alpha_opt.state(""));
        let mut meta = HashMap::new();
        meta.insert("epoch".into(), self.epochs_done.to_string());
        meta.insert("steps".into(), serde_json::to_string(&[self.opt.steps(), self.alpha_opt.steps()]).unwrap_or_default());
        (tensors, meta)
    }

    fn restore(
        &mut self,
        model: &BTreeMap<String, Tensor>,
        model_meta: &HashMap<String, String>,
        optim: &BTreeMap<String, Tensor>,
        optim_meta: &HashMap<String, String>,
    ) -> Result<(), TrainError> {
        let bad = |reason: String| TrainError::Resume { reason };
        let (_, _, steps) = check_resume(model_meta, optim_meta, 2)?;
        self.load_weights(model, model_meta)?;
        self.opt.load_state("", optim, steps[0]).map_err(bad)?;
        self.alpha_opt.load_state("", optim, steps[1]).map_err(bad)
    }

    fn load_weights(&mut self, model: &BTreeMap<String, Tensor>, model_meta: &HashMap<String, String>) -> Result<(), TrainError> {
        let mut tensors = model.clone();
        let w = tensors.remove(ALPHA_NAME).ok_or_else(|| noprop_models::ModelError::MissingTensor { name: ALPHA_NAME.into() })?;
        if w.dims() != self.alpha.dims() {
            return Err(noprop_models::ModelError::ShapeMismatch { name: ALPHA_NAME.into(), expected: self.alpha.dims().to_vec(), found: w.dims().to_vec() }.into());
        }
        self.alpha.set(&w.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        self.model.load_tensors(&tensors)?;
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

//! NoProp-CT (Algorithm 2) and NoProp-FM (Algorithm 3): one continuous-time
//! network for all t, trained on a time drawn per example.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use noprop_core::{
    ct_loss, fm_extrapolate, fm_interpolate, fm_loss, nearest_embedding, q_sample_ct, sample_ct_eq3, sample_ct_ode,
    sample_fm, sample_t, ContinuousDenoiser, ContinuousSchedule, Inference, LearnableSchedule, NoiseRng, VelocityField,
};
use noprop_data::Dataset;
use noprop_models::{CtModel, CtNetConfig, Mode};

use crate::config::{EvalConfig, Method, Optimizer, Sampler, ValidConfig};
use crate::dt::{build_embedding, embedding_kind, streams, DeviceData};
use crate::observer::{EvalReport, Observer, PassMetrics};
use crate::optim::{AdamW, AdamWParams};
use crate::trainer::{add_l2, check_resume, class_log_probs, mean_se, meta_epoch, model_meta, run_pass, trainable, Trainer};
use crate::TrainError;

/// Sub-seed stream of the learnable schedule's initialisation.
const STREAM_SCHEDULE_INIT: u64 = 6;

/// The CT/FM network, its head, embedding and (CT) learnable schedule, one optimizer.
pub struct CtTrainer {
    cfg: ValidConfig,
    device: Device,
    model: CtModel,
    schedule: Option<LearnableSchedule>,
    opt: AdamW,
    /// Variables that get Adam's L2 decay (empty with AdamW).
    l2_vars: Vec<(String, candle_core::Var)>,
    epochs_done: usize,
    train_seconds: f64,
}

impl CtTrainer {
    /// A fresh model; prototype embeddings are initialised from `train`.
    pub fn new(cfg: ValidConfig, device: Device, train: Option<&Dataset>) -> Result<Self, TrainError> {
        let raw = cfg.raw().clone();
        let (c, h, w) = raw.data.dataset.shape();
        let m = raw.data.dataset.num_classes();
        let kind = embedding_kind(&cfg);
        let net_cfg = CtNetConfig {
            in_channels: c,
            height: h,
            width: w,
            latent_dim: kind.latent_dim(m, c * h * w),
            classes: m,
            dropout: raw.model.dropout,
            time_dim: raw.model.time_dim,
            time_scale: raw.model.time_scale,
            kernels: cfg.kernels(),
        };
        let embed = build_embedding(&cfg, train, &device)?;
        let model = CtModel::new(net_cfg, embed, raw.train.seed, DType::F32, &device)?;
        let schedule = match raw.model.method {
            Method::Ct => {
                let mut rng = NoiseRng::derived(raw.train.seed, &[STREAM_SCHEDULE_INIT]);
                Some(LearnableSchedule::new(&raw.model.ct_schedule, DType::F32, &device, &mut rng)?)
            }
            _ => None,
        };
        let mut vars = trainable(model.net_vars());
        vars.extend(trainable(model.head_vars()));
        if let Some(v) = model.embedding().var() {
            vars.push(("embed".into(), v.clone()));
        }
        // Weight decay never touches the schedule's endpoints: it would pull
        // gamma0 and gamma1 together and shrink the SNR range.
        let decayed = vars.clone();
        if let Some(s) = &schedule {
            vars.extend(s.vars());
        }
        let (params, l2_vars) = match raw.train.optimizer {
            Optimizer::Adamw => (AdamWParams::new(raw.train.lr, raw.train.weight_decay), vec![]),
            Optimizer::Adam => (AdamWParams::new(raw.train.lr, 0.0), decayed),
        };
        let opt = AdamW::new(vars, params)?;
        Ok(Self { cfg, device, model, schedule, opt, l2_vars, epochs_done: 0, train_seconds: 0.0 })
    }

    /// The model.
    pub fn model(&self) -> &CtModel {
        &self.model
    }

    /// The learnable schedule (CT only).
    pub fn schedule(&self) -> Option<&LearnableSchedule> {
        self.schedule.as_ref()
    }

    /// One update on a minibatch; returns `(total, ce, kl, denoise)` (FM: `denoise` is the flow loss).
    pub fn train_step(&mut self, x: &Tensor, y: &Tensor, noise: &mut NoiseRng, dropout: &mut NoiseRng) -> Result<[f64; 4], TrainError> {
        let raw = self.cfg.raw();
        let b = x.dim(0)?;
        let u = self.model.embed().index_select(y, 0)?;
        let t = sample_t(b, DType::F32, &self.device, noise)?;
        let cp = raw.model.class_probability;
        let (total, parts) = match &self.schedule {
            Some(sched) => {
                let z = q_sample_ct(sched, &u, &t, noise)?;
                let logits = self.model.net().forward(&z, x, &t, &mut Mode::Train(dropout))?;
                let uhat = candle_nn::ops::softmax(&logits, D::Minus1)?.matmul(self.model.embed())?;
                let ones = Tensor::ones(b, DType::F32, &self.device)?;
                let z1 = q_sample_ct(sched, &u, &ones, noise)?;
                let logp = class_log_probs(&self.model.classify(&z1)?, self.model.embed(), cp)?;
                let snr_prime = sched.snr_derivative(&t)?;
                let abar0 = sched.alpha_bar(&Tensor::zeros(1, DType::F32, &self.device)?)?;
                let l = ct_loss(&logp, y, &uhat, &u, &snr_prime, &abar0, raw.train.eta)?;
                (l.total.clone(), [l.cross_entropy, l.kl, l.denoise])
            }
            None => {
                let z0 = noise.randn(u.dims(), DType::F32, &self.device)?;
                let zt = fm_interpolate(&z0, &u, &t, raw.model.fm_sigma, noise)?;
                let logits = self.model.net().forward(&zt, x, &t, &mut Mode::Train(dropout))?;
                let v = logits.matmul(self.model.embed())?;
                let flow = fm_loss(&v, &z0, &u)?;
                let zero = Tensor::zeros((), DType::F32, &self.device)?;
                if self.model.embedding().var().is_some() {
                    // The anchor loss keeps learned embeddings from collapsing.
                    let z1 = fm_extrapolate(&zt, &v, &t)?;
                    let ce = noprop_core::cross_entropy(&class_log_probs(&self.model.classify(&z1)?, self.model.embed(), cp)?, y)?;
                    ((&flow + &ce)?, [ce, zero, flow])
                } else {
                    (flow.clone(), [zero.clone(), zero, flow])
                }
            }
        };
        let mut grads = total.backward()?;
        add_l2(&mut grads, &self.l2_vars, raw.train.weight_decay)?;
        self.opt.step(&grads)?;
        let v = |t: &Tensor| -> Result<f64, TrainError> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        Ok([v(&total)?, v(&parts[0])?, v(&parts[1])?, v(&parts[2])?])
    }

    fn predict(&self, fx: &Tensor, runs: usize, mode: Inference, rng: &mut NoiseRng) -> Result<Vec<u32>, TrainError> {
        let ev = &self.cfg.raw().eval;
        let fx = if runs == 1 { fx.clone() } else { Tensor::cat(&vec![fx; runs], 0)? };
        // The samplers read only the batch size and dtype from `x`; the
        // network reads the precomputed image features instead.
        let x = Tensor::zeros((fx.dim(0)?, 1), DType::F32, &self.device)?;
        let den = Cached { model: &self.model, fx: &fx };
        let pred = match &self.schedule {
            Some(sched) => {
                let z1 = match ev.sampler.solver() {
                    None => sample_ct_eq3(&den, sched, &x, ev.steps, mode, rng)?,
                    Some(solver) => sample_ct_ode(&den, sched, &x, ev.steps, solver, rng)?,
                };
                class_log_probs(&self.model.classify(&z1)?, self.model.embed(), self.cfg.raw().model.class_probability)?.argmax(D::Minus1)?
            }
            None => {
                let solver = ev.sampler.solver().unwrap_or_default();
                let z1 = sample_fm(&den, &x, ev.steps, solver, rng)?;
                nearest_embedding(&z1, self.model.embed())?
            }
        };
        Ok(pred.to_vec1()?)
    }

    fn accuracy(&self, data: &DeviceData, runs: usize, mode: Inference, rng: &mut NoiseRng) -> Result<Vec<f64>, TrainError> {
        let bs = self.cfg.raw().eval.batch_size;
        let n = data.len();
        let mut correct = vec![0usize; runs];
        let mut start = 0;
        while start < n {
            let b = bs.min(n - start);
            let fx = self.model.net().image_features(&data.images().narrow(0, start, b)?, &mut Mode::Eval)?;
            let pred = self.predict(&fx, runs, mode, rng)?;
            let labels = &data.labels_host()[start..start + b];
            for (r, c) in correct.iter_mut().enumerate() {
                *c += pred[r * b..(r + 1) * b].iter().zip(labels).filter(|(p, y)| p == y).count();
            }
            start += b;
        }
        Ok(correct.into_iter().map(|c| 100.0 * c as f64 / n.max(1) as f64).collect())
    }
}

/// The network with fixed image features, as the samplers' denoiser / velocity field.
struct Cached<'a> {
    model: &'a CtModel,
    fx: &'a Tensor,
}

impl ContinuousDenoiser for Cached<'_> {
    fn latent_dim(&self) -> usize {
        self.model.embed().dim(1).unwrap_or(0)
    }
    fn denoise(&self, z: &Tensor, _x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.model.net().logits_from_features(z, t, self.fx, &mut Mode::Eval)?;
        candle_nn::ops::softmax(&logits, D::Minus1)?.matmul(self.model.embed())
    }
}

impl VelocityField for Cached<'_> {
    fn latent_dim(&self) -> usize {
        self.model.embed().dim(1).unwrap_or(0)
    }
    fn velocity(&self, z: &Tensor, _x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.model.net().logits_from_features(z, t, self.fx, &mut Mode::Eval)?.matmul(self.model.embed())
    }
}

impl Trainer for CtTrainer {
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

    fn train_epoch(&mut self, data: &DeviceData, observer: &mut dyn Observer) -> Result<Vec<PassMetrics>, TrainError> {
        let epoch = self.epochs_done + 1;
        let (seed, batch) = (self.cfg.raw().train.seed, self.cfg.raw().train.batch_size);
        let pass = run_pass(data, seed, batch, epoch, 0, observer, |x, y, noise, drop| self.train_step(x, y, noise, drop))?;
        self.train_seconds += pass.seconds;
        self.epochs_done = epoch;
        Ok(vec![pass])
    }

    fn evaluate(&self, test: &DeviceData, train_subset: Option<&DeviceData>, epoch: usize) -> Result<EvalReport, TrainError> {
        let start = Instant::now();
        let ev = &self.cfg.raw().eval;
        let seed = self.cfg.raw().train.seed;
        let mut rng = NoiseRng::derived(seed, &[streams::EVAL, epoch as u64, 0]);
        let runs = self.accuracy(test, ev.runs, Inference::Stochastic, &mut rng)?;
        let (mean, se) = mean_se(&runs);
        // Only the eq. 3 sampler has noise to switch off; the ODE samplers are deterministic given z_0.
        let det = if ev.deterministic && self.schedule.is_some() && ev.sampler == Sampler::Eq3 {
            let mut rng = NoiseRng::derived(seed, &[streams::EVAL, epoch as u64, 1]);
            Some(self.accuracy(test, 1, Inference::Deterministic, &mut rng)?[0])
        } else {
            None
        };
        let train_acc = match train_subset {
            Some(d) if !d.is_empty() => {
                let mut rng = NoiseRng::derived(seed, &[streams::EVAL, epoch as u64, 2]);
                Some(self.accuracy(d, 1, Inference::Stochastic, &mut rng)?[0])
            }
            _ => None,
        };
        Ok(EvalReport { epoch, test_acc: mean, test_acc_se: se, test_acc_runs: runs, test_acc_deterministic: det, train_acc, seconds: start.elapsed().as_secs_f64() })
    }

    fn model_checkpoint(&self) -> (BTreeMap<String, Tensor>, HashMap<String, String>) {
        let mut tensors = self.model.named_tensors();
        if let Some(s) = &self.schedule {
            for (name, var) in s.vars() {
                tensors.insert(name, var.as_tensor().clone());
            }
        }
        (tensors, model_meta(&self.cfg, self.epochs_done, self.train_seconds))
    }

    fn optimizer_checkpoint(&self) -> (BTreeMap<String, Tensor>, HashMap<String, String>) {
        let mut meta = HashMap::new();
        meta.insert("epoch".into(), self.epochs_done.to_string());
        meta.insert("steps".into(), serde_json::to_string(&[self.opt.steps()]).unwrap_or_default());
        (self.opt.state(""), meta)
    }

    fn restore(
        &mut self,
        model: &BTreeMap<String, Tensor>,
        model_meta: &HashMap<String, String>,
        optim: &BTreeMap<String, Tensor>,
        optim_meta: &HashMap<String, String>,
    ) -> Result<(), TrainError> {
        let bad = |reason: String| TrainError::Resume { reason };
        let (_, _, steps) = check_resume(model_meta, optim_meta, 1)?;
        self.load_weights(model, model_meta)?;
        self.opt.load_state("", optim, steps.first().copied().unwrap_or(0)).map_err(bad)
    }

    fn load_weights(&mut self, model: &BTreeMap<String, Tensor>, model_meta: &HashMap<String, String>) -> Result<(), TrainError> {
        self.model.load_tensors(model)?;
        if let Some(s) = &self.schedule {
            s.load(model)?;
        }
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

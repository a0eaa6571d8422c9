//! NoProp-CT (Algorithm 2) and NoProp-FM (Algorithm 3): one continuous-time
//! network for all t, trained on a time drawn per example; and the adjoint
//! baseline, a neural ODE on the same network trained end to end with
//! gradients from the adjoint method.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use noprop_core::{
    adjoint_euler, ct_loss, odeint_euler, fm_extrapolate, fm_interpolate, fm_loss, nearest_embedding, q_sample_ct, sample_ct_eq3, sample_ct_ode,
    sample_fm, sample_t, ContinuousDenoiser, ContinuousSchedule, Inference, LearnableSchedule, NoiseRng, VelocityField,
};
use noprop_data::Dataset;
use noprop_models::{CtModel, CtNetConfig, Mode};

use crate::config::{EvalConfig, Method, Optimizer, Sampler, ValidConfig};
use crate::dt::{build_embedding, embedding_kind, streams, DeviceData};
use crate::observer::{EvalReport, Observer, PassMetrics};
use crate::optim::{AdamW, AdamWParams};
use crate::trainer::{add_l2, check_resume, class_log_probs, mean_se, meta_epoch, model_meta, percentages, run_pass, optimizer, tally_runs, trainable, Trainer, EMBED};
use crate::TrainError;

/// Names of the image path's variables in the network.
const IMAGE_PATH: &str = "net.img.";

/// Sub-seed stream of the learnable schedule's initialisation.
const STREAM_SCHEDULE_INIT: u64 = 6;

/// The CT/FM/adjoint network, its head, embedding and (CT) learnable schedule, one optimizer.
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
            vars.push((EMBED.into(), v.clone()));
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
        let opt = optimizer(&cfg, vars, params)?;
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
        if raw.model.method == Method::Adjoint {
            let (ce, grads) = self.adjoint_gradients(x, y, noise, dropout)?;
            self.opt.step(&grads)?;
            return Ok([ce, ce, 0.0, 0.0]);
        }
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

    /// The adjoint baseline's loss on a minibatch and the gradients of every
    /// trainable variable (L2 decay included when configured), without updating.
    ///
    /// `z(0) ~ N(0, I)` is integrated to `z(1)` by `model.ode_steps` Euler
    /// steps of `dz/dt = f(z, x, t) = logits(z, x, t) W_embed` without
    /// keeping the trajectory; the cross-entropy of the head on `z(1)` gives
    /// `dL/dz(1)`, and [`adjoint_euler`] integrates back to `t = 0`. The image
    /// features do not depend on `z` or `t`, so they are computed once (with
    /// one dropout mask for the whole solve), their gradient is accumulated
    /// along the adjoint solve like a parameter's, and back-propagated
    /// through the image path once.
    pub fn adjoint_gradients(
        &self,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<(f64, candle_core::backprop::GradStore), TrainError> {
        let raw = self.cfg.raw();
        let steps = raw.model.ode_steps;
        let b = x.dim(0)?;
        let net = self.model.net();
        let embed = self.model.embed();
        // The image features enter every step only through `p = fx W1a^T + b1`
        // (constant over the solve): the solve treats `p` as a parameter and
        // the image path and `W1a`, `b1` get their gradient once, from `dL/dp`.
        let p = net.project_features(&net.image_features(x, &mut Mode::Train(dropout))?)?;
        let p_in = Var::from_tensor(&p.detach())?;
        let dev = &self.device;
        let f = |z: &Tensor, t: f64| -> candle_core::Result<Tensor> { net.logits_projected(z, t, p_in.as_tensor(), &mut Mode::Eval)?.matmul(embed) };
        let z0 = noise.randn(&[b, embed.dim(1)?], DType::F32, dev)?;
        let z1 = Var::from_tensor(&odeint_euler(f, &z0, steps)?)?;
        let logp = class_log_probs(&self.model.classify(z1.as_tensor())?, embed, raw.model.class_probability)?;
        let ce = noprop_core::cross_entropy(&logp, y)?;
        let mut grads = ce.backward()?;
        let a1 = grads.remove(z1.as_tensor()).ok_or_else(|| candle_core::Error::Msg("the loss does not depend on z(1)".into()))?;
        // Everything f reads: the network outside its image path, a learned embedding, `p`.
        let net_vars = trainable(self.model.net_vars());
        let mut ode_vars: Vec<Var> = net_vars.iter().filter(|(n, _)| !n.starts_with(IMAGE_PATH)).map(|(_, v)| v.clone()).collect();
        ode_vars.extend(self.model.embedding().var().cloned());
        let mut params: Vec<&Tensor> = ode_vars.iter().map(|v| v.as_tensor()).collect();
        params.push(p_in.as_tensor());
        let adj = adjoint_euler(f, z1.as_tensor(), &a1, &params, steps)?;
        let mut add = |var: &Var, g: &Tensor| -> candle_core::Result<()> {
            let sum = match grads.get(var.as_tensor()) {
                Some(g0) => (g0 + g)?,
                None => g.clone(),
            };
            grads.insert(var.as_tensor(), sum);
            Ok(())
        };
        for (var, g) in ode_vars.iter().zip(&adj.params) {
            if let Some(g) = g {
                add(var, g)?;
            }
        }
        if let Some(Some(g_p)) = adj.params.last() {
            let through_p = (p * g_p)?.sum_all()?.backward()?;
            for (_, var) in &net_vars {
                if let Some(g) = through_p.get(var.as_tensor()) {
                    add(var, g)?;
                }
            }
        }
        add_l2(&mut grads, &self.l2_vars, raw.train.weight_decay)?;
        Ok((ce.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads))
    }

    fn predict(&self, fx: &Tensor, runs: usize, mode: Inference, rng: &mut NoiseRng) -> Result<Vec<u32>, TrainError> {
        let ev = &self.cfg.raw().eval;
        let fx = if runs == 1 { fx.clone() } else { Tensor::cat(&vec![fx; runs], 0)? };
        // The samplers read only the batch size and dtype from `x`; the
        // network reads the precomputed image features instead.
        let x = Tensor::zeros((fx.dim(0)?, 1), DType::F32, &self.device)?;
        let den = Cached::new(&self.model, &fx)?;
        let cp = self.cfg.raw().model.class_probability;
        let pred = match &self.schedule {
            None if self.cfg.raw().model.method == Method::Adjoint => {
                let z0 = rng.randn(&[fx.dim(0)?, self.model.embed().dim(1)?], DType::F32, &self.device)?;
                let z1 = odeint_euler(|z, t| den.velocity_at(z, &x, t), &z0, ev.steps)?;
                class_log_probs(&self.model.classify(&z1)?, self.model.embed(), cp)?.argmax(D::Minus1)?
            }
            Some(sched) => {
                let z1 = match ev.sampler.solver() {
                    None => sample_ct_eq3(&den, sched, &x, ev.steps, mode, rng)?,
                    Some(solver) => sample_ct_ode(&den, sched, &x, ev.steps, solver, rng)?,
                };
                class_log_probs(&self.model.classify(&z1)?, self.model.embed(), cp)?.argmax(D::Minus1)?
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
        // At most `eval.batch_size` rows per forward pass, all runs stacked.
        let per_batch = (bs / runs.max(1)).max(1);
        while start < n {
            let b = per_batch.min(n - start);
            let fx = self.model.net().image_features(&data.images().narrow(0, start, b)?, &mut Mode::Eval)?;
            let pred = self.predict(&fx, runs, mode, rng)?;
            tally_runs(&mut correct, &pred, &data.labels_host()[start..start + b]);
            start += b;
        }
        Ok(percentages(correct, n))
    }
}

/// The network with fixed image features, as the samplers' denoiser / velocity field.
struct Cached<'a> {
    model: &'a CtModel,
    fx: &'a Tensor,
    /// `fx` through the image columns of the fuse layer, for one-time calls.
    projected: Tensor,
}

impl<'a> Cached<'a> {
    fn new(model: &'a CtModel, fx: &'a Tensor) -> candle_core::Result<Self> {
        Ok(Self { model, fx, projected: model.net().project_features(fx)? })
    }

    fn logits_at(&self, z: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        self.model.net().logits_projected(z, t, &self.projected, &mut Mode::Eval)
    }
}

impl ContinuousDenoiser for Cached<'_> {
    fn latent_dim(&self) -> usize {
        self.model.embed().dim(1).unwrap_or(0)
    }
    fn denoise(&self, z: &Tensor, _x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.model.net().logits_from_features(z, t, self.fx, &mut Mode::Eval)?;
        candle_nn::ops::softmax(&logits, D::Minus1)?.matmul(self.model.embed())
    }
    fn denoise_at(&self, z: &Tensor, _x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        candle_nn::ops::softmax(&self.logits_at(z, t)?, D::Minus1)?.matmul(self.model.embed())
    }
}

impl VelocityField for Cached<'_> {
    fn latent_dim(&self) -> usize {
        self.model.embed().dim(1).unwrap_or(0)
    }
    fn velocity(&self, z: &Tensor, _x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.model.net().logits_from_features(z, t, self.fx, &mut Mode::Eval)?.matmul(self.model.embed())
    }
    fn velocity_at(&self, z: &Tensor, _x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        self.logits_at(z, t)?.matmul(self.model.embed())
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

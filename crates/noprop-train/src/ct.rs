//! NoProp-CT (Algorithm 2): one continuous-time network for all t, trained
//! on a time drawn per example, with the learnable noise schedule of
//! Appendix B; evaluated with the eq. 3 sampler or the probability-flow ODE.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use noprop_core::{
    cross_entropy, ct_denoise_loss, ct_denoise_terms, kl_prior_tensor, q_sample_ct,
    q_sample_ct_at_gamma, sample_ct_eq3, sample_ct_ode, ContinuousSchedule, Inference,
    LearnableSchedule, LearnableScheduleConfig, NoiseRng, Stream,
};
use noprop_data::{Dataset, DatasetKind};
use noprop_kernels::matmul;
use noprop_models::{CtModel, Mode, NetShape, FIGURE6};

use serde::{Deserialize, Serialize};

use crate::continuous::{Cached, STEPS, TIME_DIM, TIME_SCALE};
use crate::error::{ConfigError, TrainError};
use crate::groups::ParamGroup;
use crate::method::{
    build_ct_model, class_log_probs, denoise_target, draw_times, network_group, predicted_classes,
    scalar, DeterministicRun, Method, MethodParams, Predict, Setup, StepGrads,
};
use crate::sections::{between, finite, CtSampler, OptimizerKind, TimeEmbedding, TimeSampling};

/// `[method] kind = "ct"`: NoProp-CT's parameters (Table 3's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CtParams {
    /// The denoising weight `eta`.
    pub eta: f64,
    /// Dimension of the sinusoidal time embedding.
    pub time_dim: usize,
    /// `t` is embedded as `time_scale * t` (not given by the paper).
    pub time_scale: f64,
    /// The learnable noise schedule (Appendix B).
    pub schedule: LearnableScheduleConfig,
    /// The integrator at inference: `eq3`, `euler` or `heun`.
    #[serde(with = "crate::sections::by_name")]
    pub sampler: CtSampler,
    /// Integration steps from t = 0 to 1 at inference (1000 in the paper).
    pub steps: usize,
    /// How the training times `t_i` are drawn: `uniform` (the paper's,
    /// default) or `stratified`.
    pub t_sampling: TimeSampling,
    /// How the learnable schedule is trained: `gradient` (the paper's,
    /// default) or `variance`.
    pub schedule_training: ScheduleTraining,
}

impl Default for CtParams {
    fn default() -> Self {
        Self {
            eta: 1.0,
            time_dim: TIME_DIM,
            time_scale: TIME_SCALE,
            schedule: LearnableScheduleConfig::default(),
            sampler: CtSampler::Eq3,
            steps: STEPS,
            t_sampling: TimeSampling::Uniform,
            schedule_training: ScheduleTraining::Gradient,
        }
    }
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

impl MethodParams for CtParams {
    /// 100 epochs on MNIST, 500 on CIFAR-10, 1000 on CIFAR-100; Adam with
    /// the decay as an L2 term.
    fn paper_training(&self, dataset: DatasetKind) -> (usize, OptimizerKind) {
        let epochs = match dataset {
            DatasetKind::Mnist => 100,
            DatasetKind::Cifar10 => 500,
            DatasetKind::Cifar100 => 1000,
        };
        (epochs, OptimizerKind::Adam)
    }
    fn check(&self) -> Result<(), ConfigError> {
        between(
            "method.schedule.hidden",
            self.schedule.hidden,
            1,
            usize::MAX,
        )?;
        finite("method.eta", self.eta, true)?;
        Ok(())
    }
    fn inference_steps(&self) -> usize {
        self.steps
    }
    fn time(&self) -> Option<TimeEmbedding> {
        Some(TimeEmbedding::new(self.time_dim, self.time_scale))
    }
    /// The network and the learnable schedule: `b1`, `w1`, `w2` of its
    /// hidden layer and two endpoints.
    fn parameters(&self, shape: &NetShape) -> u128 {
        FIGURE6.shared_parameters(shape)
            + FIGURE6.ct_net_parameters(shape, self.time_dim)
            + 3 * self.schedule.hidden as u128
            + 2
    }
    fn set_inference(
        &mut self,
        steps: Option<usize>,
        sampler: Option<CtSampler>,
    ) -> Result<(), ConfigError> {
        self.sampler = sampler.unwrap_or(self.sampler);
        self.steps = steps.unwrap_or(self.steps);
        Ok(())
    }
}

/// NoProp-CT's network, head, embedding and learnable schedule.
pub struct Ct {
    params: CtParams,
    setup: Setup,
    model: CtModel,
    schedule: LearnableSchedule,
}

impl Ct {
    /// A fresh model and schedule initialised from the config's seed.
    pub fn new(
        params: &CtParams,
        setup: &Setup,
        device: &Device,
        train: Option<&Dataset>,
    ) -> Result<Self, TrainError> {
        let time = TimeEmbedding::new(params.time_dim, params.time_scale);
        let model = build_ct_model(setup, time, device, train)?;
        let mut rng = NoiseRng::derived(setup.seed, &[Stream::ScheduleInit.id()]);
        let schedule = LearnableSchedule::new(&params.schedule, DType::F32, device, &mut rng)?;
        Ok(Self {
            params: params.clone(),
            setup: setup.clone(),
            model,
            schedule,
        })
    }

    /// The model.
    pub fn model(&self) -> &CtModel {
        &self.model
    }

    /// The learnable schedule.
    pub fn schedule(&self) -> &LearnableSchedule {
        &self.schedule
    }
}

/// `gamma(t_i)` and `gamma'(t_i)` for a minibatch's times, computed from the
/// schedule (`gamma`, `dgamma`: the graph into its parameters) and held as
/// leaf variables of the same values for the rest of the step.
struct SampledSchedule {
    gamma: Var,
    dgamma: Var,
    gamma_graph: Tensor,
    dgamma_graph: Tensor,
}

impl SampledSchedule {
    fn at(sched: &LearnableSchedule, t: &Tensor) -> Result<Self, TrainError> {
        let gamma_graph = sched.gamma(t)?;
        let dgamma_graph = sched.gamma_derivative(t)?;
        Ok(Self {
            gamma: Var::from_tensor(&gamma_graph.detach())?,
            dgamma: Var::from_tensor(&dgamma_graph.detach())?,
            gamma_graph,
            dgamma_graph,
        })
    }

    /// `SNR'(t_i) = -gamma'(t_i) exp(-gamma(t_i))` from the leaves, as
    /// [`ContinuousSchedule::snr_derivative`] computes it.
    fn snr_derivative(&self) -> Result<Tensor, TrainError> {
        Ok((self.dgamma.as_tensor().neg()? * self.gamma.as_tensor().neg()?.exp()?)?)
    }

    /// Completes `grads` (the loss's, which stop at the leaves) for the
    /// schedule: the endpoints get the loss's gradient through the sampled
    /// times added to what the cross-entropy and KL terms gave them, and the
    /// interior gets the gradient of `mean_i L_i^2` instead, `L_i` being
    /// the per-example denoising terms (`terms`, `[B]`, detached).
    ///
    /// With `g_i = dL/dgamma(t_i) = (1/B) dL_i/dgamma(t_i)` (and likewise
    /// for gamma'), `d mean_i L_i^2 / dtheta = sum_i 2 L_i (g_i
    /// dgamma(t_i)/dtheta + g'_i dgamma'(t_i)/dtheta)`: two backward passes
    /// through the schedule's small network, none through the denoiser.
    fn join(
        self,
        sched: &LearnableSchedule,
        terms: &Tensor,
        grads: &mut candle_core::backprop::GradStore,
    ) -> Result<(), TrainError> {
        let leaf_grad = |grads: &mut candle_core::backprop::GradStore, v: &Var| match grads
            .remove(v.as_tensor())
        {
            Some(g) => Ok::<_, TrainError>(g),
            None => Ok(v.as_tensor().zeros_like()?),
        };
        let g = leaf_grad(grads, &self.gamma)?;
        let dg = leaf_grad(grads, &self.dgamma)?;
        let through = |wg: &Tensor, wdg: &Tensor| -> Result<Tensor, TrainError> {
            Ok(((wg * &self.gamma_graph)?.sum_all()? + (wdg * &self.dgamma_graph)?.sum_all()?)?)
        };
        let loss = through(&g, &dg)?.backward()?;
        let w = (terms * 2.0)?;
        let variance = through(&(&g * &w)?, &(&dg * &w)?)?.backward()?;
        for (name, var) in sched.vars() {
            let v = var.as_tensor();
            let interior = LearnableSchedule::INTERIOR_PARAMETER_NAMES.contains(&name.as_str());
            let add = if interior {
                variance.get(v)
            } else {
                loss.get(v)
            };
            let add = match add {
                Some(a) => a.clone(),
                None => v.zeros_like()?,
            };
            let sum = match (interior, grads.remove(v)) {
                (false, Some(before)) => (before + add)?,
                _ => add,
            };
            grads.insert(v, sum);
        }
        Ok(())
    }
}

impl Method for Ct {
    /// Group 0: the network, head and a learned embedding; group 1: the
    /// schedule, which gets no weight decay (it would pull `gamma0` and
    /// `gamma1` together and shrink the SNR range).
    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError> {
        Ok(vec![
            network_group(&self.model)?,
            ParamGroup {
                vars: self.schedule.vars(),
                decay: false,
            },
        ])
    }

    /// Algorithm 2's loss on a minibatch (eq. 9, assembled as
    /// [`noprop_core::ct_loss`] does), one `t ~ U(0, 1)` per example
    /// (`t_sampling = "uniform"`) or a stratified grid (`"stratified"`); the
    /// denoising target is detached from `W_embed` when `target_grad = false`.
    ///
    /// With `schedule_training = "variance"` the schedule's interior
    /// parameters ([`LearnableSchedule::INTERIOR_PARAMETER_NAMES`]) get the
    /// gradient of `mean_i L_i^2` over the per-example denoising terms `L_i`
    /// instead of the loss's ([`SampledSchedule::join`]: the extra backward
    /// passes run through the schedule alone); everything else,
    /// the schedule's endpoints included, keeps the loss's gradient. The
    /// endpoints stay on the loss because they are what its expectation
    /// depends on: minimising `L_i^2` in them would only shrink the SNR range.
    fn gradients(
        &self,
        _lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        let s = &self.params;
        let (b, dev) = (x.dim(0)?, x.device());
        let sched = &self.schedule;
        let u = self.model.embed().index_select(y, 0)?;
        let t = draw_times(s.t_sampling, b, dev, noise)?;
        // Variance minimisation needs each example's gradient with respect
        // to gamma(t_i) and gamma'(t_i), through which alone the schedule's
        // interior reaches the loss: the graph is split there, at two leaf
        // variables (`split`), and joined again below.
        let split = match s.schedule_training {
            ScheduleTraining::Gradient => None,
            ScheduleTraining::Variance => Some(SampledSchedule::at(sched, &t)?),
        };
        let z = match &split {
            None => q_sample_ct(sched, &u, &t, noise)?,
            Some(p) => {
                let eps = noise.randn(u.dims(), u.dtype(), dev)?;
                q_sample_ct_at_gamma(&u, p.gamma.as_tensor(), &eps)?
            }
        };
        let logits = self
            .model
            .net()
            .forward(&z, x, &t, &mut Mode::Train(dropout))?;
        let uhat = matmul(
            &candle_nn::ops::softmax(&logits, D::Minus1)?,
            self.model.embed(),
        )?;
        let ones = Tensor::ones(b, DType::F32, dev)?;
        let z1 = q_sample_ct(sched, &u, &ones, noise)?;
        let logp = class_log_probs(&self.setup, &self.model.classify(&z1)?, self.model.embed())?;
        let snr_prime = match &split {
            None => sched.snr_derivative(&t)?,
            Some(p) => p.snr_derivative()?,
        };
        let abar0 = sched.alpha_bar(&Tensor::zeros(1, DType::F32, dev)?)?;
        let target = denoise_target(&self.setup, &u);
        let ce = cross_entropy(&logp, y)?;
        let kl = kl_prior_tensor(&u, &abar0)?;
        let denoise = ct_denoise_loss(&uhat, &target, &snr_prime, s.eta)?;
        let total = ((&ce + &kl)? + &denoise)?;
        let mut grads = total.backward()?;
        if let Some(p) = split {
            let terms = ct_denoise_terms(&uhat, &target, &snr_prime, s.eta)?.detach();
            p.join(sched, &terms, &mut grads)?;
        }
        let losses = [
            scalar(&total)?,
            scalar(&ce)?,
            scalar(&kl)?,
            scalar(&denoise)?,
        ];
        Ok(StepGrads {
            grads,
            losses,
            groups: vec![0, 1],
        })
    }

    fn predictor(&self) -> Result<Predict<'_>, TrainError> {
        let s = &self.params;
        Ok(Box::new(
            move |x: &Tensor, modes: &[Inference], rng: &mut NoiseRng| {
                // The samplers read only the batch size and dtype from their `x`;
                // the network reads the precomputed image features instead.
                let (den, xs) = Cached::prepare(&self.model, x, modes.len())?;
                // Every run of one call shares its mode (the deterministic run is separate).
                let mode = modes.first().copied().unwrap_or(Inference::Stochastic);
                let z1 = match s.sampler {
                    CtSampler::Eq3 => sample_ct_eq3(&den, &self.schedule, &xs, s.steps, mode, rng)?,
                    CtSampler::Flow(solver) => {
                        sample_ct_ode(&den, &self.schedule, &xs, s.steps, solver, rng)?
                    }
                };
                predicted_classes(&self.setup, &self.model.classify(&z1)?, self.model.embed())
            },
        ))
    }

    /// Only the eq. 3 sampler has noise to switch off; the ODE samplers are
    /// deterministic given `z_0`.
    fn deterministic_run(&self) -> DeterministicRun {
        match self.params.sampler {
            CtSampler::Eq3 => DeterministicRun::Separate,
            CtSampler::Flow(_) => DeterministicRun::None,
        }
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut tensors = self.model.named_tensors();
        for (name, var) in self.schedule.vars() {
            tensors.insert(name, var.as_tensor().clone());
        }
        tensors
    }

    /// The schedule's tensors (`schedule.*`) to the schedule, the rest to
    /// the model, which refuses a name it does not know.
    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        let (schedule, model): (BTreeMap<_, _>, BTreeMap<_, _>) = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| k.starts_with("schedule."));
        self.model.load_tensors(&model)?;
        self.schedule.load(&schedule)?;
        Ok(())
    }

    fn embed(&self) -> &Tensor {
        self.model.embed()
    }

    fn params_mut(&mut self) -> &mut dyn MethodParams {
        &mut self.params
    }
}

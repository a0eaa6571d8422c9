//! The adjoint baseline: a neural ODE `dz/dt = f(z, x, t) = logits(z, x, t) W_embed`
//! on the continuous-time network, `z(0) ~ N(0, I)`, a Linear classifier
//! on `z(1)`, trained end to end on the cross-entropy with gradients from
//! the adjoint method (Chen et al. 2018).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use noprop_core::{adjoint_euler, odeint_euler, Inference, NoiseRng, VelocityField};
use noprop_data::{Dataset, DatasetKind};
use noprop_kernels::matmul;
use noprop_models::{CtModel, Mode, NetShape, FIGURE6};

use serde::{Deserialize, Serialize};

use crate::continuous::{Cached, STEPS, TIME_DIM, TIME_SCALE};
use crate::error::{ConfigError, TrainError};
use crate::groups::{trainable, ParamGroup};
use crate::method::{
    build_ct_model, class_log_probs, network_group, no_such_sampler, predicted_classes, scalar,
    DeterministicRun, Method, MethodParams, Predict, Setup, StepGrads,
};
use crate::sections::{between, limits, CtSampler, OptimizerKind, TimeEmbedding};

/// Names of the image path's variables in the network.
const IMAGE_PATH: &str = "net.img.";

/// `[method] kind = "adjoint"`: the adjoint baseline's parameters (Table 3's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdjointParams {
    /// Dimension of the sinusoidal time embedding.
    pub time_dim: usize,
    /// `t` is embedded as `time_scale * t`.
    pub time_scale: f64,
    /// Euler steps of the forward and adjoint solves in training (1000 in the paper).
    pub train_steps: usize,
    /// Euler steps at inference (1000 in the paper).
    pub steps: usize,
}

impl Default for AdjointParams {
    fn default() -> Self {
        Self {
            time_dim: TIME_DIM,
            time_scale: TIME_SCALE,
            train_steps: STEPS,
            steps: STEPS,
        }
    }
}

impl MethodParams for AdjointParams {
    /// 2 epochs on MNIST, 4 on CIFAR; AdamW.
    fn paper_training(&self, dataset: DatasetKind) -> (usize, OptimizerKind) {
        let epochs = if dataset == DatasetKind::Mnist { 2 } else { 4 };
        (epochs, OptimizerKind::Adamw)
    }
    fn check(&self) -> Result<(), ConfigError> {
        between("method.train_steps", self.train_steps, 1, limits::STEPS)?;
        Ok(())
    }
    fn inference_steps(&self) -> usize {
        self.steps
    }
    fn time(&self) -> Option<TimeEmbedding> {
        Some(TimeEmbedding::new(self.time_dim, self.time_scale))
    }
    fn parameters(&self, shape: &NetShape) -> u128 {
        FIGURE6.shared_parameters(shape) + FIGURE6.ct_net_parameters(shape, self.time_dim)
    }
    /// The adjoint baseline has no denoising or flow target to detach.
    fn has_target(&self) -> bool {
        false
    }
    fn set_inference(
        &mut self,
        steps: Option<usize>,
        sampler: Option<CtSampler>,
    ) -> Result<(), ConfigError> {
        if let Some(s) = sampler.filter(|s| *s != CtSampler::Flow(noprop_core::OdeSolver::Euler)) {
            return Err(no_such_sampler("the adjoint baseline", "euler", s));
        }
        self.steps = steps.unwrap_or(self.steps);
        Ok(())
    }
}

/// The network, head and embedding of the adjoint baseline.
pub struct Adjoint {
    params: AdjointParams,
    setup: Setup,
    model: CtModel,
}

impl Adjoint {
    /// A fresh model initialised from the config's seed.
    pub fn new(
        params: &AdjointParams,
        setup: &Setup,
        device: &Device,
        train: Option<&Dataset>,
    ) -> Result<Self, TrainError> {
        let time = TimeEmbedding::new(params.time_dim, params.time_scale);
        Ok(Self {
            params: params.clone(),
            setup: setup.clone(),
            model: build_ct_model(setup, time, device, train)?,
        })
    }

    /// The model.
    pub fn model(&self) -> &CtModel {
        &self.model
    }
}

impl Method for Adjoint {
    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError> {
        Ok(vec![network_group(&self.model)?])
    }

    /// The loss on a minibatch and the gradients of every trainable variable.
    ///
    /// `z(0) ~ N(0, I)` is integrated to `z(1)` by `train_steps` Euler
    /// steps without keeping the trajectory; the cross-entropy of the head
    /// on `z(1)` gives `dL/dz(1)`, and [`adjoint_euler`] integrates back to
    /// `t = 0`. The image features do not depend on `z` or `t`, so they are
    /// computed once (with one dropout mask for the whole solve), their
    /// gradient is accumulated along the adjoint solve like a parameter's,
    /// and back-propagated through the image path once. Reported as `[ce, ce, 0, 0]`.
    fn gradients(
        &self,
        _lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        let steps = self.params.train_steps;
        let b = x.dim(0)?;
        let net = self.model.net();
        let embed = self.model.embed();
        // The image features enter every step only through `p = fx W1a^T + b1`
        // (constant over the solve): the solve treats `p` as a parameter and
        // the image path and `W1a`, `b1` get their gradient once, from `dL/dp`.
        let p = net.project_features(&net.image_features(x, &mut Mode::Train(dropout))?)?;
        let p_in = Var::from_tensor(&p.detach())?;
        let f = |z: &Tensor, t: f64| -> candle_core::Result<Tensor> {
            matmul(
                &net.logits_projected(z, t, p_in.as_tensor(), &mut Mode::Eval)?,
                embed,
            )
        };
        let z0 = noise.randn(&[b, embed.dim(1)?], DType::F32, x.device())?;
        let z1 = Var::from_tensor(&odeint_euler(f, &z0, steps)?)?;
        let logp = class_log_probs(&self.setup, &self.model.classify(z1.as_tensor())?, embed)?;
        let ce = noprop_core::cross_entropy(&logp, y)?;
        let mut grads = ce.backward()?;
        let a1 = grads
            .remove(z1.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("the loss does not depend on z(1)".into()))?;
        // Everything f reads: the network outside its image path, a learned embedding, `p`.
        let net_vars = trainable(self.model.net_vars())?;
        let mut ode_vars: Vec<Var> = net_vars
            .iter()
            .filter(|(n, _)| !n.starts_with(IMAGE_PATH))
            .map(|(_, v)| v.clone())
            .collect();
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
        let ce = scalar(&ce)?;
        Ok(StepGrads {
            grads,
            losses: [ce, ce, 0.0, 0.0],
            groups: vec![0],
        })
    }

    /// Euler steps of the ODE from `z(0) ~ N(0, I)`; runs differ only in their draw of `z(0)`.
    fn predictor(&self) -> Result<Predict<'_>, TrainError> {
        let steps = self.params.steps;
        Ok(Box::new(
            move |x: &Tensor, modes: &[Inference], rng: &mut NoiseRng| {
                let (den, xs) = Cached::prepare(&self.model, x, modes.len())?;
                let z0 = rng.randn(
                    &[den.rows()?, self.model.embed().dim(1)?],
                    DType::F32,
                    x.device(),
                )?;
                let z1 = odeint_euler(|z, t| den.velocity_at(z, &xs, t), &z0, steps)?;
                predicted_classes(&self.setup, &self.model.classify(&z1)?, self.model.embed())
            },
        ))
    }

    fn deterministic_run(&self) -> DeterministicRun {
        DeterministicRun::None
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.model.named_tensors()
    }

    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        Ok(self.model.load_tensors(tensors)?)
    }

    fn embed(&self) -> &Tensor {
        self.model.embed()
    }

    fn params_mut(&mut self) -> &mut dyn MethodParams {
        &mut self.params
    }
}

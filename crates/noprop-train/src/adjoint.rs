//! The adjoint baseline: a neural ODE `dz/dt = f(z, x, t) = logits(z, x, t) W_embed`
//! on the continuous-time network, `z(0) ~ N(0, I)`, a Linear classifier
//! on `z(1)`, trained end to end on the cross-entropy with gradients from
//! the adjoint method (Chen et al. 2018).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use noprop_core::{adjoint_euler, odeint_euler, Inference, NoiseRng, VelocityField};
use noprop_data::Dataset;
use noprop_kernels::matmul;
use noprop_models::{CtModel, Mode};

use crate::config::{AdjointSettings, Config};
use crate::continuous::Cached;
use crate::error::TrainError;
use crate::groups::{trainable, ParamGroup};
use crate::method::{
    build_ct_model, class_log_probs, network_group, predicted_classes, scalar, settings,
    DeterministicRun, Method, Predict, StepGrads,
};

/// Names of the image path's variables in the network.
const IMAGE_PATH: &str = "net.img.";

/// The network, head and embedding of the adjoint baseline.
pub struct Adjoint {
    model: CtModel,
}

impl Adjoint {
    /// A fresh model initialised from the config's seed.
    pub fn new(cfg: &Config, device: &Device, train: Option<&Dataset>) -> Result<Self, TrainError> {
        Ok(Self {
            model: build_ct_model(cfg, settings::<AdjointSettings>(cfg)?.time, device, train)?,
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
        cfg: &Config,
        _lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        let steps = settings::<AdjointSettings>(cfg)?.train_steps;
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
        let logp = class_log_probs(cfg, &self.model.classify(z1.as_tensor())?, embed)?;
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
    fn predictor<'a>(&'a self, cfg: &'a Config) -> Result<Predict<'a>, TrainError> {
        let steps = settings::<AdjointSettings>(cfg)?.steps;
        Ok(Box::new(
            move |x: &Tensor, modes: &[Inference], rng: &mut NoiseRng| {
                let (den, xs) = Cached::prepare(&self.model, x, modes.len())?;
                let z0 = rng.randn(
                    &[den.rows()?, self.model.embed().dim(1)?],
                    DType::F32,
                    x.device(),
                )?;
                let z1 = odeint_euler(|z, t| den.velocity_at(z, &xs, t), &z0, steps)?;
                predicted_classes(cfg, &self.model.classify(&z1)?, self.model.embed())
            },
        ))
    }

    fn deterministic_run(&self, _cfg: &Config) -> Result<DeterministicRun, TrainError> {
        Ok(DeterministicRun::None)
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
}

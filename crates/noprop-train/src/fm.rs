//! NoProp-FM (Algorithm 3): one continuous-time network trained to match the
//! velocity of the path from noise to the label embedding; evaluated by
//! integrating the flow and taking the nearest class embedding.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use noprop_core::{
    fm_extrapolate, fm_interpolate, fm_loss, nearest_embedding, sample_fm, Inference, NoiseRng,
};
use noprop_data::Dataset;
use noprop_kernels::matmul;
use noprop_models::{CtModel, Mode};

use crate::config::{Config, FmSettings};
use crate::continuous::Cached;
use crate::error::TrainError;
use crate::groups::ParamGroup;
use crate::method::{
    build_ct_model, class_log_probs, denoise_target, draw_times, network_group, scalar, settings,
    DeterministicRun, Method, Predict, StepGrads,
};

/// NoProp-FM's network, head and embedding.
pub struct Fm {
    model: CtModel,
}

impl Fm {
    /// A fresh model initialised from the config's seed.
    pub fn new(cfg: &Config, device: &Device, train: Option<&Dataset>) -> Result<Self, TrainError> {
        Ok(Self {
            model: build_ct_model(cfg, settings::<FmSettings>(cfg)?.time, device, train)?,
        })
    }

    /// The model.
    pub fn model(&self) -> &CtModel {
        &self.model
    }
}

impl Method for Fm {
    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError> {
        Ok(vec![network_group(&self.model)?])
    }

    /// Algorithm 3's flow-matching loss on a minibatch; with a learned
    /// embedding, plus the cross-entropy of the extrapolated `z_1` (the
    /// anchor that keeps the embedding from collapsing). Reported as
    /// `[total, ce, 0, flow]`. The times follow `t_sampling`; with
    /// `target_grad = false` the flow target `u_y - z_0` is detached from
    /// `W_embed` (the path `z_t` and the anchor keep their gradients).
    fn gradients(
        &self,
        cfg: &Config,
        _lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        let s = settings::<FmSettings>(cfg)?;
        let (b, dev) = (x.dim(0)?, x.device());
        let u = self.model.embed().index_select(y, 0)?;
        let t = draw_times(s.t_sampling, b, dev, noise)?;
        let z0 = noise.randn(u.dims(), DType::F32, dev)?;
        let zt = fm_interpolate(&z0, &u, &t, s.sigma, noise)?;
        let logits = self
            .model
            .net()
            .forward(&zt, x, &t, &mut Mode::Train(dropout))?;
        let v = matmul(&logits, self.model.embed())?;
        let flow = fm_loss(&v, &z0, &denoise_target(cfg, &u))?;
        let (total, ce) = if self.model.embedding().var().is_some() {
            let z1 = fm_extrapolate(&zt, &v, &t)?;
            let ce = noprop_core::cross_entropy(
                &class_log_probs(cfg, &self.model.classify(&z1)?, self.model.embed())?,
                y,
            )?;
            ((&flow + &ce)?, scalar(&ce)?)
        } else {
            (flow.clone(), 0.0)
        };
        let grads = total.backward()?;
        Ok(StepGrads {
            grads,
            losses: [scalar(&total)?, ce, 0.0, scalar(&flow)?],
            groups: vec![0],
        })
    }

    fn predictor<'a>(&'a self, cfg: &'a Config) -> Result<Predict<'a>, TrainError> {
        let s = settings::<FmSettings>(cfg)?;
        Ok(Box::new(
            move |x: &Tensor, modes: &[Inference], rng: &mut NoiseRng| {
                let (den, xs) = Cached::prepare(&self.model, x, modes.len())?;
                let z1 = sample_fm(&den, &xs, s.steps, s.solver, rng)?;
                Ok(nearest_embedding(&z1, self.model.embed())?.to_vec1()?)
            },
        ))
    }

    /// The flow is deterministic given `z_0`.
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

//! NoProp-FM (Algorithm 3): one continuous-time network trained to match the
//! velocity of the path from noise to the label embedding; evaluated by
//! integrating the flow and taking the nearest class embedding.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use noprop_core::{
    fm_extrapolate, fm_interpolate, fm_loss, nearest_embedding, sample_fm, Inference, NoiseRng,
    OdeSolver,
};
use noprop_data::{Dataset, DatasetKind};
use noprop_kernels::matmul;
use noprop_models::{CtModel, Mode, NetShape, FIGURE6};

use serde::{Deserialize, Serialize};

use crate::continuous::{Cached, STEPS, TIME_DIM, TIME_SCALE};
use crate::ct::CtParams;
use crate::error::{ConfigError, TrainError};
use crate::groups::ParamGroup;
use crate::method::{
    build_ct_model, class_log_probs, denoise_target, draw_times, network_group, no_such_sampler,
    scalar, DeterministicRun, Method, MethodParams, Predict, Setup, StepGrads,
};
use crate::sections::{finite, CtSampler, OptimizerKind, TimeEmbedding, TimeSampling};

/// `[method] kind = "fm"`: NoProp-FM's parameters (Table 3's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FmParams {
    /// Standard deviation `sigma` of the interpolation noise.
    pub sigma: f64,
    /// Dimension of the sinusoidal time embedding.
    pub time_dim: usize,
    /// `t` is embedded as `time_scale * t`.
    pub time_scale: f64,
    /// The ODE solver at inference.
    pub solver: OdeSolver,
    /// Integration steps at inference (1000 in the paper).
    pub steps: usize,
    /// How the training times `t_i` are drawn: `uniform` (the paper's,
    /// default) or `stratified`.
    pub t_sampling: TimeSampling,
}

impl Default for FmParams {
    fn default() -> Self {
        Self {
            sigma: 0.0,
            time_dim: TIME_DIM,
            time_scale: TIME_SCALE,
            solver: OdeSolver::Euler,
            steps: STEPS,
            t_sampling: TimeSampling::Uniform,
        }
    }
}

impl MethodParams for FmParams {
    /// As NoProp-CT: 100 / 500 / 1000 epochs; Adam with the decay as an L2 term.
    fn paper_training(&self, dataset: DatasetKind) -> (usize, OptimizerKind) {
        CtParams::default().paper_training(dataset)
    }
    fn check(&self) -> Result<(), ConfigError> {
        finite("method.sigma", self.sigma, true)?;
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
    fn set_inference(
        &mut self,
        steps: Option<usize>,
        sampler: Option<CtSampler>,
    ) -> Result<(), ConfigError> {
        match sampler {
            Some(CtSampler::Flow(s)) => self.solver = s,
            Some(CtSampler::Eq3) => {
                return Err(no_such_sampler("NoProp-FM", "euler or heun", "eq3"))
            }
            None => {}
        }
        self.steps = steps.unwrap_or(self.steps);
        Ok(())
    }
}

/// NoProp-FM's network, head and embedding.
pub struct Fm {
    params: FmParams,
    setup: Setup,
    model: CtModel,
}

impl Fm {
    /// A fresh model initialised from the config's seed.
    pub fn new(
        params: &FmParams,
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
        _lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        let s = &self.params;
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
        let flow = fm_loss(&v, &z0, &denoise_target(&self.setup, &u))?;
        let (total, ce) = if self.model.embedding().var().is_some() {
            let z1 = fm_extrapolate(&zt, &v, &t)?;
            let ce = noprop_core::cross_entropy(
                &class_log_probs(&self.setup, &self.model.classify(&z1)?, self.model.embed())?,
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

    fn predictor(&self) -> Result<Predict<'_>, TrainError> {
        let s = &self.params;
        Ok(Box::new(
            move |x: &Tensor, modes: &[Inference], rng: &mut NoiseRng| {
                let (den, xs) = Cached::prepare(&self.model, x, modes.len())?;
                let z1 = sample_fm(&den, &xs, s.steps, s.solver, rng)?;
                Ok(nearest_embedding(&z1, self.model.embed())?.to_vec1()?)
            },
        ))
    }

    /// The flow is deterministic given `z_0`.
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

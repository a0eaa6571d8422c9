//! The back-propagation baseline (spec section 10, eq. 17-19): NoProp-DT's
//! blocks and head chained into one network,
//!
//! ```text
//! z_0 ~ N(0, I),   z_t = (1 - alpha_t) z_{t-1} + alpha_t uhat_t(z_{t-1}, x),   alpha_t = tanh(w_t),
//! ```
//!
//! with the cross-entropy of `f_out(z_T)` as the only loss, trained end to
//! end by back-propagation through all `T` blocks.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use noprop_core::{Inference, NoiseRng};
use noprop_data::{Dataset, DatasetKind};
use noprop_models::{DtModel, Mode, NetShape, FIGURE6};

use serde::{Deserialize, Serialize};

use crate::dt::DtParams;
use crate::error::{ConfigError, TrainError};
use crate::groups::{trainable, ParamGroup, EMBED};
use crate::method::{
    blocks_only, build_dt_model, class_log_probs, predicted_classes, scalar, stack_runs,
    DeterministicRun, Method, MethodParams, Predict, Setup, StepGrads,
};
use crate::sections::{between, limits, CtSampler, HeadInit, OptimizerKind};

/// `[method] kind = "backprop"`: the back-propagation baseline's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackpropParams {
    /// Number of blocks `T`.
    pub blocks: usize,
    /// The initial `alpha_t = tanh(w_t)` of every block, in (-1, 1)
    /// (the paper does not say).
    pub alpha_init: f64,
}

impl Default for BackpropParams {
    fn default() -> Self {
        Self {
            blocks: 10,
            alpha_init: 0.5,
        }
    }
}

impl MethodParams for BackpropParams {
    /// As NoProp-DT: 100 epochs on MNIST, 150 on CIFAR; AdamW.
    fn paper_training(&self, dataset: DatasetKind) -> (usize, OptimizerKind) {
        DtParams::default().paper_training(dataset)
    }
    fn check(&self) -> Result<(), ConfigError> {
        between("method.blocks", self.blocks, 1, limits::BLOCKS)?;
        if !(self.alpha_init.is_finite() && self.alpha_init.abs() < 1.0) {
            return Err(ConfigError::invalid(
                "method.alpha_init",
                "lie in (-1, 1)",
                self.alpha_init,
            ));
        }
        Ok(())
    }
    fn blocks(&self) -> Option<usize> {
        Some(self.blocks)
    }
    fn inference_steps(&self) -> usize {
        self.blocks
    }
    /// The blocks and a `w_t` per block.
    fn parameters(&self, shape: &NetShape) -> u128 {
        FIGURE6.shared_parameters(shape)
            + self.blocks as u128 * (FIGURE6.dt_block_parameters(shape) + 1)
    }
    fn default_head_init(&self) -> HeadInit {
        HeadInit::Embedding
    }
    /// The baseline has no denoising target to detach.
    fn has_target(&self) -> bool {
        false
    }
    fn set_inference(
        &mut self,
        steps: Option<usize>,
        sampler: Option<CtSampler>,
    ) -> Result<(), ConfigError> {
        blocks_only(steps, sampler)
    }
}

/// The checkpoint name of the `[T]` vector of `w_t`.
pub const ALPHA_NAME: &str = "alpha.w";

/// The chained model and its `w_t`.
pub struct Backprop {
    params: BackpropParams,
    setup: Setup,
    model: DtModel,
    /// `w_t`, `alpha_t = tanh(w_t)`, `[T]`.
    alpha: Var,
}

impl Backprop {
    /// A fresh model; prototype embeddings are initialised from `train`.
    pub fn new(
        params: &BackpropParams,
        setup: &Setup,
        device: &Device,
        train: Option<&Dataset>,
    ) -> Result<Self, TrainError> {
        // build_dt_model aligns the head when `head_init = "embedding"` (the default here).
        let model = build_dt_model(setup, params.blocks, device, train)?;
        let w0 = params.alpha_init.atanh() as f32;
        let alpha = Var::from_tensor(&Tensor::full(w0, params.blocks, device)?)?;
        Ok(Self {
            params: params.clone(),
            setup: setup.clone(),
            model,
            alpha,
        })
    }

    /// The model (blocks, head, embedding).
    pub fn model(&self) -> &DtModel {
        &self.model
    }

    /// `alpha_t = tanh(w_t)` for `t = 1..=T`.
    pub fn alphas(&self) -> Result<Vec<f32>, TrainError> {
        Ok(self.alpha.as_tensor().tanh()?.to_vec1()?)
    }
}

/// Eq. 17: `(1 - alpha) z + alpha uhat` with `alpha` of shape `[1]`.
fn chain(z: &Tensor, uhat: &Tensor, alpha: &Tensor) -> candle_core::Result<Tensor> {
    z.broadcast_sub(&z.broadcast_mul(alpha)?)?
        .broadcast_add(&uhat.broadcast_mul(alpha)?)
}

impl Method for Backprop {
    /// Group 0: blocks, head and a learned embedding; group 1: `w`, at the
    /// same learning rate without weight decay (which would pull every
    /// `alpha_t` to 0).
    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError> {
        let mut vars = Vec::new();
        for t in 1..=self.model.config().blocks {
            vars.extend(trainable(self.model.block_vars(t))?);
        }
        vars.extend(trainable(self.model.head_vars())?);
        if let Some(v) = self.model.embedding().var() {
            vars.push((EMBED.into(), v.clone()));
        }
        Ok(vec![
            ParamGroup { vars, decay: true },
            ParamGroup {
                vars: vec![(ALPHA_NAME.into(), self.alpha.clone())],
                decay: false,
            },
        ])
    }

    /// The cross-entropy of a minibatch through the whole chain; reported as `[ce, ce, 0, 0]`.
    fn gradients(
        &self,
        _lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        let d = self.model.config().block.latent_dim;
        let alpha = self.alpha.as_tensor().tanh()?;
        let mut z = noise.randn(&[x.dim(0)?, d], DType::F32, x.device())?;
        let mut mode = Mode::Train(dropout);
        for t in 1..=self.model.config().blocks {
            let uhat = self.model.denoise_mode(t, &z, x, &mut mode)?;
            z = chain(&z, &uhat, &alpha.narrow(0, t - 1, 1)?)?;
        }
        let logp = class_log_probs(&self.setup, &self.model.classify(&z)?, self.model.embed())?;
        let ce = noprop_core::cross_entropy(&logp, y)?;
        let grads = ce.backward()?;
        let ce = scalar(&ce)?;
        Ok(StepGrads {
            grads,
            losses: [ce, ce, 0.0, 0.0],
            groups: vec![0, 1],
        })
    }

    /// The chain from `z_0 ~ N(0, I)`; runs differ only in their draw of
    /// `z_0`, and each block's image features are computed once per batch.
    fn predictor(&self) -> Result<Predict<'_>, TrainError> {
        let alpha = self.alpha.as_tensor().tanh()?;
        let d = self.model.config().block.latent_dim;
        Ok(Box::new(
            move |x: &Tensor, modes: &[Inference], rng: &mut NoiseRng| {
                let (runs, b) = (modes.len(), x.dim(0)?);
                let feats = self.model.image_features(x)?;
                let mut z = rng.randn(&[runs * b, d], DType::F32, x.device())?;
                for (t, fx) in feats.iter().enumerate() {
                    let fx = stack_runs(fx, runs)?;
                    let uhat = self.model.denoise_from_features(t + 1, &z, &fx)?;
                    z = chain(&z, &uhat, &alpha.narrow(0, t, 1)?)?;
                }
                predicted_classes(&self.setup, &self.model.classify(&z)?, self.model.embed())
            },
        ))
    }

    /// The chain has no noise but `z_0`.
    fn deterministic_run(&self) -> DeterministicRun {
        DeterministicRun::None
    }

    fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut tensors = self.model.named_tensors();
        tensors.insert(ALPHA_NAME.into(), self.alpha.as_tensor().clone());
        tensors
    }

    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        let mut tensors = tensors.clone();
        let w =
            tensors
                .remove(ALPHA_NAME)
                .ok_or_else(|| noprop_models::ModelError::MissingTensor {
                    name: ALPHA_NAME.into(),
                })?;
        if w.dims() != self.alpha.dims() {
            return Err(noprop_models::ModelError::ShapeMismatch {
                name: ALPHA_NAME.into(),
                expected: self.alpha.dims().to_vec(),
                found: w.dims().to_vec(),
            }
            .into());
        }
        self.alpha
            .set(&w.to_dtype(DType::F32)?.to_device(self.alpha.device())?)?;
        Ok(self.model.load_tensors(&tensors)?)
    }

    fn embed(&self) -> &Tensor {
        self.model.embed()
    }

    fn params_mut(&mut self) -> &mut dyn MethodParams {
        &mut self.params
    }
}

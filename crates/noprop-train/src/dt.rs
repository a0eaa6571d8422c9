//! NoProp-DT (Algorithm 1): `T` blocks, each trained to denoise a noisy
//! label embedding on its own loss `L_t`, evaluated with the eq. 3 sampler.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use noprop_core::{
    cross_entropy, denoise_loss, dt_step, kl_prior, q_sample, DiscreteSchedule, Inference,
    NoiseRng, ScheduleSpec,
};
use noprop_data::{Dataset, DatasetKind};
use noprop_models::{DtModel, Mode, NetShape, FIGURE6};
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, TrainError};
use crate::groups::{trainable, ParamGroup, EMBED};
use crate::method::{
    blocks_only, build_dt_model, class_log_probs, denoise_target, predicted_classes, scalar,
    stack_runs, DeterministicRun, Method, MethodParams, Pass, Predict, Setup, StepGrads,
};
use crate::sections::{between, finite, limits, CtSampler, OptimizerKind};

/// `[method] kind = "dt"`: NoProp-DT's parameters (Table 3's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DtParams {
    /// Number of blocks `T` (10 in the paper).
    pub blocks: usize,
    /// The denoising weight `eta` of eq. 61.
    pub eta: f64,
    /// The order in which blocks are trained.
    pub order: TrainOrder,
    /// The noise schedule (cosine by default).
    pub schedule: ScheduleSpec,
}

impl Default for DtParams {
    fn default() -> Self {
        Self {
            blocks: 10,
            eta: 0.1,
            order: TrainOrder::Sequential,
            schedule: ScheduleSpec::default(),
        }
    }
}

/// How the blocks of NoProp-DT are visited during an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOrder {
    /// Algorithm 1: for t = 1..T, one full pass over the data for block t.
    #[default]
    Sequential,
    /// One pass over the data per epoch that trains every block on each
    /// minibatch (each on its own noisy `z_{t-1}`), the head after each
    /// block: every parameter gets as many updates as in `Sequential`.
    Fused,
    /// One pass per epoch in which every block steps on each minibatch from
    /// the same head and embedding, and those shared parameters step once
    /// per minibatch with the sum of the blocks' gradients, added in block
    /// order. Blocks then need nothing of each other within a step, so a
    /// parallel run can split them whatever the embedding, exchanging only
    /// the shared parameters' gradients; the head and a learned embedding
    /// get one update per minibatch instead of `T`.
    Synchronous,
}

impl DtParams {
    /// The schedule `alpha_bar_0..=T` these parameters describe.
    pub fn built_schedule(&self) -> Result<DiscreteSchedule, ConfigError> {
        self.schedule
            .build(self.blocks)
            .map_err(|e| ConfigError::nested("method.schedule", e))
    }
}

impl MethodParams for DtParams {
    /// 100 epochs on MNIST, 150 on CIFAR; AdamW.
    fn paper_training(&self, dataset: DatasetKind) -> (usize, OptimizerKind) {
        let epochs = if dataset == DatasetKind::Mnist {
            100
        } else {
            150
        };
        (epochs, OptimizerKind::Adamw)
    }
    fn check(&self) -> Result<(), ConfigError> {
        between("method.blocks", self.blocks, 1, limits::BLOCKS)?;
        finite("method.eta", self.eta, true)?;
        self.built_schedule().map(|_| ())
    }
    fn blocks(&self) -> Option<usize> {
        Some(self.blocks)
    }
    fn independent_blocks(&self) -> Option<usize> {
        Some(self.blocks)
    }
    fn inference_steps(&self) -> usize {
        self.blocks
    }
    fn parameters(&self, shape: &NetShape) -> u128 {
        FIGURE6.shared_parameters(shape) + self.blocks as u128 * FIGURE6.dt_block_parameters(shape)
    }
    fn alpha_bars(&self) -> Option<Vec<f64>> {
        self.built_schedule().ok().map(|s| s.alpha_bars().to_vec())
    }
    fn set_inference(
        &mut self,
        steps: Option<usize>,
        sampler: Option<CtSampler>,
    ) -> Result<(), ConfigError> {
        blocks_only(steps, sampler)
    }
}

/// NoProp-DT's model: `T` blocks, the head and `W_embed`.
pub struct Dt {
    params: DtParams,
    schedule: DiscreteSchedule,
    setup: Setup,
    model: DtModel,
}

impl Dt {
    /// A fresh model initialised from the config's seed; prototype
    /// embeddings are initialised from `train`.
    pub fn new(
        params: &DtParams,
        setup: &Setup,
        device: &Device,
        train: Option<&Dataset>,
    ) -> Result<Self, TrainError> {
        Ok(Self {
            params: params.clone(),
            schedule: params.built_schedule()?,
            setup: setup.clone(),
            model: build_dt_model(setup, params.blocks, device, train)?,
        })
    }

    /// The model.
    pub fn model(&self) -> &DtModel {
        &self.model
    }

    /// Block `t`'s draws on a minibatch with labels `y`, in this order:
    /// `u_y`, `z_{t-1} ~ q(z_{t-1} | y)` and `z_T ~ q(z_T | y)`.
    fn draw(
        &self,
        t: usize,
        y: &Tensor,
        noise: &mut NoiseRng,
    ) -> Result<(Tensor, Tensor, Tensor), TrainError> {
        let sched = &self.schedule;
        let u = self.model.embed().index_select(y, 0)?;
        let z_prev = q_sample(&u, sched.alpha_bar(t - 1)?, noise)?;
        let z_last = q_sample(&u, sched.alpha_bar(sched.blocks())?, noise)?;
        Ok((u, z_prev, z_last))
    }

    /// The cross-entropy of the head's class probabilities from `z_T`.
    fn head_loss(&self, z_last: &Tensor, y: &Tensor) -> Result<Tensor, TrainError> {
        // log p(y | z_T) as "logits": log_softmax leaves log-probabilities unchanged.
        let logp = class_log_probs(
            &self.setup,
            &self.model.classify(z_last)?,
            self.model.embed(),
        )?;
        Ok(cross_entropy(&logp, y)?)
    }
}

impl Method for Dt {
    /// Group 0 is shared by every block: the head and a learned embedding
    /// (stepped with every block's minibatch); group `t` is block `t`.
    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError> {
        let mut shared = trainable(self.model.head_vars())?;
        if let Some(var) = self.model.embedding().var() {
            shared.push((EMBED.to_string(), var.clone()));
        }
        let mut groups = vec![ParamGroup {
            vars: shared,
            decay: true,
        }];
        for t in 1..=self.model.config().blocks {
            groups.push(ParamGroup {
                vars: trainable(self.model.block_vars(t))?,
                decay: true,
            });
        }
        Ok(groups)
    }

    /// Sequential (Algorithm 1): a pass per block, keyed by the block.
    /// Fused: one pass keyed 0 that trains every block on each minibatch.
    fn epoch_plan(&self) -> Result<Vec<Pass>, TrainError> {
        let blocks = self.model.config().blocks;
        Ok(match self.params.order {
            TrainOrder::Sequential => (1..=blocks)
                .map(|t| Pass {
                    key: t,
                    lanes: vec![t],
                    summed: false,
                })
                .collect(),
            TrainOrder::Fused | TrainOrder::Synchronous => vec![Pass {
                key: 0,
                lanes: (1..=blocks).collect(),
                summed: self.params.order == TrainOrder::Synchronous,
            }],
        })
    }

    /// Block `t`'s loss `L_t` (eq. 61's term for `t`) on a minibatch, as
    /// [`noprop_core::dt_loss`] assembles it, with the denoising target
    /// detached when `target_grad = false`.
    fn gradients(
        &self,
        t: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        let sched = &self.schedule;
        let (u, z_prev, z_last) = self.draw(t, y, noise)?;
        let uhat = self
            .model
            .denoise_mode(t, &z_prev, x, &mut Mode::Train(dropout))?;
        let ce = self.head_loss(&z_last, y)?;
        let kl = kl_prior(&u, sched.alpha_bar(0)?)?;
        let denoise = denoise_loss(
            &uhat,
            &denoise_target(&self.setup, &u),
            sched.dt_weight(t, self.params.eta)?,
        )?;
        let total = ((&ce + &kl)? + &denoise)?;
        let grads = total.backward()?;
        let losses = [
            scalar(&total)?,
            scalar(&ce)?,
            scalar(&kl)?,
            scalar(&denoise)?,
        ];
        Ok(StepGrads {
            grads,
            losses,
            groups: vec![t, 0],
        })
    }

    /// The eq. 3 sampler from `z_0 ~ N(0, I)` through all `T` blocks, each
    /// folded for inference; the image path does not depend on `z`, so each
    /// block's image features are computed once per batch for all runs.
    fn predictor(&self) -> Result<Predict<'_>, TrainError> {
        let sched = &self.schedule;
        let d = self.model.config().block.latent_dim;
        // Evaluation-mode BatchNorm folded into the Linear layers before it.
        let blocks = (1..=sched.blocks())
            .map(|t| self.model.block(t).folded())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Box::new(
            move |x: &Tensor, modes: &[Inference], rng: &mut NoiseRng| {
                let (runs, b, dev) = (modes.len(), x.dim(0)?, x.device());
                let feats = blocks
                    .iter()
                    .map(|blk| blk.image_features(x))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let rows = runs * b;
                let mut z = rng.randn(&[rows, d], x.dtype(), dev)?;
                // Rows of deterministic runs get no sampling noise.
                let noise_mask: Vec<f32> = modes
                    .iter()
                    .flat_map(|m| {
                        std::iter::repeat_n(
                            if *m == Inference::Stochastic {
                                1f32
                            } else {
                                0.0
                            },
                            b,
                        )
                    })
                    .collect();
                let noise_mask =
                    Tensor::from_vec(noise_mask, (rows, 1), dev)?.to_dtype(x.dtype())?;
                let any_noise = modes.contains(&Inference::Stochastic);
                for t in 1..=sched.blocks() {
                    let fx = stack_runs(&feats[t - 1], runs)?;
                    let uhat = noprop_models::layers::softmax_embed(
                        &blocks[t - 1].logits_from_features(&z, &fx)?,
                        self.model.embed(),
                    )?;
                    let eps = if any_noise {
                        Some(
                            rng.randn(&[rows, d], x.dtype(), dev)?
                                .broadcast_mul(&noise_mask)?,
                        )
                    } else {
                        None
                    };
                    z = dt_step(sched, t, &uhat, &z, eps.as_ref())?;
                }
                predicted_classes(&self.setup, &self.model.classify(&z)?, self.model.embed())
            },
        ))
    }

    fn deterministic_run(&self) -> DeterministicRun {
        DeterministicRun::Stacked
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

    /// Every block, in either order, when `W_embed` is fixed (one-hot): a
    /// block's step changes only the block and the head, and the head's
    /// gradient (through the cross-entropy on `z_T`) needs no block, so a
    /// worker replays the head's updates for the blocks it does not train
    /// and nothing is exchanged during an epoch. A learned embedding takes
    /// a gradient from every block through its denoising term.
    fn split_lanes(&self) -> Result<Vec<usize>, String> {
        let summed = self.params.order == TrainOrder::Synchronous;
        if self.model.embedding().var().is_some() && !summed {
            return Err(
                "a learned or prototype embedding learns from every block's loss in turn, so \
                 its blocks train on separate workers only with method.order = \"synchronous\""
                    .into(),
            );
        }
        Ok((1..=self.model.config().blocks).collect())
    }

    fn lane_vars(&self, t: usize) -> Vec<(String, Var)> {
        let data = self.model.block_vars(t).data().lock();
        let mut vars: Vec<(String, Var)> = match data {
            Ok(d) => d.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => vec![],
        };
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Block `t`'s step without the block: the same two draws of `z_{t-1}`
    /// and `z_T` as [`Self::gradients`], and the cross-entropy's gradient,
    /// which is the whole step's gradient for the head (the loss's other
    /// terms do not depend on it).
    fn shared_gradients(
        &self,
        t: usize,
        y: &Tensor,
        noise: &mut NoiseRng,
    ) -> Result<StepGrads, TrainError> {
        let (_, _, z_last) = self.draw(t, y, noise)?;
        let ce = self.head_loss(&z_last, y)?;
        Ok(StepGrads {
            grads: ce.backward()?,
            losses: [f64::NAN; 4],
            groups: vec![0],
        })
    }
}

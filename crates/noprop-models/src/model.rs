//! A whole NoProp-DT model: `T` independent blocks, the classifier head
//! `f_out` and the class embedding `W_embed`.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use noprop_core::{sub_seed, Denoiser};

use crate::dt_block::{dt_block, DtBlock, DtBlockConfig};
use crate::embedding::{ClassEmbedding, EmbeddingKind};
use crate::init::seeded_var_builder;
use crate::layers::{linear, softmax_embed, Linear, Mode};
use crate::ModelError;

/// The sub-seed stream of parameter initialisation.
pub(crate) const STREAM_INIT: u64 = noprop_core::Stream::Init as u64;

/// Shapes of a [`DtModel`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DtModelConfig {
    /// Configuration shared by every block.
    pub block: DtBlockConfig,
    /// Number of blocks `T`.
    pub blocks: usize,
    /// The class embedding (its `latent_dim` must equal `block.latent_dim`).
    pub embedding: EmbeddingKind,
}

/// `T` blocks, the head `f_out: R^d -> R^m`, and `W_embed`.
///
/// Each block's parameters live in their own `VarMap` (named `blocks.{t}.…`
/// with `t` in `1..=T`), so that block `t`'s optimizer can never touch
/// another block; the head's are named `head.weight` and `head.bias`, and the
/// embedding is `embed`.
pub struct DtModel {
    cfg: DtModelConfig,
    blocks: Vec<DtBlock>,
    block_vars: Vec<VarMap>,
    head: Linear,
    head_vars: VarMap,
    embed: ClassEmbedding,
}

impl DtModel {
    /// Builds a model with parameters initialised from `seed`. Each block and
    /// the head draw from their own sub-stream, so changing `T` does not change
    /// the initial values of the blocks that remain.
    pub fn new(
        cfg: DtModelConfig,
        embed: ClassEmbedding,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        if cfg.blocks == 0 {
            return Err(ModelError::Config(
                "a model needs at least one block".into(),
            ));
        }
        let d = cfg.block.latent_dim;
        let m = cfg.block.classes;
        if embed.weight().dims() != [m, d] || embed.kind() != cfg.embedding {
            return Err(ModelError::Config(format!(
                "the {:?} embedding has shape {:?}, the blocks expect [{m}, {d}]",
                embed.kind(),
                embed.weight().dims()
            )));
        }
        let mut blocks = Vec::with_capacity(cfg.blocks);
        let mut block_vars = Vec::with_capacity(cfg.blocks);
        for t in 1..=cfg.blocks {
            let vars = VarMap::new();
            let vb = seeded_var_builder(
                &vars,
                sub_seed(seed, &[STREAM_INIT, t as u64]),
                dtype,
                device,
            );
            blocks.push(dt_block(cfg.block, vb.pp(format!("blocks.{t}")))?);
            block_vars.push(vars);
        }
        let head_vars = VarMap::new();
        let vb = seeded_var_builder(&head_vars, sub_seed(seed, &[STREAM_INIT, 0]), dtype, device);
        let head = linear(d, m, vb.pp("head"))?;
        Ok(Self {
            cfg,
            blocks,
            block_vars,
            head,
            head_vars,
            embed,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &DtModelConfig {
        &self.cfg
    }

    /// Block `t` in `1..=T`.
    pub fn block(&self, t: usize) -> &DtBlock {
        &self.blocks[t - 1]
    }

    /// The variables of block `t` in `1..=T` (parameters and BatchNorm buffers).
    pub fn block_vars(&self, t: usize) -> &VarMap {
        &self.block_vars[t - 1]
    }

    /// The classifier head `f_out`.
    pub fn head(&self) -> &Linear {
        &self.head
    }

    /// The head's variables.
    pub fn head_vars(&self) -> &VarMap {
        &self.head_vars
    }

    /// `W_embed` `[m, d]`.
    pub fn embed(&self) -> &Tensor {
        self.embed.weight()
    }

    /// The class embedding (with its variable when learned).
    pub fn embedding(&self) -> &ClassEmbedding {
        &self.embed
    }

    /// Sets `f_out` to `g` times the dual basis of `W_embed`
    /// ([`align_head`](crate::align_head)).
    pub fn align_head(&self) -> Result<(), ModelError> {
        crate::embedding::align_head(&self.head_vars, self.embed.weight())
    }

    /// Block `t`'s prediction `uhat_t(z, x)`.
    pub fn denoise_mode(
        &self,
        t: usize,
        z: &Tensor,
        x: &Tensor,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        self.blocks[t - 1].forward(z, x, self.embed.weight(), mode)
    }

    /// Class logits `f_out(z)` `[B, m]`.
    pub fn classify(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(z)
    }

    /// Every tensor of the model under its checkpoint name, sorted by name.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for vm in self
            .block_vars
            .iter()
            .chain(std::iter::once(&self.head_vars))
        {
            if let Ok(data) = vm.data().lock() {
                for (k, v) in data.iter() {
                    out.insert(k.clone(), v.as_tensor().clone());
                }
            }
        }
        out.insert("embed".to_string(), self.embed.weight().clone());
        out
    }

    /// Overwrites every parameter and buffer with the tensor of the same name.
    /// Every name must be present with the right shape; extra names are an error too.
    pub fn load_tensors(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), ModelError> {
        let maps: Vec<&VarMap> = self.block_vars.iter().chain([&self.head_vars]).collect();
        load_all(&maps, &self.embed, tensors)
    }

    /// The number of trainable scalars in one block.
    pub fn block_parameter_count(&self) -> usize {
        self.block_vars[0]
            .data()
            .lock()
            .map(|d| {
                d.iter()
                    .filter(|(k, _)| !crate::layers::is_buffer(k))
                    .map(|(_, v)| v.elem_count())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Image features of every block for `x` (evaluation mode), to be reused
    /// across several sampling runs on the same images.
    pub fn image_features(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.blocks
            .iter()
            .map(|b| b.image_features(x, &mut Mode::Eval))
            .collect()
    }

    /// `uhat_t` from precomputed image features (evaluation mode).
    pub fn denoise_from_features(
        &self,
        t: usize,
        z: &Tensor,
        fx: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let logits = self.blocks[t - 1].logits_from_features(z, fx, &mut Mode::Eval)?;
        softmax_embed(&logits, self.embed.weight())
    }
}

/// Overwrites every variable of `maps` and the embedding with the tensor
/// of the same name: every name must be present with the right shape, and a
/// name that is neither is an error too. What both models load through.
pub(crate) fn load_all(
    maps: &[&VarMap],
    embed: &ClassEmbedding,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<(), ModelError> {
    let mut known = std::collections::BTreeSet::from(["embed".to_string()]);
    for vm in maps {
        let data = vm
            .data()
            .lock()
            .map_err(|_| ModelError::Config("VarMap poisoned".into()))?;
        for (name, var) in data.iter() {
            let src = tensors
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
            if src.dims() != var.dims() {
                return Err(ModelError::ShapeMismatch {
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    found: src.dims().to_vec(),
                });
            }
            var.set(&src.to_dtype(var.dtype())?.to_device(var.device())?)?;
            known.insert(name.clone());
        }
    }
    load_embedding(embed, tensors)?;
    match tensors.keys().find(|k| !known.contains(*k)) {
        Some(extra) => Err(ModelError::UnexpectedTensor {
            name: extra.clone(),
        }),
        None => Ok(()),
    }
}

/// Loads `embed` into a learned embedding, or checks that a fixed one matches.
fn load_embedding(
    embed: &ClassEmbedding,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<(), ModelError> {
    let w = embed.weight();
    let e = tensors
        .get("embed")
        .ok_or_else(|| ModelError::MissingTensor {
            name: "embed".into(),
        })?;
    if e.dims() != w.dims() {
        return Err(ModelError::ShapeMismatch {
            name: "embed".into(),
            expected: w.dims().to_vec(),
            found: e.dims().to_vec(),
        });
    }
    let e = e.to_dtype(w.dtype())?.to_device(w.device())?;
    match embed.var() {
        Some(var) => var.set(&e)?,
        None => {
            let diff = (e.to_dtype(DType::F64)? - w.to_dtype(DType::F64)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            if diff > 0.0 {
                return Err(ModelError::Config(
                    "the checkpoint's fixed embedding differs from this model's".into(),
                ));
            }
        }
    }
    Ok(())
}

impl Denoiser for DtModel {
    fn blocks(&self) -> usize {
        self.cfg.blocks
    }
    fn latent_dim(&self) -> usize {
        self.cfg.block.latent_dim
    }
    fn denoise(&self, t: usize, z: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        self.denoise_mode(t, z, x, &mut Mode::Eval)
    }
}

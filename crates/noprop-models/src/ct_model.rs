//! A continuous-time model: one [`CtNet`] for all t, the head `f_out` and `W_embed`.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use noprop_core::sub_seed;

use crate::ct_net::{ct_net, CtNet, CtNetConfig};
use crate::embedding::ClassEmbedding;
use crate::init::seeded_var_builder;
use crate::layers::{linear, Linear};
use crate::model::{load_all, STREAM_INIT};
use crate::ModelError;

/// The network (`net.*`), the head (`head.*`) and the embedding (`embed`).
pub struct CtModel {
    net: CtNet,
    net_vars: VarMap,
    head: Linear,
    head_vars: VarMap,
    embed: ClassEmbedding,
}

impl CtModel {
    /// Builds the model with parameters initialised from `seed`.
    pub fn new(
        cfg: CtNetConfig,
        embed: ClassEmbedding,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (m, d) = (cfg.classes, cfg.latent_dim);
        if embed.weight().dims() != [m, d] {
            return Err(ModelError::Config(format!(
                "the embedding has shape {:?}, the network expects [{m}, {d}]",
                embed.weight().dims()
            )));
        }
        let net_vars = VarMap::new();
        let vb = seeded_var_builder(&net_vars, sub_seed(seed, &[STREAM_INIT, 1]), dtype, device);
        let net = ct_net(cfg, vb.pp("net"))?;
        let head_vars = VarMap::new();
        let vb = seeded_var_builder(&head_vars, sub_seed(seed, &[STREAM_INIT, 0]), dtype, device);
        let head = linear(d, m, vb.pp("head"))?;
        Ok(Self {
            net,
            net_vars,
            head,
            head_vars,
            embed,
        })
    }

    /// The network.
    pub fn net(&self) -> &CtNet {
        &self.net
    }

    /// The network's variables.
    pub fn net_vars(&self) -> &VarMap {
        &self.net_vars
    }

    /// The head's variables.
    pub fn head_vars(&self) -> &VarMap {
        &self.head_vars
    }

    /// The class embedding.
    pub fn embedding(&self) -> &ClassEmbedding {
        &self.embed
    }

    /// `W_embed` `[m, d]`.
    pub fn embed(&self) -> &Tensor {
        self.embed.weight()
    }

    /// Sets `f_out` to `g` times the dual basis of `W_embed`
    /// ([`align_head`](crate::align_head)), as [`DtModel::align_head`](crate::DtModel::align_head).
    pub fn align_head(&self) -> Result<(), ModelError> {
        crate::embedding::align_head(&self.head_vars, self.embed.weight())
    }

    /// Class logits `f_out(z)`.
    pub fn classify(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(z)
    }

    /// Every tensor under its checkpoint name.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for vm in [&self.net_vars, &self.head_vars] {
            if let Ok(data) = vm.data().lock() {
                for (k, v) in data.iter() {
                    out.insert(k.clone(), v.as_tensor().clone());
                }
            }
        }
        out.insert("embed".into(), self.embed.weight().clone());
        out
    }

    /// Overwrites every parameter with the tensor of the same name. Every
    /// name must be present with the right shape; extra names are an error too.
    pub fn load_tensors(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), ModelError> {
        load_all(&[&self.net_vars, &self.head_vars], &self.embed, tensors)
    }
}

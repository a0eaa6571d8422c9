//! The networks of NoProp (Figure 6 of Li, Teh, Pascanu 2025): the
//! discrete-time denoising block, the classifier head and the class
//! embedding, with seeded initialisation and a choice of fast CPU kernels or
//! candle's stock ops for the image path.
//!
//! This crate builds and runs networks; it never touches the disk (the
//! trainer saves and loads tensors by name) and it holds no optimizer.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use noprop_models::{ClassEmbedding, DtModel, DtModelConfig, DtBlockConfig, EmbeddingKind, Kernels};
//! use noprop_core::Denoiser;
//!
//! let block = DtBlockConfig { in_channels: 1, height: 8, width: 8, latent_dim: 3, classes: 3,
//!                             dropout: 0.2, kernels: Kernels::Stock };
//! let embed = ClassEmbedding::one_hot(3, DType::F32, &Device::Cpu)?;
//! let model = DtModel::new(DtModelConfig { block, blocks: 2, embedding: EmbeddingKind::OneHot },
//!                          embed, 0, DType::F32, &Device::Cpu)?;
//! let x = Tensor::zeros((4, 1, 8, 8), DType::F32, &Device::Cpu)?;
//! let z = Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?;
//! assert_eq!(model.denoise(1, &z, &x)?.dims(), &[4, 3]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod ct_model;
mod ct_net;
mod dt_block;
mod embedding;
mod figure6;
mod image_path;
mod init;
pub mod layers;
mod model;
pub mod ops;

pub use ct_model::CtModel;
pub use ct_net::{ct_net, sinusoidal_embedding, CtNet, CtNetConfig};
pub use dt_block::{dt_block, DtBlock, DtBlockConfig, FoldedDtBlock};
pub use embedding::{
    align_head, dual_basis, prototype_indices, random_init, ClassEmbedding, EmbeddingKind,
};
pub use figure6::{BlockFlops, Figure6, NetShape, FIGURE6};
pub use image_path::{image_path, ImagePath, ImagePathConfig, ImageTail};
pub use init::seeded_var_builder;
pub use layers::Mode;
pub use model::{DtModel, DtModelConfig};
pub use ops::Kernels;

/// Errors of model construction and loading.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The requested shapes do not fit together.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A tensor the model needs is absent from the loaded set.
    #[error("tensor {name} is missing")]
    MissingTensor {
        /// The checkpoint name.
        name: String,
    },
    /// A loaded tensor has the wrong shape.
    #[error("tensor {name} has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        /// The checkpoint name.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The loaded shape.
        found: Vec<usize>,
    },
    /// The loaded set has a tensor this model does not know.
    #[error("tensor {name} does not belong to this model")]
    UnexpectedTensor {
        /// The checkpoint name.
        name: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

//! The convolutional image path shared by the Figure-6 networks.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::layers::{batch_norm1d, conv2d, dropout_with, linear, BatchNorm1d, Conv2d, Linear, Mode};
use crate::ops::{max_pool2x2, Kernels};

/// What follows the image path's Linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageTail {
    /// BatchNorm1d, no ReLU (the discrete-time block).
    BatchNorm,
    /// ReLU (the continuous-time network, which has no BatchNorm).
    Relu,
}

/// `conv3x3(C->32) ReLU maxpool2 dropout, conv3x3(32->64) ReLU dropout,
/// conv3x3(64->128) ReLU maxpool2 dropout, flatten, Linear -> 256, tail`.
#[derive(Debug, Clone)]
pub struct ImagePath {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    fc: Linear,
    bn: Option<BatchNorm1d>,
    dropout: f64,
    kernels: Kernels,
}

/// Shapes of an [`ImagePath`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImagePathConfig {
    /// Input channels.
    pub channels: usize,
    /// Height (a multiple of 4).
    pub height: usize,
    /// Width (a multiple of 4).
    pub width: usize,
    /// Dropout probability after each pooling/conv stage.
    pub dropout: f64,
    /// Kernels for convolutions and pooling.
    pub kernels: Kernels,
    /// Whether the input needs a gradient (false for data, true when the
    /// input is a latent whose embedding is learned).
    pub input_grad: bool,
    /// What follows the Linear layer.
    pub tail: ImageTail,
}

/// Builds an image path with parameters `conv1`, `conv2`, `conv3`, `fc` (and `bn`).
pub fn image_path(cfg: ImagePathConfig, vb: VarBuilder) -> candle_core::Result<ImagePath> {
    if cfg.height % 4 != 0 || cfg.width % 4 != 0 {
        candle_core::bail!("the Figure-6 image path needs H and W divisible by 4, got {}x{}", cfg.height, cfg.width);
    }
    let flat = 128 * (cfg.height / 4) * (cfg.width / 4);
    Ok(ImagePath {
        conv1: conv2d(cfg.channels, 32, 3, 1, cfg.input_grad, vb.pp("conv1"))?,
        conv2: conv2d(32, 64, 3, 1, true, vb.pp("conv2"))?,
        conv3: conv2d(64, 128, 3, 1, true, vb.pp("conv3"))?,
        fc: linear(flat, 256, vb.pp("fc"))?,
        bn: match cfg.tail {
            ImageTail::BatchNorm => Some(batch_norm1d(256, vb.pp("bn"))?),
            ImageTail::Relu => None,
        },
        dropout: cfg.dropout,
        kernels: cfg.kernels,
    })
}

impl ImagePath {
    /// Features `[B, 256]` of images `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, mode: &mut Mode) -> candle_core::Result<Tensor> {
        let (k, p) = (self.kernels, self.dropout);
        let h = self.conv1.forward_relu(x, k)?;
        let h = dropout_with(k, &max_pool2x2(k, &h)?, p, mode)?;
        let h = dropout_with(k, &self.conv2.forward_relu(&h, k)?, p, mode)?;
        let h = self.conv3.forward_relu(&h, k)?;
        let h = dropout_with(k, &max_pool2x2(k, &h)?, p, mode)?;
        let h = self.fc.forward_with(k, &h.flatten_from(1)?)?;
        match &self.bn {
            Some(bn) => bn.forward(&h, mode),
            None => h.relu(),
        }
    }
}

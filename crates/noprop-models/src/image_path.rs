//! The convolutional image path shared by the Figure-6 networks.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::layers::{batch_norm1d, conv2d, linear, BatchNorm1d, Conv2d, Linear, Mode};
use crate::ops::Kernels;

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
        // Each stage is one fused op on the fast kernels (conv, bias, ReLU,
        // pooling and dropout) and the composition of candle's ops on the
        // stock path; both draw the dropout seeds in this order.
        let h = self.conv1.forward_stage(x, k, true, p, mode)?;
        let h = self.conv2.forward_stage(&h, k, false, p, mode)?;
        let h = self.conv3.forward_stage(&h, k, true, p, mode)?;
        let h = self.fc.forward_with(k, &h.flatten_from(1)?)?;
        match &self.bn {
            Some(bn) => bn.forward_with(k, &h, mode),
            None => h.relu(),
        }
    }
}

/// An [`ImagePath`] for inference: no dropout, and a trailing BatchNorm
/// folded into the Linear layer before it (see [`Linear::fold_batch_norm`]).
#[derive(Debug, Clone)]
pub struct FoldedImagePath {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    fc: Linear,
    relu_tail: bool,
    kernels: Kernels,
}

impl ImagePath {
    /// This path in evaluation mode with its BatchNorm folded away.
    pub fn folded(&self) -> candle_core::Result<FoldedImagePath> {
        let (fc, relu_tail) = match &self.bn {
            Some(bn) => (self.fc.fold_batch_norm(bn)?, false),
            None => (self.fc.detached(), true),
        };
        Ok(FoldedImagePath {
            conv1: self.conv1.detached(),
            conv2: self.conv2.detached(),
            conv3: self.conv3.detached(),
            fc,
            relu_tail,
            kernels: self.kernels,
        })
    }
}

impl FoldedImagePath {
    /// Features `[B, 256]` of images `[B, C, H, W]`, equal up to rounding to
    /// [`ImagePath::forward`] in [`Mode::Eval`].
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let k = self.kernels;
        let eval = &mut Mode::Eval;
        let h = self.conv1.forward_stage(x, k, true, 0.0, eval)?;
        let h = self.conv2.forward_stage(&h, k, false, 0.0, eval)?;
        let h = self.conv3.forward_stage(&h, k, true, 0.0, eval)?;
        let h = self.fc.forward_with(k, &h.flatten_from(1)?)?;
        if self.relu_tail {
            h.relu()
        } else {
            Ok(h)
        }
    }
}

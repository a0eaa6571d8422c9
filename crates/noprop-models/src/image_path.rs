//! The convolutional image path shared by the Figure-6 networks.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::figure6::FIGURE6;
use crate::layers::{conv2d, norm_linear, Conv2d, Mode, NormLinear};
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
///
/// [`ImagePath::folded`] derives the inference path from this one (no
/// dropout, the BatchNorm folded into the Linear layer), so the layers are
/// defined once, here.
#[derive(Debug, Clone)]
pub struct ImagePath {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    /// The Linear layer with the BatchNorm of [`ImageTail::BatchNorm`].
    fc: NormLinear,
    relu_tail: bool,
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
    if !cfg.height.is_multiple_of(4) || !cfg.width.is_multiple_of(4) {
        candle_core::bail!(
            "the Figure-6 image path needs H and W divisible by 4, got {}x{}",
            cfg.height,
            cfg.width
        );
    }
    let [c1, c2, c3] = FIGURE6.conv;
    let flat = FIGURE6.image_flat(cfg.height, cfg.width);
    // Construction order fixes the order of the seeded initialisation.
    let conv1 = conv2d(cfg.channels, c1, 3, 1, cfg.input_grad, vb.pp("conv1"))?;
    let conv2 = conv2d(c1, c2, 3, 1, true, vb.pp("conv2"))?;
    let conv3 = conv2d(c2, c3, 3, 1, true, vb.pp("conv3"))?;
    let bn = (cfg.tail == ImageTail::BatchNorm).then(|| vb.pp("bn"));
    let fc = norm_linear(flat, FIGURE6.features, vb.pp("fc"), bn)?;
    Ok(ImagePath {
        conv1,
        conv2,
        conv3,
        fc,
        relu_tail: cfg.tail == ImageTail::Relu,
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
        let h = self.fc.forward_with(k, &h.flatten_from(1)?, mode)?;
        if self.relu_tail {
            h.relu()
        } else {
            Ok(h)
        }
    }

    /// This path for inference: detached, no dropout, its BatchNorm folded
    /// into the Linear layer before it. In [`Mode::Eval`] its output equals
    /// the unfolded path's up to `f32` rounding.
    pub fn folded(&self) -> candle_core::Result<ImagePath> {
        Ok(ImagePath {
            conv1: self.conv1.detached(),
            conv2: self.conv2.detached(),
            conv3: self.conv3.detached(),
            fc: self.fc.folded()?,
            relu_tail: self.relu_tail,
            dropout: 0.0,
            kernels: self.kernels,
        })
    }
}

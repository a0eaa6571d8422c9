//! The discrete-time denoising block of Figure 6 (left).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::figure6::FIGURE6;
use crate::image_path::{image_path, ImagePath, ImagePathConfig, ImageTail};
use crate::layers::{linear, norm_linear, softmax_embed, Linear, Mode, NormLinear};
use crate::ops::Kernels;

/// Shapes and options of a [`DtBlock`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DtBlockConfig {
    /// Input channels `C` (1 for MNIST, 3 for CIFAR).
    pub in_channels: usize,
    /// Image height `H` (a multiple of 4).
    pub height: usize,
    /// Image width `W` (a multiple of 4).
    pub width: usize,
    /// Latent dimension `d`; `d = C*H*W` selects the prototype label path.
    pub latent_dim: usize,
    /// Number of classes `m`.
    pub classes: usize,
    /// Dropout probability in the image path (0.2 in Figure 6).
    pub dropout: f64,
    /// Which kernels run the convolutions and pooling.
    pub kernels: Kernels,
}

impl DtBlockConfig {
    /// True when `d = C*H*W`: `z` is an image and goes through its own image path.
    pub fn prototype(&self) -> bool {
        self.latent_dim == self.in_channels * self.height * self.width
    }

    fn image(&self, input_grad: bool) -> ImagePathConfig {
        ImagePathConfig {
            channels: self.in_channels,
            height: self.height,
            width: self.width,
            dropout: self.dropout,
            kernels: self.kernels,
            input_grad,
            tail: ImageTail::BatchNorm,
        }
    }
}

#[derive(Debug, Clone)]
enum LabelPath {
    /// `h1 = ReLU(BN(Linear d->256 (z)))`, `fz = h1 + BN(Linear(ReLU(BN(Linear(h1)))))`.
    Mlp {
        fc1: NormLinear,
        fc2: NormLinear,
        fc3: NormLinear,
    },
    /// `z` reshaped to `[B, C, H, W]` through a copy of the image path.
    Image(ImagePath),
}

/// One block `uhat_t(z, x)`:
///
/// ```text
/// image: conv3x3(C->32) ReLU maxpool2 dropout, conv3x3(32->64) ReLU dropout,
///        conv3x3(64->128) ReLU maxpool2 dropout, flatten, Linear 256, BN
/// label: h1 = ReLU(BN(Linear d->256 (z))); fz = h1 + BN(Linear(ReLU(BN(Linear(h1)))))
///        (for d = C*H*W: z as an image through its own image path)
/// fuse:  [fx, fz] -> Linear 256 BN ReLU -> Linear 128 BN ReLU -> Linear m
/// uhat = softmax(logits) @ W_embed
/// ```
///
/// The layers are defined once, here; [`DtBlock::folded`] derives the
/// inference block from them.
#[derive(Debug, Clone)]
pub struct DtBlock {
    cfg: DtBlockConfig,
    image: ImagePath,
    label: LabelPath,
    fuse1: NormLinear,
    fuse2: NormLinear,
    fuse_out: Linear,
}

/// Builds a block; parameter names are relative to `vb`'s prefix
/// (`img.conv1.weight`, `label.fc1.weight`, `fuse.out.bias`, ...).
pub fn dt_block(cfg: DtBlockConfig, vb: VarBuilder) -> candle_core::Result<DtBlock> {
    let lab = vb.pp("label");
    let fuse = vb.pp("fuse");
    let (f, hidden) = (FIGURE6.features, FIGURE6.fuse_hidden);
    // Construction order fixes the order of the seeded initialisation.
    let image = image_path(cfg.image(false), vb.pp("img"))?;
    let label = if cfg.prototype() {
        LabelPath::Image(image_path(cfg.image(true), lab)?)
    } else {
        LabelPath::Mlp {
            fc1: norm_linear(cfg.latent_dim, f, lab.pp("fc1"), Some(lab.pp("bn1")))?,
            fc2: norm_linear(f, f, lab.pp("fc2"), Some(lab.pp("bn2")))?,
            fc3: norm_linear(f, f, lab.pp("fc3"), Some(lab.pp("bn3")))?,
        }
    };
    Ok(DtBlock {
        image,
        label,
        fuse1: norm_linear(2 * f, f, fuse.pp("fc1"), Some(fuse.pp("bn1")))?,
        fuse2: norm_linear(f, hidden, fuse.pp("fc2"), Some(fuse.pp("bn2")))?,
        fuse_out: linear(hidden, cfg.classes, fuse.pp("out"))?,
        cfg,
    })
}

impl DtBlock {
    /// The block's configuration.
    pub fn config(&self) -> &DtBlockConfig {
        &self.cfg
    }

    /// The image path `fx` `[B, 256]`; it does not depend on `z`, so inference
    /// can compute it once per image and reuse it across sampling runs.
    pub fn image_features(&self, x: &Tensor, mode: &mut Mode) -> candle_core::Result<Tensor> {
        self.image.forward(x, mode)
    }

    /// The logits `[B, m]` from the latent `z` `[B, d]` and image features `fx` `[B, 256]`.
    pub fn logits_from_features(
        &self,
        z: &Tensor,
        fx: &Tensor,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let k = self.cfg.kernels;
        let fz = match &self.label {
            LabelPath::Mlp { fc1, fc2, fc3 } => {
                let h1 = fc1.forward_with(k, z, mode)?.relu()?;
                let h2 = fc2.forward_with(k, &h1, mode)?.relu()?;
                let h2 = fc3.forward_with(k, &h2, mode)?;
                (h1 + h2)?
            }
            LabelPath::Image(path) => {
                let c = &self.cfg;
                path.forward(
                    &z.reshape((z.dim(0)?, c.in_channels, c.height, c.width))?,
                    mode,
                )?
            }
        };
        let h = Tensor::cat(&[fx, &fz], 1)?;
        let h = self.fuse1.forward_with(k, &h, mode)?.relu()?;
        let h = self.fuse2.forward_with(k, &h, mode)?.relu()?;
        self.fuse_out.forward_with(k, &h)
    }

    /// `uhat = softmax(logits) @ W_embed` `[B, d]`.
    pub fn forward(
        &self,
        z: &Tensor,
        x: &Tensor,
        w_embed: &Tensor,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let fx = self.image_features(x, mode)?;
        let logits = self.logits_from_features(z, &fx, mode)?;
        softmax_embed(&logits, w_embed)
    }

    /// The block in evaluation mode with its BatchNorms folded into the
    /// Linear layers before them, from the current parameters and running
    /// statistics (a snapshot: later training does not reach it).
    pub fn folded(&self) -> candle_core::Result<FoldedDtBlock> {
        let label = match &self.label {
            LabelPath::Mlp { fc1, fc2, fc3 } => LabelPath::Mlp {
                fc1: fc1.folded()?,
                fc2: fc2.folded()?,
                fc3: fc3.folded()?,
            },
            LabelPath::Image(path) => LabelPath::Image(path.folded()?),
        };
        Ok(FoldedDtBlock(DtBlock {
            cfg: self.cfg,
            image: self.image.folded()?,
            label,
            fuse1: self.fuse1.folded()?,
            fuse2: self.fuse2.folded()?,
            fuse_out: self.fuse_out.detached(),
        }))
    }
}

/// A [`DtBlock`] for inference: evaluation mode with every BatchNorm folded
/// into the Linear layer before it, so that each normalised layer is one
/// GEMM with a bias. Its outputs equal the unfolded block's in
/// [`Mode::Eval`] up to `f32` rounding. It is the same block type, run in
/// evaluation mode, so an architecture change is made once.
#[derive(Debug, Clone)]
pub struct FoldedDtBlock(DtBlock);

impl FoldedDtBlock {
    /// The image features `fx` `[B, 256]`, as [`DtBlock::image_features`] in evaluation mode.
    pub fn image_features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.image_features(x, &mut Mode::Eval)
    }

    /// The logits `[B, m]`, as [`DtBlock::logits_from_features`] in evaluation mode.
    pub fn logits_from_features(&self, z: &Tensor, fx: &Tensor) -> candle_core::Result<Tensor> {
        self.0.logits_from_features(z, fx, &mut Mode::Eval)
    }

    /// `uhat = softmax(logits) @ W_embed` `[B, d]`, as [`DtBlock::forward`] in evaluation mode.
    pub fn forward(&self, z: &Tensor, x: &Tensor, w_embed: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(z, x, w_embed, &mut Mode::Eval)
    }
}

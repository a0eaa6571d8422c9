//! The discrete-time denoising block of Figure 6 (left), for `d != C*H*W`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{batch_norm1d, conv2d, dropout, linear, softmax_embed, BatchNorm1d, Conv2d, Linear, Mode};
use crate::ops::{max_pool2x2, Kernels};

/// Shapes and options of a [`DtBlock`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DtBlockConfig {
    /// Input channels `C` (1 for MNIST, 3 for CIFAR).
    pub in_channels: usize,
    /// Image height `H` (a multiple of 4).
    pub height: usize,
    /// Image width `W` (a multiple of 4).
    pub width: usize,
    /// Latent dimension `d`.
    pub latent_dim: usize,
    /// Number of classes `m`.
    pub classes: usize,
    /// Dropout probability in the image path (0.2 in Figure 6).
    pub dropout: f64,
    /// Which kernels run the convolutions and pooling.
    pub kernels: Kernels,
}

impl DtBlockConfig {
    /// Flattened size of the image path's last feature map, `128 (H/4) (W/4)`.
    pub fn flat_features(&self) -> usize {
        128 * (self.height / 4) * (self.width / 4)
    }
}

/// One block `uhat_t(z, x)`:
///
/// ```text
/// image: conv3x3(C->32) ReLU maxpool2 dropout, conv3x3(32->64) ReLU dropout,
///        conv3x3(64->128) ReLU maxpool2 dropout, flatten, Linear 256, BN
/// label: h1 = ReLU(BN(Linear d->256 (z))); fz = h1 + BN(Linear(ReLU(BN(Linear(h1)))))
/// fuse:  [fx, fz] -> Linear 256 BN ReLU -> Linear 128 BN ReLU -> Linear m
/// uhat = softmax(logits) @ W_embed
/// ```
#[derive(Debug, Clone)]
pub struct DtBlock {
    cfg: DtBlockConfig,
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    img_fc: Linear,
    img_bn: BatchNorm1d,
    z_fc1: Linear,
    z_bn1: BatchNorm1d,
    z_fc2: Linear,
    z_bn2: BatchNorm1d,
    z_fc3: Linear,
    z_bn3: BatchNorm1d,
    fuse_fc1: Linear,
    fuse_bn1: BatchNorm1d,
    fuse_fc2: Linear,
    fuse_bn2: BatchNorm1d,
    fuse_out: Linear,
}

/// Builds a block; parameter names are relative to `vb`'s prefix
/// (`img.conv1.weight`, `label.fc1.weight`, `fuse.out.bias`, ...).
pub fn dt_block(cfg: DtBlockConfig, vb: VarBuilder) -> candle_core::Result<DtBlock> {
    if cfg.height % 4 != 0 || cfg.width % 4 != 0 {
        candle_core::bail!("the Figure-6 block needs H and W divisible by 4, got {}x{}", cfg.height, cfg.width);
    }
    let img = vb.pp("img");
    let lab = vb.pp("label");
    let fuse = vb.pp("fuse");
    // Construction order fixes the order of the seeded initialisation.
    Ok(DtBlock {
        conv1: conv2d(cfg.in_channels, 32, 3, 1, false, img.pp("conv1"))?,
        conv2: conv2d(32, 64, 3, 1, true, img.pp("conv2"))?,
        conv3: conv2d(64, 128, 3, 1, true, img.pp("conv3"))?,
        img_fc: linear(cfg.flat_features(), 256, img.pp("fc"))?,
        img_bn: batch_norm1d(256, img.pp("bn"))?,
        z_fc1: linear(cfg.latent_dim, 256, lab.pp("fc1"))?,
        z_bn1: batch_norm1d(256, lab.pp("bn1"))?,
        z_fc2: linear(256, 256, lab.pp("fc2"))?,
        z_bn2: batch_norm1d(256, lab.pp("bn2"))?,
        z_fc3: linear(256, 256, lab.pp("fc3"))?,
        z_bn3: batch_norm1d(256, lab.pp("bn3"))?,
        fuse_fc1: linear(512, 256, fuse.pp("fc1"))?,
        fuse_bn1: batch_norm1d(256, fuse.pp("bn1"))?,
        fuse_fc2: linear(256, 128, fuse.pp("fc2"))?,
        fuse_bn2: batch_norm1d(128, fuse.pp("bn2"))?,
        fuse_out: linear(128, cfg.classes, fuse.pp("out"))?,
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
        let k = self.cfg.kernels;
        let p = self.cfg.dropout;
        let h = self.conv1.forward_relu(x, k)?;
        let h = dropout(&max_pool2x2(k, &h)?, p, mode)?;
        let h = dropout(&self.conv2.forward_relu(&h, k)?, p, mode)?;
        let h = self.conv3.forward_relu(&h, k)?;
        let h = dropout(&max_pool2x2(k, &h)?, p, mode)?;
        let h = h.flatten_from(1)?;
        self.img_bn.forward(&self.img_fc.forward(&h)?, mode)
    }

    /// The logits `[B, m]` from the latent `z` `[B, d]` and image features `fx` `[B, 256]`.
    pub fn logits_from_features(&self, z: &Tensor, fx: &Tensor, mode: &mut Mode) -> candle_core::Result<Tensor> {
        let h1 = self.z_bn1.forward(&self.z_fc1.forward(z)?, mode)?.relu()?;
        let h2 = self.z_bn2.forward(&self.z_fc2.forward(&h1)?, mode)?.relu()?;
        let h2 = self.z_bn3.forward(&self.z_fc3.forward(&h2)?, mode)?;
        let fz = (h1 + h2)?;
        let h = Tensor::cat(&[fx, &fz], 1)?;
        let h = self.fuse_bn1.forward(&self.fuse_fc1.forward(&h)?, mode)?.relu()?;
        let h = self.fuse_bn2.forward(&self.fuse_fc2.forward(&h)?, mode)?.relu()?;
        self.fuse_out.forward(&h)
    }

    /// `uhat = softmax(logits) @ W_embed` `[B, d]`.
    pub fn forward(&self, z: &Tensor, x: &Tensor, w_embed: &Tensor, mode: &mut Mode) -> candle_core::Result<Tensor> {
        let fx = self.image_features(x, mode)?;
        let logits = self.logits_from_features(z, &fx, mode)?;
        softmax_embed(&logits, w_embed)
    }
}

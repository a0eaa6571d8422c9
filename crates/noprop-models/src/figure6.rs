//! The widths of the paper's Figure-6 networks as one value,
//! [`FIGURE6`], which the builders of the image path, the NoProp-DT block
//! and the continuous-time network read; beside it, what follows from the
//! widths without building anything: parameter counts (the config's
//! parameter budget) and direct-method FLOPs (`noprop bench`).

use noprop_kernels::conv2d_flops;

/// The widths of the Figure-6 networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figure6 {
    /// Output channels of the image path's three 3x3 convolutions.
    pub conv: [usize; 3],
    /// Width of the image, label and time features (and of the first fuse layer).
    pub features: usize,
    /// Width of the second fuse layer.
    pub fuse_hidden: usize,
}

/// The paper's widths: convolutions of 32, 64 and 128 channels, features of
/// 256, fuse layers of 256 and 128.
pub const FIGURE6: Figure6 = Figure6 {
    conv: [32, 64, 128],
    features: 256,
    fuse_hidden: 128,
};

/// The shapes a network is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetShape {
    /// Image channels `C`.
    pub channels: usize,
    /// Image height `H` (a multiple of 4).
    pub height: usize,
    /// Image width `W` (a multiple of 4).
    pub width: usize,
    /// The latent dimension `d`; `d = C*H*W` gives the label its own image path.
    pub latent_dim: usize,
    /// Classes `m`.
    pub classes: usize,
}

impl NetShape {
    /// Whether `z` is an image (`d = C*H*W`, prototype embeddings).
    pub fn prototype(&self) -> bool {
        self.latent_dim == self.channels * self.height * self.width
    }
}

/// Direct-method forward FLOPs per image of a NoProp-DT block's parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockFlops {
    /// The image path's first convolution (no input gradient in training).
    pub conv1: f64,
    /// The image path's other two convolutions and its Linear to the features.
    pub image_rest: f64,
    /// The label path: an MLP from `d`, or a second image path when `d = C*H*W`.
    pub label: f64,
    /// The fuse layers, down to the `m` logits.
    pub fuse: f64,
    /// `softmax(logits) W_embed`, at inference only.
    pub embed: f64,
}

/// Weights and bias of a Linear layer.
fn linear(i: usize, o: usize) -> u128 {
    (i * o + o) as u128
}

/// A BatchNorm's trainable scale and shift with its two running statistics.
fn batch_norm(n: usize) -> u128 {
    4 * n as u128
}

impl Figure6 {
    /// The length of the flattened output of the last convolution.
    pub fn image_flat(&self, height: usize, width: usize) -> usize {
        self.conv[2] * (height / 4) * (width / 4)
    }

    /// The image path's parameters, with its BatchNorm tail (`batch_norm`)
    /// or its ReLU tail.
    pub fn image_path_parameters(&self, s: &NetShape, batch_norm_tail: bool) -> u128 {
        let [c1, c2, c3] = self.conv;
        linear(9 * s.channels, c1)
            + linear(9 * c1, c2)
            + linear(9 * c2, c3)
            + linear(self.image_flat(s.height, s.width), self.features)
            + if batch_norm_tail {
                batch_norm(self.features)
            } else {
                0
            }
    }

    /// One NoProp-DT block's parameters (BatchNorm statistics included).
    pub fn dt_block_parameters(&self, s: &NetShape) -> u128 {
        let f = self.features;
        let label = if s.prototype() {
            self.image_path_parameters(s, true)
        } else {
            linear(s.latent_dim, f) + 2 * linear(f, f) + 3 * batch_norm(f)
        };
        self.image_path_parameters(s, true)
            + label
            + linear(2 * f, f)
            + linear(f, self.fuse_hidden)
            + batch_norm(f)
            + batch_norm(self.fuse_hidden)
            + linear(self.fuse_hidden, s.classes)
    }

    /// The continuous-time network's parameters; its image paths end in a
    /// ReLU, not a BatchNorm.
    pub fn ct_net_parameters(&self, s: &NetShape, time_dim: usize) -> u128 {
        let f = self.features;
        let label = if s.prototype() {
            self.image_path_parameters(s, false)
        } else {
            linear(s.latent_dim, f)
        };
        self.image_path_parameters(s, false)
            + label
            + linear(time_dim, f)
            + linear(3 * f, f)
            + linear(f, self.fuse_hidden)
            + linear(self.fuse_hidden, s.classes)
    }

    /// `W_embed` and the head `f_out`, which every method has once.
    pub fn shared_parameters(&self, s: &NetShape) -> u128 {
        linear(s.latent_dim, s.classes) + (s.classes * s.latent_dim) as u128
    }

    /// Direct-method forward FLOPs per image of a NoProp-DT block's parts.
    pub fn dt_block_flops(&self, s: &NetShape) -> BlockFlops {
        let (c, h, w) = (s.channels, s.height, s.width);
        let [c1, c2, c3] = self.conv;
        let f = self.features;
        let lin = |i: usize, o: usize| 2.0 * (i * o) as f64;
        let conv1 = conv2d_flops([1, c, h, w], [c1, c, 3, 3], 1);
        let image_rest = conv2d_flops([1, c1, h / 2, w / 2], [c2, c1, 3, 3], 1)
            + conv2d_flops([1, c2, h / 2, w / 2], [c3, c2, 3, 3], 1)
            + lin(self.image_flat(h, w), f);
        let label = if s.prototype() {
            conv1 + image_rest
        } else {
            lin(s.latent_dim, f) + 2.0 * lin(f, f)
        };
        BlockFlops {
            conv1,
            image_rest,
            label,
            fuse: lin(2 * f, f) + lin(f, self.fuse_hidden) + lin(self.fuse_hidden, s.classes),
            embed: lin(s.classes, s.latent_dim),
        }
    }
}

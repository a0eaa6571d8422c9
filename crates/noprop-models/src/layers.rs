//! The layers of the Figure-6 networks, built the candle-nn way (private
//! fields, a constructor over a `VarBuilder`), with PyTorch's default
//! initialisation so that training dynamics match the reference.

use candle_core::{Module, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use noprop_core::NoiseRng;

use crate::ops::Kernels;

/// Whether a forward pass trains (dropout on, BatchNorm on batch statistics)
/// or evaluates (dropout off, BatchNorm on running statistics).
pub enum Mode<'a> {
    /// Training: dropout masks are drawn from this seeded stream.
    Train(&'a mut NoiseRng),
    /// Evaluation.
    Eval,
}

impl Mode<'_> {
    /// True in training mode.
    pub fn is_train(&self) -> bool {
        matches!(self, Mode::Train(_))
    }
}

fn uniform_bound(fan_in: usize) -> Init {
    // PyTorch's default for Linear and Conv: kaiming_uniform(a = sqrt 5) for the
    // weight and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias; both bounds
    // come out as 1/sqrt(fan_in).
    let b = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

/// A Linear layer `in_dim -> out_dim` named `weight` `[out, in]` and `bias` `[out]`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let init = uniform_bound(in_dim);
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = vb.get_with_hints(out_dim, "bias", init)?;
    Ok(Linear { weight, bias })
}

impl Linear {
    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias `[out]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Linear {
    /// This layer followed by `bn` in evaluation mode, as one Linear layer:
    /// `BN(x Wᵀ + b) = x (s ⊙ W)ᵀ + (s ⊙ b + t)` with BN's per-feature affine
    /// map `y = x * s + t` (see [`BatchNorm1d::eval_affine`]).
    pub fn fold_batch_norm(&self, bn: &BatchNorm1d) -> candle_core::Result<Linear> {
        let (scale, shift) = bn.eval_affine()?;
        let weight = self
            .weight
            .broadcast_mul(&scale.unsqueeze(1)?)?
            .contiguous()?;
        let bias = ((&self.bias * &scale)? + shift)?;
        Ok(Linear {
            weight: weight.detach(),
            bias: bias.detach(),
        })
    }

    /// A copy detached from the autograd graph, for inference.
    pub fn detached(&self) -> Linear {
        Linear {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
        }
    }

    /// `x W^T + b` on the chosen kernels.
    pub fn forward_with(&self, kernels: Kernels, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.rank() > 2 {
            // Leading dimensions are batch dimensions, as in candle-nn.
            let mut dims = x.dims().to_vec();
            let flat = x.flatten_to(x.rank() - 2)?;
            let y = noprop_kernels::linear_with(kernels, &flat, &self.weight, &self.bias)?;
            *dims.last_mut().expect("rank > 2") = self.weight.dim(0)?;
            return y.reshape(dims);
        }
        noprop_kernels::linear_with(kernels, x, &self.weight, &self.bias)
    }
}

impl Module for Linear {
    /// `x W^T + b` on the fast kernels where they apply (candle's ops on
    /// other devices and dtypes).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(Kernels::Fast, x)
    }
}

/// A 2-D convolution with stride 1 and `padding` zeros on each side.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    input_grad: bool,
}

/// A `k x k` convolution `c_in -> c_out`. When `input_grad` is false, the
/// backward pass skips the gradient with respect to the input (the first
/// layer's input is data, so nothing needs it).
pub fn conv2d(
    c_in: usize,
    c_out: usize,
    k: usize,
    padding: usize,
    input_grad: bool,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let init = uniform_bound(c_in * k * k);
    let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", init)?;
    let bias = vb.get_with_hints(c_out, "bias", init)?;
    Ok(Conv2d {
        weight,
        bias,
        padding,
        input_grad,
    })
}

impl Conv2d {
    /// A copy detached from the autograd graph, for inference.
    pub fn detached(&self) -> Conv2d {
        Conv2d {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            ..*self
        }
    }

    /// `dropout(maxpool2x2(relu(conv(x) + b)))` (the pooling when `pool`),
    /// one fused op on the fast kernels. In training mode with `p > 0` the
    /// dropout mask's seed is the next `u64` of the mode's stream, exactly as
    /// [`dropout_with`] draws it, so the fused and unfused forms agree.
    pub fn forward_stage(
        &self,
        x: &Tensor,
        kernels: Kernels,
        pool: bool,
        p: f64,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let (dropout, seed) = match mode {
            Mode::Train(rng) if p > 0.0 => (p, rand::RngCore::next_u64(rng.rng_mut())),
            _ => (0.0, 0),
        };
        let stage = noprop_kernels::ConvStage {
            padding: self.padding,
            pool,
            dropout,
            seed,
            input_grad: self.input_grad,
            algo: noprop_kernels::ConvAlgo::Auto,
        };
        noprop_kernels::conv_stage_with(kernels, x, &self.weight, &self.bias, &stage)
    }
}

/// BatchNorm over the feature dimension of `[B, F]` inputs, with PyTorch's
/// conventions: batch statistics (biased variance) in training, running
/// statistics updated with momentum 0.1 from the unbiased variance, eps 1e-5.
#[derive(Debug, Clone)]
pub struct BatchNorm1d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

/// A BatchNorm1d of `features` channels: `weight`, `bias`, `running_mean`, `running_var`.
pub fn batch_norm1d(features: usize, vb: VarBuilder) -> candle_core::Result<BatchNorm1d> {
    let weight = vb.get_with_hints(features, "weight", Init::Const(1.0))?;
    let bias = vb.get_with_hints(features, "bias", Init::Const(0.0))?;
    // The running statistics live in the VarMap so they are saved with the
    // model, but they are buffers: the trainer never hands them to an optimizer.
    let running_mean =
        Var::from_tensor(&vb.get_with_hints(features, "running_mean", Init::Const(0.0))?)?;
    let running_var =
        Var::from_tensor(&vb.get_with_hints(features, "running_var", Init::Const(1.0))?)?;
    Ok(BatchNorm1d {
        weight,
        bias,
        running_mean,
        running_var,
        eps: 1e-5,
        momentum: 0.1,
    })
}

/// Names of buffers that are saved with a model but never optimised.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

impl BatchNorm1d {
    /// Normalises `x` `[B, F]` on the fast kernels where they apply; in
    /// training mode also updates the running statistics.
    pub fn forward(&self, x: &Tensor, mode: &Mode) -> candle_core::Result<Tensor> {
        self.forward_with(Kernels::Fast, x, mode)
    }

    /// [`BatchNorm1d::forward`] on the chosen kernels: training mode is one
    /// fused op with a closed-form backward pass on the fast kernels, and
    /// candle's ops on the stock path.
    pub fn forward_with(
        &self,
        kernels: Kernels,
        x: &Tensor,
        mode: &Mode,
    ) -> candle_core::Result<Tensor> {
        if mode.is_train() {
            let b = x.dim(0)?;
            if b < 2 {
                candle_core::bail!(
                    "BatchNorm1d in training mode needs a batch of at least 2, got {b}"
                );
            }
            let out = noprop_kernels::batch_norm1d_train_with(
                kernels,
                x,
                &self.weight,
                &self.bias,
                self.eps,
            )?;
            let m = self.momentum;
            let unbiased = (out.var * (b as f64 / (b as f64 - 1.0)))?;
            let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (out.mean * m)?)?;
            let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
            self.running_mean.set(&new_mean)?;
            self.running_var.set(&new_var)?;
            return Ok(out.y);
        }
        let (scale, shift) = self.eval_affine()?;
        x.broadcast_mul(&scale)?.broadcast_add(&shift)
    }

    /// Evaluation mode as an affine map per feature, `y = x * scale + shift`,
    /// from the running statistics: `scale = weight / sqrt(running_var + eps)`,
    /// `shift = bias - running_mean * scale`. Inference folds it into the
    /// preceding Linear layer.
    pub fn eval_affine(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let scale = ((self.running_var.as_tensor() + self.eps)?.sqrt()?.recip()? * &self.weight)?;
        let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
        Ok((scale, shift))
    }
}

/// A Linear layer and, optionally, the BatchNorm that follows it: the one
/// definition of a normalised layer, for training and for inference.
///
/// [`NormLinear::folded`] gives the same layer in evaluation mode with the
/// BatchNorm folded into the Linear weights, so the inference network is
/// derived from the training one rather than written a second time.
#[derive(Debug, Clone)]
pub struct NormLinear {
    fc: Linear,
    bn: Option<BatchNorm1d>,
}

/// `Linear in_dim -> out_dim` (`{prefix}.weight`, `.bias`) followed by a
/// BatchNorm1d named by `bn` under the same parent (`None`: no BatchNorm).
pub fn norm_linear(
    in_dim: usize,
    out_dim: usize,
    fc: VarBuilder,
    bn: Option<VarBuilder>,
) -> candle_core::Result<NormLinear> {
    let fc = linear(in_dim, out_dim, fc)?;
    let bn = bn.map(|vb| batch_norm1d(out_dim, vb)).transpose()?;
    Ok(NormLinear { fc, bn })
}

impl NormLinear {
    /// `BN(x W^T + b)`, or `x W^T + b` once folded.
    pub fn forward_with(
        &self,
        kernels: Kernels,
        x: &Tensor,
        mode: &Mode,
    ) -> candle_core::Result<Tensor> {
        let h = self.fc.forward_with(kernels, x)?;
        match &self.bn {
            Some(bn) => bn.forward_with(kernels, &h, mode),
            None => Ok(h),
        }
    }

    /// This layer in evaluation mode as one Linear layer (see
    /// [`Linear::fold_batch_norm`]), detached from the autograd graph.
    pub fn folded(&self) -> candle_core::Result<NormLinear> {
        let fc = match &self.bn {
            Some(bn) => self.fc.fold_batch_norm(bn)?,
            None => self.fc.detached(),
        };
        Ok(NormLinear { fc, bn: None })
    }
}

/// Inverted dropout with probability `p`, on the fast kernels where they
/// apply; see [`dropout_with`].
pub fn dropout(x: &Tensor, p: f64, mode: &mut Mode) -> candle_core::Result<Tensor> {
    dropout_with(Kernels::Fast, x, p, mode)
}

/// Inverted dropout with probability `p` on the chosen kernels. Each call
/// takes one `u64` from the training stream as the seed of its mask, which
/// `noprop-kernels` expands by element index, so the mask is the same for
/// either kernels and any thread count.
pub fn dropout_with(
    kernels: Kernels,
    x: &Tensor,
    p: f64,
    mode: &mut Mode,
) -> candle_core::Result<Tensor> {
    match mode {
        Mode::Eval => Ok(x.clone()),
        Mode::Train(_) if p == 0.0 => Ok(x.clone()),
        Mode::Train(rng) => {
            let seed = rand::RngCore::next_u64(rng.rng_mut());
            noprop_kernels::dropout_with(kernels, x, p, seed)
        }
    }
}

/// `softmax(logits) @ W_embed`: a convex combination of the class embeddings.
pub fn softmax_embed(logits: &Tensor, w_embed: &Tensor) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    noprop_kernels::matmul(&p, w_embed)
}

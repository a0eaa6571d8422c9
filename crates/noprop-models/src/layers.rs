//! The layers of the Figure-6 networks, built the candle-nn way (private
//! fields, a constructor over a `VarBuilder`), with PyTorch's default
//! initialisation so that training dynamics match the reference.

use candle_core::{Module, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use noprop_core::NoiseRng;

use crate::ops::{self, Kernels};

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
    Ok(Conv2d { weight, bias, padding, input_grad })
}

impl Conv2d {
    /// `relu(conv(x) + b)`, fused where the kernels allow.
    pub fn forward_relu(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        ops::conv2d_relu(kernels, x, &self.weight, &self.bias, self.padding, self.input_grad)
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
    let running_mean = Var::from_tensor(&vb.get_with_hints(features, "running_mean", Init::Const(0.0))?)?;
    let running_var = Var::from_tensor(&vb.get_with_hints(features, "running_var", Init::Const(1.0))?)?;
    Ok(BatchNorm1d { weight, bias, running_mean, running_var, eps: 1e-5, momentum: 0.1 })
}

/// Names of buffers that are saved with a model but never optimised.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

impl BatchNorm1d {
    /// Normalises `x` `[B, F]`; in training mode also updates the running statistics.
    pub fn forward(&self, x: &Tensor, mode: &Mode) -> candle_core::Result<Tensor> {
        let (mean, var) = if mode.is_train() {
            let b = x.dim(0)?;
            if b < 2 {
                candle_core::bail!("BatchNorm1d in training mode needs a batch of at least 2, got {b}");
            }
            let mean = x.mean_keepdim(0)?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(0)?;
            let m = self.momentum;
            let unbiased = (var.detach() * (b as f64 / (b as f64 - 1.0)))?.squeeze(0)?;
            let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.detach().squeeze(0)? * m)?)?;
            let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
            self.running_mean.set(&new_mean)?;
            self.running_var.set(&new_var)?;
            let inv = (var + self.eps)?.sqrt()?.recip()?;
            let xhat = centered.broadcast_mul(&inv)?;
            return xhat.broadcast_mul(&self.weight)?.broadcast_add(&self.bias);
        } else {
            (self.running_mean.as_tensor().clone(), self.running_var.as_tensor().clone())
        };
        // Evaluation: an affine map per feature, folded into one scale and shift.
        let scale = ((var + self.eps)?.sqrt()?.recip()? * &self.weight)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        x.broadcast_mul(&scale)?.broadcast_add(&shift)
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
pub fn dropout_with(kernels: Kernels, x: &Tensor, p: f64, mode: &mut Mode) -> candle_core::Result<Tensor> {
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
    p.matmul(w_embed)
}


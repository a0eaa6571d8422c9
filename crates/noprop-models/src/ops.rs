//! The few operations of the image path, dispatched to the hand-written CPU
//! kernels of `noprop-kernels` or to candle's stock ops (the oracle in tests
//! and the path on GPUs).

use candle_core::Tensor;

pub use noprop_kernels::Kernels;

/// `relu(conv2d(x, w) + b)` with stride 1.
pub fn conv2d_relu(
    kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    padding: usize,
    input_grad: bool,
) -> candle_core::Result<Tensor> {
    noprop_kernels::conv2d_relu_with(kernels, x, w, Some(b), padding, input_grad)
}

/// 2x2 max-pooling with stride 2 whose gradient goes to the window's maximum
/// (candle's own `max_pool2d` returns a quarter of it).
pub fn max_pool2x2(kernels: Kernels, x: &Tensor) -> candle_core::Result<Tensor> {
    noprop_kernels::max_pool2x2_with(kernels, x)
}

/// The fused kernels, re-exported for benchmarks and tools that time them
/// one by one (see `noprop bench`).
pub use noprop_kernels::{
    batch_norm1d_train_with, conv2d_flops, conv_stage_with, linear_with, ConvAlgo, ConvStage,
    WINOGRAD_MIN_CIN,
};

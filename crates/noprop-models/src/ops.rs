//! The few operations of the image path, dispatched to fast CPU kernels or
//! to candle's stock ops (the oracle in tests and the GPU path).

use candle_core::Tensor;

/// Which implementation of the image-path ops to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Hand-written CPU kernels (falls back to stock off the CPU).
    #[default]
    Fast,
    /// candle's stock ops everywhere.
    Stock,
}

/// `relu(conv2d(x, w) + b)` with stride 1.
pub fn conv2d_relu(
    _kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    padding: usize,
    _input_grad: bool,
) -> candle_core::Result<Tensor> {
    let y = x.conv2d(w, padding, 1, 1, 1)?;
    y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?.relu()
}

/// 2x2 max-pooling with stride 2 whose gradient goes to the window's maximum.
pub fn max_pool2x2(_kernels: Kernels, x: &Tensor) -> candle_core::Result<Tensor> {
    // candle's max_pool2d has a wrong backward (a quarter of the true gradient),
    // so pool with a reshape and a max reduction, whose backward is right.
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let x = if h % 2 != 0 || w % 2 != 0 { x.narrow(2, 0, h2 * 2)?.narrow(3, 0, w2 * 2)? } else { x.clone() };
    x.reshape((b, c, h2, 2, w2, 2))?.max(5)?.max(3)
}

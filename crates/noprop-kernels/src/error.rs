//! The crate's error type.

use candle_core::DType;

/// Why a kernel refused its inputs. Public functions return
/// [`candle_core::Result`] so that they compose with candle code; these errors
/// reach the caller wrapped in [`candle_core::Error::Wrapped`], and their
/// messages name the offending argument and shape.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// An input is not a rank-4 NCHW tensor.
    #[error("{op}: `{arg}` must have rank 4 (NCHW), got shape {shape:?}")]
    NotRank4 {
        op: &'static str,
        arg: &'static str,
        shape: Vec<usize>,
    },
    /// The convolution kernel is not `k x k`.
    #[error("conv2d: the kernel must be square, got {kh}x{kw}")]
    NonSquareKernel { kh: usize, kw: usize },
    /// The kernel's input channels differ from the input's.
    #[error("conv2d: the input has {x} channels but the kernel expects {w}")]
    ChannelMismatch { x: usize, w: usize },
    /// The bias is not a vector with one entry per output channel.
    #[error("conv2d: the bias has shape {shape:?}, expected [{cout}]")]
    BiasShape { shape: Vec<usize>, cout: usize },
    /// The padded input is smaller than the kernel.
    #[error("conv2d: a {k}x{k} kernel with padding {padding} does not fit a {h}x{w} input")]
    KernelTooLarge {
        k: usize,
        padding: usize,
        h: usize,
        w: usize,
    },
    /// A channel count or the kernel size is zero.
    #[error("conv2d: zero-sized channel or kernel dimension (input {x:?}, kernel {w:?})")]
    EmptyDims { x: Vec<usize>, w: Vec<usize> },
    /// An argument's dtype differs from the input's.
    #[error("{op}: `{arg}` has dtype {found:?} but `x` has {expected:?}")]
    DTypeMismatch {
        op: &'static str,
        arg: &'static str,
        found: DType,
        expected: DType,
    },
    /// The input is smaller than one 2x2 window.
    #[error("max_pool2x2: the input is {h}x{w}, smaller than the 2x2 window")]
    PoolTooSmall { h: usize, w: usize },
    /// A fast kernel was handed storage it cannot read directly. The public
    /// functions route such tensors elsewhere, so this signals a bug.
    #[error("{op}: the fast kernel needs a contiguous CPU tensor for `{arg}`")]
    NotHostContiguous { op: &'static str, arg: &'static str },
    /// The fast kernels run on `f32` and `f64` only.
    #[error("{op}: the fast kernels support f32 and f64, not {dtype:?}")]
    UnsupportedDType { op: &'static str, dtype: DType },
    /// `linear` arguments that do not fit `[batch, in]`, `[out, in]`, `[out]`.
    #[error("linear: expected x [batch, in], w [out, in], b [out], got {x:?}, {w:?}, {b:?}")]
    LinearShapes {
        x: Vec<usize>,
        w: Vec<usize>,
        b: Vec<usize>,
    },
    /// A dropout probability outside `[0, 1)`.
    #[error("dropout: the probability must lie in [0, 1), got {p}")]
    DropoutProbability { p: f64 },
    /// A backward pass ran without the state its forward pass keeps. candle
    /// always runs the forward pass first, so this signals a bug.
    #[error("{op}: backward pass without a forward pass")]
    MissingForward { op: &'static str },
    /// The Winograd algorithm was requested for a convolution it cannot compute.
    #[error("conv_stage: Winograd F(2x2, 3x3) needs a 3x3 kernel, padding 1 and an even-sized input, got k={k}, padding {padding}, {h}x{w}")]
    WinogradShape {
        k: usize,
        padding: usize,
        h: usize,
        w: usize,
    },
    /// A pooled stage whose convolution output is smaller than one window.
    #[error("conv_stage: the convolution output {h}x{w} is smaller than the 2x2 pooling window")]
    StagePoolTooSmall { h: usize, w: usize },
    /// `batch_norm1d` arguments that do not fit `[batch, features]`, `[features]`, `[features]`.
    #[error("batch_norm1d: expected x [batch >= 1, features], weight and bias [features], got {x:?}, {w:?}, {b:?}")]
    BatchNormShapes {
        x: Vec<usize>,
        w: Vec<usize>,
        b: Vec<usize>,
    },
    /// A [`crate::Kernels`] name that is neither `fast` nor `stock`.
    #[error("unknown kernels {0:?}: expected \"fast\" or \"stock\"")]
    UnknownKernels(String),
    /// Operands of [`crate::matmul`]'s fast op that are not `[m, k]` and
    /// `[k, n]`, or whose strides reach outside their storage.
    #[error("matmul: expected a [m, k] and b [k, n] inside their storage, got {a:?} and {b:?}")]
    MatMulShapes { a: Vec<usize>, b: Vec<usize> },
    /// A value of [`crate::SIMD_ENV`] other than `auto` or `baseline`.
    #[error("unknown NOPROP_KERNELS_SIMD={0:?}: expected \"auto\" or \"baseline\"")]
    UnknownSimd(String),
}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}

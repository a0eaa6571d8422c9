//! Fast CPU kernels for the convolutional blocks of NoProp's Figure-6 network,
//! as candle custom ops that autograd sees.
//!
//! Stock candle 0.11 trains this network several times slower than PyTorch on
//! a CPU: its conv2d is a slow direct loop for the input gradient and a
//! batch-sized convolution for the weight gradient, and its `max_pool2d`
//! backward divides the gradient among a window's four cells, so a window with
//! one maximum passes on only a quarter of it. What the Figure-6 networks run
//! on here:
//!
//! - [`conv_stage`]: one fused stage `dropout(maxpool2x2(relu(conv(x) + b)))`
//!   (pooling and dropout optional), forward and backward, that keeps the
//!   full-resolution convolution output out of candle's graph: the forward
//!   pass pools while the output is in cache and keeps one byte per window
//!   (its winner), from which the backward pass rebuilds the gradient. The
//!   convolution inside is chosen per stage ([`ConvAlgo`]): Winograd
//!   F(2x2, 3x3) for 3x3 kernels over even sizes with at least
//!   [`WINOGRAD_MIN_CIN`] input channels (2.25 times fewer multiply-adds,
//!   for both gradients too); a direct convolution vectorized over output
//!   channels for the first layer's one or three input channels, where a
//!   GEMM's reduction would be too short; im2col and one GEMM per image
//!   otherwise. Work is split into fixed chunks of images whose partial
//!   weight gradients are summed in chunk order, so results do not depend
//!   on the thread count, and each chunk runs an AVX2+FMA build of its code
//!   where the CPU has it.
//! - [`conv2d`] and [`conv2d_relu`]: the convolution alone (stride 1, square
//!   kernel, any padding), im2col plus one GEMM per image, for shapes the
//!   stage does not take.
//! - [`batch_norm1d_train`]: training-mode BatchNorm over `[B, C]` in one
//!   pass forward and one backward.
//! - [`dropout`]: inverted dropout whose keep mask is a pure function of a
//!   seed and each element's index (a counter-based SplitMix64 stream), so it
//!   is drawn in parallel, identically for any thread count, and redrawn in
//!   the backward pass instead of stored. The stock path multiplies by the
//!   same mask built on the host.
//! - [`linear`]: `x wᵀ + b` as one GEMM forward and one GEMM per gradient
//!   backward, each in its argument's layout (candle's transpose + matmul +
//!   broadcast add accumulates a strided weight gradient).
//! - [`matmul`]: `a · b` for 2-D tensors in any strided layout.
//! - [`max_pool2x2`]: 2x2, stride-2 max-pooling whose gradient goes wholly to
//!   the first maximum of each window; odd sizes drop the last row or column,
//!   as PyTorch does.
//!
//! Every GEMM of this crate (the `gemm` crate's) cuts its summed dimension
//! into blocks fixed by the shapes, so that results do not depend on the
//! cache sizes the `gemm` crate detects on the CPU that runs it.
//!
//! Every function also takes a [`Kernels`] choice (the `_with` variants). The
//! fast kernels run on `f32` and `f64` tensors on the CPU, copying strided
//! views to a contiguous layout first (a copy autograd sees); everything else
//! (CUDA, Metal, half precision) and [`Kernels::Stock`] use candle's own ops,
//! with a correct max-pool gradient built from `max`, so one call works on
//! every device and the stock path serves as the tests' oracle. The kernels
//! run on rayon's global thread pool.
//!
//! The `avx512` feature lets the `gemm` crate (and so candle's matmuls too)
//! run AVX-512 micro-kernels where the CPU has them: 1.2-1.7x faster
//! training on an Intel Xeon, at the price of results that differ from the
//! default build's in the last bits; [`gemm_isa`] tells which kernels run.
//!
//! What this crate does not do: strides other than 1, dilation, groups,
//! non-square kernels or pooling windows other than 2x2; GPU kernels; second
//! derivatives (the gradients it returns are not themselves differentiable);
//! and it never changes candle's global state.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use noprop_kernels::{conv2d_relu, max_pool2x2};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let x = Tensor::arange(0f32, 2.0 * 16.0, &dev)?.reshape((2, 1, 4, 4))?;
//! let w = Var::from_tensor(&Tensor::ones((3, 1, 3, 3), candle_core::DType::F32, &dev)?)?;
//! let b = Var::from_tensor(&Tensor::zeros(3, candle_core::DType::F32, &dev)?)?;
//! // The input is data, so no gradient is computed for it.
//! let y = max_pool2x2(&conv2d_relu(&x, &w, Some(&b), 1, false)?)?;
//! assert_eq!(y.dims(), &[2, 3, 2, 2]);
//! let grads = y.sum_all()?.backward()?;
//! assert_eq!(grads.get(&w).map(|g| g.dims().to_vec()), Some(vec![3, 1, 3, 3]));
//! assert!(grads.get(&x).is_none());
//! # Ok(())
//! # }
//! ```

mod bn;
mod conv;
mod denormals;
mod direct;
mod dropout;
mod elem;
mod error;
mod linear;
mod ops;
mod pool;
mod stage;
mod winograd;

pub use denormals::flush_denormals;
pub use error::KernelError;

use candle_core::{DType, Result, Tensor};
use std::fmt;
use std::str::FromStr;

/// Which implementation an op uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// This crate's kernels where they apply (`f32`/`f64` on the CPU, any
    /// layout), candle's ops elsewhere.
    #[default]
    Fast,
    /// candle's ops everywhere: the reference, and the path for GPUs.
    Stock,
}

impl Kernels {
    /// Whether the fast kernels handle these tensors.
    fn fast_for(self, tensors: &[&Tensor]) -> bool {
        self == Kernels::Fast
            && tensors
                .iter()
                .all(|t| t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64))
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernels::Fast => "fast",
            Kernels::Stock => "stock",
        })
    }
}

impl FromStr for Kernels {
    type Err = KernelError;

    /// Parses `fast` or `stock`, ignoring ASCII case.
    fn from_str(s: &str) -> std::result::Result<Self, KernelError> {
        if s.eq_ignore_ascii_case("fast") {
            Ok(Kernels::Fast)
        } else if s.eq_ignore_ascii_case("stock") {
            Ok(Kernels::Stock)
        } else {
            Err(KernelError::UnknownKernels(s.to_owned()))
        }
    }
}

/// 2-D convolution with stride 1, a square kernel and zero padding on all
/// sides, plus an optional bias, on the fast kernels where they apply.
///
/// With `input_grad == false` the result's gradient never flows back to `x`
/// (as for the first layer, whose input is data), which saves the costliest
/// part of the backward pass.
///
/// # Shapes
/// - `x`: `[batch, cin, h, w]`
/// - `w`: `[cout, cin, k, k]`
/// - `b`: `[cout]`
/// - result: `[batch, cout, h + 2 * padding - k + 1, w + 2 * padding - k + 1]`
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    input_grad: bool,
) -> Result<Tensor> {
    conv2d_with(Kernels::Fast, x, w, b, padding, input_grad)
}

/// [`conv2d`] on the chosen [`Kernels`].
pub fn conv2d_with(
    kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    input_grad: bool,
) -> Result<Tensor> {
    conv_impl(kernels, x, w, b, padding, input_grad, false)
}

/// `relu(conv2d(x, w, b))` in one pass; see [`conv2d`] for the arguments and
/// shapes. The backward pass takes the ReLU mask from the output, so the
/// derivative at exactly zero is 0, as in PyTorch (candle's own `relu` uses 1;
/// the two differ only on ties).
pub fn conv2d_relu(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    input_grad: bool,
) -> Result<Tensor> {
    conv2d_relu_with(Kernels::Fast, x, w, b, padding, input_grad)
}

/// [`conv2d_relu`] on the chosen [`Kernels`].
pub fn conv2d_relu_with(
    kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    input_grad: bool,
) -> Result<Tensor> {
    conv_impl(kernels, x, w, b, padding, input_grad, true)
}

/// 2x2 max-pooling with stride 2 whose gradient goes entirely to each window's
/// maximum (the first one in row-major order on ties), on the fast kernels
/// where they apply. A NaN in a window wins it.
///
/// # Shapes
/// - `x`: `[batch, c, h, w]` with `h, w >= 2`
/// - result: `[batch, c, h / 2, w / 2]` (odd sizes round down)
///
/// The stock path reduces with `max` over a reshaped window, whose gradient
/// goes in full to every tied maximum rather than to the first. Inside the
/// network that is harmless: windows tie mostly at the zeros of a ReLU, whose
/// own gradient then masks them out.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    max_pool2x2_with(Kernels::Fast, x)
}

/// [`max_pool2x2`] on the chosen [`Kernels`].
pub fn max_pool2x2_with(kernels: Kernels, x: &Tensor) -> Result<Tensor> {
    let dims = rank4("max_pool2x2", "x", x)?;
    let (h, w) = (dims[2], dims[3]);
    if h < 2 || w < 2 {
        return Err(KernelError::PoolTooSmall { h, w }.into());
    }
    if kernels.fast_for(&[x]) {
        return x.contiguous()?.apply_op1(ops::MaxPoolOp::default());
    }
    let (n, c, ho, wo) = (dims[0], dims[1], h / 2, w / 2);
    let x = if h % 2 == 1 || w % 2 == 1 {
        x.narrow(2, 0, 2 * ho)?.narrow(3, 0, 2 * wo)?
    } else {
        x.clone()
    };
    x.reshape((n, c, ho, 2, wo, 2))?.max(5)?.max(3)
}

/// A fully connected layer `x wᵀ + b`, on the fast kernels where they apply.
///
/// # Shapes
/// - `x`: `[batch, in]`
/// - `w`: `[out, in]`
/// - `b`: `[out]`
/// - result: `[batch, out]`
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_with(Kernels::Fast, x, w, b)
}

/// [`linear`] on the chosen [`Kernels`].
pub fn linear_with(kernels: Kernels, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (xd, wd, bd) = (x.dims(), w.dims(), b.dims());
    if xd.len() != 2 || wd.len() != 2 || xd[1] != wd[1] || bd != [wd[0]] {
        return Err(KernelError::LinearShapes {
            x: xd.to_vec(),
            w: wd.to_vec(),
            b: bd.to_vec(),
        }
        .into());
    }
    for (arg, t) in [("w", w), ("b", b)] {
        if t.dtype() != x.dtype() {
            return Err(KernelError::DTypeMismatch {
                op: "linear",
                arg,
                found: t.dtype(),
                expected: x.dtype(),
            }
            .into());
        }
    }
    if kernels.fast_for(&[x, w, b]) {
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, ops::LinearOp);
    }
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// The matrix product `a · b` of two 2-D tensors, on the fast kernels where
/// they apply.
///
/// Use it instead of [`Tensor::matmul`] wherever the summed dimension can
/// exceed 512 on the CPU (a wide embedding, a large batch in a weight
/// gradient): candle's own CPU matmul goes through the `gemm` crate, which
/// sums such products in blocks whose length it derives from the CPU's L1
/// cache, so the same product differs in its last bits from one CPU model to
/// another. Here the summed dimension is cut into blocks that depend on the
/// shapes alone (at most 512 long, all equal but the last), so the result
/// is the same on every CPU that runs the same `gemm` kernels; the gradient
/// goes through this function too. Operands may be any strided views
/// (transposes, narrows) and are not copied.
///
/// Tensors of other ranks, other dtypes, on other devices, or with
/// [`Kernels::Stock`], go to [`Tensor::matmul`] (which reports bad shapes).
///
/// # Shapes
/// - `a`: `[m, k]`
/// - `b`: `[k, n]`
/// - result: `[m, n]`
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_with(Kernels::Fast, a, b)
}

/// [`matmul`] on the chosen [`Kernels`].
pub fn matmul_with(kernels: Kernels, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let two_d = a.rank() == 2 && b.rank() == 2;
    if kernels.fast_for(&[a, b]) && two_d && a.dtype() == b.dtype() && a.dim(1)? == b.dim(0)? {
        return a.apply_op2(b, ops::MatMulOp);
    }
    a.matmul(b)
}

/// Inverted dropout: each element is zeroed with probability `p` and
/// otherwise multiplied by `1 / (1 - p)`, on the fast kernels where they
/// apply. The mask depends only on `seed` and the element's position, so the
/// same seed gives the same mask on both paths and for any thread count.
/// `p == 0` returns `x` unchanged.
///
/// # Shapes
/// - `x`: any
/// - result: the shape of `x`
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    dropout_with(Kernels::Fast, x, p, seed)
}

/// [`dropout`] on the chosen [`Kernels`].
pub fn dropout_with(kernels: Kernels, x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(KernelError::DropoutProbability { p }.into());
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let mask = dropout::Mask::new(p, seed);
    if kernels.fast_for(&[x]) {
        return x.contiguous()?.apply_op1(ops::DropoutOp(mask));
    }
    let n = x.elem_count();
    let factors = match x.dtype() {
        DType::F64 => {
            Tensor::from_vec(mask.factors::<f64>(n), x.shape(), &candle_core::Device::Cpu)?
        }
        _ => Tensor::from_vec(mask.factors::<f32>(n), x.shape(), &candle_core::Device::Cpu)?,
    };
    x.mul(&factors.to_dtype(x.dtype())?.to_device(x.device())?)
}

fn rank4<'a>(op: &'static str, arg: &'static str, t: &'a Tensor) -> Result<&'a [usize]> {
    let dims = t.dims();
    if dims.len() == 4 {
        Ok(dims)
    } else {
        Err(KernelError::NotRank4 {
            op,
            arg,
            shape: dims.to_vec(),
        }
        .into())
    }
}

/// Checks everything the fast kernel relies on, so that both paths accept the
/// same inputs and report the same errors.
fn check_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<()> {
    const OP: &str = "conv2d";
    let xd = rank4(OP, "x", x)?;
    let wd = rank4(OP, "w", w)?;
    let (cin, h, wi) = (xd[1], xd[2], xd[3]);
    let (cout, k) = (wd[0], wd[2]);
    if wd[2] != wd[3] {
        return Err(KernelError::NonSquareKernel {
            kh: wd[2],
            kw: wd[3],
        }
        .into());
    }
    if cin == 0 || cout == 0 || k == 0 {
        return Err(KernelError::EmptyDims {
            x: xd.to_vec(),
            w: wd.to_vec(),
        }
        .into());
    }
    if wd[1] != cin {
        return Err(KernelError::ChannelMismatch { x: cin, w: wd[1] }.into());
    }
    if h + 2 * padding < k || wi + 2 * padding < k {
        return Err(KernelError::KernelTooLarge {
            k,
            padding,
            h,
            w: wi,
        }
        .into());
    }
    let same_dtype = |arg, t: &Tensor| {
        if t.dtype() == x.dtype() {
            Ok(())
        } else {
            Err(KernelError::DTypeMismatch {
                op: OP,
                arg,
                found: t.dtype(),
                expected: x.dtype(),
            })
        }
    };
    same_dtype("w", w)?;
    if let Some(b) = b {
        if b.dims() != [cout] {
            return Err(KernelError::BiasShape {
                shape: b.dims().to_vec(),
                cout,
            }
            .into());
        }
        same_dtype("b", b)?;
    }
    Ok(())
}

fn conv_impl(
    kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    input_grad: bool,
    relu: bool,
) -> Result<Tensor> {
    check_conv(x, w, b, padding)?;
    let mut all = vec![x, w];
    all.extend(b);
    if kernels.fast_for(&all) {
        let op = ops::ConvOp {
            padding,
            relu,
            input_grad,
        };
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return match b {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, ops::ConvBias(op)),
            None => x.apply_op2(&w, ops::ConvNoBias(op)),
        };
    }
    // Detaching is how the stock path honours `input_grad == false`.
    let x = if input_grad { x.clone() } else { x.detach() };
    let y = x.conv2d(w, padding, 1, 1, 1)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// With `true`, the fast kernels run their loops as compiled for the
/// target's baseline (SSE2 on x86-64) even where the CPU has AVX2 and FMA, as
/// they would on an older CPU; `false` restores the default. Process-wide;
/// for tests and timing comparisons. (The `gemm` crate's own dispatch is
/// not affected.)
pub fn use_baseline_simd(on: bool) {
    elem::BASELINE_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The environment variable that makes a whole process run the baseline
/// loops, as [`use_baseline_simd`]`(true)` does, when set to `baseline`:
/// for checking, from outside a program, that its numbers do not depend on
/// which build of this crate's own loops runs (the `gemm` crate's choice
/// of micro-kernels is not affected). Read once, at the first kernel call;
/// `auto` or unset means the default, and any other value is treated as
/// unset here ([`check_simd_env`] rejects it).
pub const SIMD_ENV: &str = "NOPROP_KERNELS_SIMD";

/// Whether [`SIMD_ENV`] asks for the baseline loops.
fn baseline_forced() -> bool {
    std::env::var_os(SIMD_ENV).is_some_and(|v| v == "baseline")
}

/// Checks the value of [`SIMD_ENV`]: unset, `auto` or `baseline`.
pub fn check_simd_env() -> std::result::Result<(), KernelError> {
    match std::env::var(SIMD_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(()),
        Ok(v) if v == "auto" || v == "baseline" => Ok(()),
        Ok(v) => Err(KernelError::UnknownSimd(v)),
        Err(std::env::VarError::NotUnicode(v)) => {
            Err(KernelError::UnknownSimd(v.to_string_lossy().into_owned()))
        }
    }
}

/// The instruction set of the GEMM micro-kernels this build runs on this
/// CPU, as the `gemm` crate (here and inside candle) chooses them at run
/// time: `"avx512f"` (a build with this crate's `avx512` feature, on a CPU
/// with AVX-512F), `"fma"` (a CPU with FMA: gemm's AVX2+FMA kernels),
/// `"neon"`, or `"scalar"`. It mirrors `init_gemm_fn` of gemm-common 0.19;
/// re-check it when `gemm` is upgraded.
///
/// A build gives bit-identical results for any thread count. Builds that
/// run different micro-kernels do not: the AVX-512 kernels split a GEMM's
/// sums differently, so results differ in the last bits and a training
/// trajectory drifts apart over many steps. `noprop` records this value in a
/// run's `meta.json` and says so when a resume changes it.
pub fn gemm_isa() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if cfg!(feature = "avx512") && std::is_x86_feature_detected!("avx512f") {
            "avx512f"
        } else if std::is_x86_feature_detected!("fma") {
            "fma"
        } else {
            "scalar"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            "neon"
        } else {
            "scalar"
        }
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// How a fused convolution stage computes its convolution on the fast
/// kernels (the stock path always uses candle's `conv2d`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ConvAlgo {
    /// Winograd where it applies and pays (a 3x3 kernel, padding 1, an
    /// even-sized input, at least [`WINOGRAD_MIN_CIN`] input channels), the
    /// direct method below [`WINOGRAD_MIN_CIN`] input channels, im2col
    /// elsewhere.
    #[default]
    Auto,
    /// im2col and one GEMM per image.
    Im2col,
    /// A direct convolution vectorized over output channels, for few input
    /// channels.
    Direct,
    /// Winograd's F(2x2, 3x3): 2.25 times fewer multiplies; an error for
    /// shapes it cannot compute.
    Winograd,
}

/// Below this many input channels [`ConvAlgo::Auto`] uses the direct method:
/// the Winograd and im2col GEMMs reduce over the input channels (times 9 for
/// im2col) and would be too thin to run well.
pub const WINOGRAD_MIN_CIN: usize = 8;

/// The options of a fused convolution stage, see [`conv_stage`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvStage {
    /// Zero padding on every side.
    pub padding: usize,
    /// Whether a 2x2, stride-2 max-pool follows the ReLU.
    pub pool: bool,
    /// Dropout probability after the pooling (0: no dropout).
    pub dropout: f64,
    /// The seed of the dropout mask, as for [`dropout`].
    pub seed: u64,
    /// Whether the input receives a gradient, as for [`conv2d`].
    pub input_grad: bool,
    /// The convolution algorithm of the fast kernels.
    pub algo: ConvAlgo,
}

impl Default for ConvStage {
    fn default() -> Self {
        Self {
            padding: 1,
            pool: false,
            dropout: 0.0,
            seed: 0,
            input_grad: true,
            algo: ConvAlgo::Auto,
        }
    }
}

/// `dropout(maxpool2x2(relu(conv2d(x, w) + b)))` in one op, the pooling and
/// the dropout as `stage` asks, on the fast kernels where they apply.
///
/// The result equals the composition of [`conv2d_relu`], [`max_pool2x2`] and
/// [`dropout`] (same mask for the same seed); the fused op never materialises
/// the convolution output before pooling, keeping one byte per window for the
/// backward pass instead. With [`ConvAlgo::Auto`], 3x3 convolutions with
/// padding 1 over even-sized inputs of at least [`WINOGRAD_MIN_CIN`] channels
/// run Winograd's F(2x2, 3x3), whose output and gradients differ from the
/// direct method's only by rounding.
///
/// # Shapes
/// - `x`: `[batch, cin, h, w]`
/// - `w`: `[cout, cin, k, k]`
/// - `b`: `[cout]`
/// - result: `[batch, cout, ho, wo]` with `ho = h + 2 * padding - k + 1`
///   (halved, rounding down, when pooling), and likewise `wo`
pub fn conv_stage(x: &Tensor, w: &Tensor, b: &Tensor, stage: &ConvStage) -> Result<Tensor> {
    conv_stage_with(Kernels::Fast, x, w, b, stage)
}

/// [`conv_stage`] on the chosen [`Kernels`].
pub fn conv_stage_with(
    kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stage: &ConvStage,
) -> Result<Tensor> {
    check_conv(x, w, Some(b), stage.padding)?;
    if !(0.0..1.0).contains(&stage.dropout) {
        return Err(KernelError::DropoutProbability { p: stage.dropout }.into());
    }
    let (xd, wd) = (x.dims(), w.dims());
    let geom = ops::conv_geom(xd, wd, stage.padding);
    if stage.pool && (geom.ho() < 2 || geom.wo() < 2) {
        return Err(KernelError::StagePoolTooSmall {
            h: geom.ho(),
            w: geom.wo(),
        }
        .into());
    }
    let winograd_fits = stage::winograd_fits(&geom);
    if stage.algo == ConvAlgo::Winograd && !winograd_fits {
        return Err(KernelError::WinogradShape {
            k: geom.k,
            padding: geom.pad,
            h: geom.h,
            w: geom.w,
        }
        .into());
    }
    if kernels.fast_for(&[x, w, b]) {
        let algo = match stage.algo {
            ConvAlgo::Winograd => stage::Algo::Winograd,
            ConvAlgo::Auto if winograd_fits && geom.cin >= WINOGRAD_MIN_CIN => {
                stage::Algo::Winograd
            }
            ConvAlgo::Auto if geom.cin < WINOGRAD_MIN_CIN => stage::Algo::Direct,
            ConvAlgo::Direct => stage::Algo::Direct,
            _ => stage::Algo::Im2col,
        };
        let op = ops::ConvStageOp {
            padding: stage.padding,
            pool: stage.pool,
            input_grad: stage.input_grad,
            algo,
            mask: (stage.dropout > 0.0).then(|| dropout::Mask::new(stage.dropout, stage.seed)),
            arg: Default::default(),
        };
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, op);
    }
    let y = conv_impl(
        Kernels::Stock,
        x,
        w,
        Some(b),
        stage.padding,
        stage.input_grad,
        true,
    )?;
    let y = if stage.pool {
        max_pool2x2_with(Kernels::Stock, &y)?
    } else {
        y
    };
    dropout_with(Kernels::Stock, &y, stage.dropout, stage.seed)
}

/// The result of [`batch_norm1d_train`]: the normalised output and the batch
/// statistics (detached), for the caller's running averages.
#[derive(Debug, Clone)]
pub struct BatchNormOutput {
    /// `weight * (x - mean) / sqrt(var + eps) + bias`, `[batch, features]`.
    pub y: Tensor,
    /// The batch mean of each feature, `[features]`.
    pub mean: Tensor,
    /// The biased batch variance of each feature, `[features]`.
    pub var: Tensor,
}

/// BatchNorm1d in training mode (batch statistics, biased variance) with an
/// affine map, on the fast kernels where they apply: one op forward and a
/// closed-form backward pass instead of candle's dozen generic ops.
///
/// # Shapes
/// - `x`: `[batch, features]`, `batch >= 1`
/// - `weight`, `bias`: `[features]`
pub fn batch_norm1d_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<BatchNormOutput> {
    batch_norm1d_train_with(Kernels::Fast, x, weight, bias, eps)
}

/// [`batch_norm1d_train`] on the chosen [`Kernels`].
pub fn batch_norm1d_train_with(
    kernels: Kernels,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<BatchNormOutput> {
    let (xd, wd, bd) = (x.dims(), weight.dims(), bias.dims());
    if xd.len() != 2 || xd[0] == 0 || wd != [xd[1]] || bd != [xd[1]] {
        return Err(KernelError::BatchNormShapes {
            x: xd.to_vec(),
            w: wd.to_vec(),
            b: bd.to_vec(),
        }
        .into());
    }
    for (arg, t) in [("weight", weight), ("bias", bias)] {
        if t.dtype() != x.dtype() {
            return Err(KernelError::DTypeMismatch {
                op: "batch_norm1d",
                arg,
                found: t.dtype(),
                expected: x.dtype(),
            }
            .into());
        }
    }
    if kernels.fast_for(&[x, weight, bias]) {
        let stats = std::sync::Arc::new(std::sync::OnceLock::new());
        let op = ops::BatchNormOp {
            eps,
            stats: stats.clone(),
        };
        let y = x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
        let (mean, var) = stats
            .get()
            .cloned()
            .ok_or(KernelError::MissingForward { op: "batch_norm1d" })?;
        let dev = x.device();
        let f = xd[1];
        return Ok(BatchNormOutput {
            y,
            mean: Tensor::from_vec(mean, f, dev)?.to_dtype(x.dtype())?,
            var: Tensor::from_vec(var, f, dev)?.to_dtype(x.dtype())?,
        });
    }
    let mean = x.mean_keepdim(0)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(0)?;
    let inv = (&var + eps)?.sqrt()?.recip()?;
    let y = centered
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?;
    Ok(BatchNormOutput {
        y,
        mean: mean.detach().squeeze(0)?,
        var: var.detach().squeeze(0)?,
    })
}

/// The floating-point operations (two per multiply-add) of one forward
/// [`conv2d`] with these shapes; the backward pass costs twice that with the
/// input gradient and once that without. For throughput reports.
pub fn conv2d_flops(x_dims: [usize; 4], w_dims: [usize; 4], padding: usize) -> f64 {
    let [batch, cin, h, w] = x_dims;
    let [cout, _, k, _] = w_dims;
    let out = |size: usize| (size + 2 * padding + 1).saturating_sub(k);
    2.0 * (batch * cout * cin * k * k) as f64 * (out(h) * out(w)) as f64
}

#[cfg(test)]
mod tests {
    /// The kernels named are the ones gemm dispatches to: AVX-512 exactly
    /// when the feature is on and the CPU has it (the CI step with
    /// `--features avx512` prints which ran).
    #[test]
    fn gemm_isa_follows_the_feature_and_the_cpu() {
        let isa = super::gemm_isa();
        eprintln!("gemm kernels: {isa}");
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = cfg!(feature = "avx512") && std::is_x86_feature_detected!("avx512f");
            assert_eq!(isa == "avx512f", avx512, "{isa}");
            if !avx512 {
                let fma = std::is_x86_feature_detected!("fma");
                assert_eq!(isa, if fma { "fma" } else { "scalar" });
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        assert!(["neon", "scalar"].contains(&isa), "{isa}");
    }
}

//! Stride-1 square-kernel 2-D convolution on contiguous NCHW host slices:
//! im2col followed by one GEMM per image, parallel over the batch.
//!
//! Layout conventions, per image: the input is `[cin, h, w]`, the output
//! `[cout, n]` with `n = ho * wo`, and the column matrix `[kdim, n]` with
//! `kdim = cin * k * k` ordered like the kernel `[cout, cin, k, k]`, so the
//! forward pass is the single product `out = w · cols`.

use crate::elem::{Elem, OutPtr, Output, Scratch};
use gemm::Parallelism;
use rayon::prelude::*;

/// The shape of one convolution, already validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub pad: usize,
}

impl ConvGeom {
    pub(crate) fn ho(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.k
    }
    pub(crate) fn wo(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.k
    }
    /// Output pixels per channel.
    pub(crate) fn n(&self) -> usize {
        self.ho() * self.wo()
    }
    /// The GEMM reduction length of the forward pass.
    pub(crate) fn kdim(&self) -> usize {
        self.cin * self.k * self.k
    }
    pub(crate) fn x_image(&self) -> usize {
        self.cin * self.h * self.w
    }
    pub(crate) fn out_image(&self) -> usize {
        self.cout * self.n()
    }
    /// A 1x1 kernel without padding: the column matrix is the input itself.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.k == 1 && self.pad == 0
    }
}

/// The range of output columns `ox` whose input column `ox + kx - pad` lies
/// inside `[0, w)`; empty ranges come back as `(lo, lo)`.
fn valid_cols(kx: usize, g: &ConvGeom) -> (usize, usize) {
    let wo = g.wo();
    let lo = g.pad.saturating_sub(kx).min(wo);
    let hi = (g.w + g.pad).saturating_sub(kx).min(wo);
    (lo, hi.max(lo))
}

/// The input row read by output row `oy` at kernel row `ky`, if inside.
fn input_row(oy: usize, ky: usize, g: &ConvGeom) -> Option<usize> {
    (oy + ky).checked_sub(g.pad).filter(|&iy| iy < g.h)
}

/// Writes every element of `cols` (`[kdim, n]`) from one image `x`
/// (`[cin, h, w]`), zeros included, so `cols` may hold stale data on entry.
#[inline(always)]
pub(crate) fn im2col<T: Elem>(g: &ConvGeom, x: &[T], cols: &mut [T]) {
    let (k, h, w, wo, n) = (g.k, g.h, g.w, g.wo(), g.n());
    for ci in 0..g.cin {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((ci * k + ky) * k + kx) * n..][..n];
                let (lo, hi) = valid_cols(kx, g);
                for (oy, dst) in row.chunks_exact_mut(wo).enumerate() {
                    match input_row(oy, ky, g) {
                        Some(iy) if lo < hi => {
                            let ix0 = lo + kx - g.pad;
                            dst[..lo].fill(T::ZERO);
                            dst[lo..hi].copy_from_slice(&plane[iy * w + ix0..][..hi - lo]);
                            dst[hi..].fill(T::ZERO);
                        }
                        _ => dst.fill(T::ZERO),
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds every column entry back onto the input pixel
/// it was copied from. `dx` must be initialised (normally zeroed) on entry.
#[inline(always)]
pub(crate) fn col2im_add<T: Elem>(g: &ConvGeom, dcols: &[T], dx: &mut [T]) {
    let (k, h, w, wo, n) = (g.k, g.h, g.w, g.wo(), g.n());
    for ci in 0..g.cin {
        let plane = &mut dx[ci * h * w..(ci + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &dcols[((ci * k + ky) * k + kx) * n..][..n];
                let (lo, hi) = valid_cols(kx, g);
                if lo == hi {
                    continue;
                }
                let ix0 = lo + kx - g.pad;
                for (oy, src) in row.chunks_exact(wo).enumerate() {
                    if let Some(iy) = input_row(oy, ky, g) {
                        let dst = &mut plane[iy * w + ix0..][..hi - lo];
                        for (d, &s) in dst.iter_mut().zip(&src[lo..hi]) {
                            *d += s;
                        }
                    }
                }
            }
        }
    }
}

/// One row-major operand of a GEMM: a pointer plus its row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
}

impl<T> Mat<T> {
    /// A row-major `[rows, cols]` matrix.
    pub(crate) fn rows(s: &[T], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub(crate) fn transposed(s: &[T], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: 1,
            cs: cols,
        }
    }
    /// Any strided matrix: element `(i, j)` at `ptr + i * rs + j * cs`.
    pub(crate) fn strided(ptr: *const T, rs: usize, cs: usize) -> Self {
        Self { ptr, rs, cs }
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with a row-major `dst`; the old
/// contents of `dst` are read only when `accumulate` is set.
///
/// # Safety
/// `dst` must be valid for `m * n` writes (and reads when accumulating), the
/// operands must describe in-bounds matrices, and nothing else may access
/// `dst` meanwhile.
pub(crate) unsafe fn matmul<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    par: Parallelism,
) {
    matmul_strided((m, n, k), dst, n, accumulate, lhs, rhs, par);
}

/// [`matmul`] into a `dst` whose rows are `dst_rs` elements apart.
///
/// # Safety
/// As for [`matmul`], with `dst` valid for rows of `dst_rs` elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_strided<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm_fixed_depth(
        (m, n, k),
        (dst, 1, dst_rs as isize),
        accumulate,
        (lhs.ptr, lhs.rs as isize, lhs.cs as isize),
        (rhs.ptr, rhs.rs as isize, rhs.cs as isize),
        par,
    );
}

/// The longest stretch of the summed dimension that one `gemm` call sums in
/// a single pass on every CPU.
///
/// The `gemm` crate splits the summed dimension `k` of a product into depth
/// blocks and adds each block's partial sums onto the destination. Its
/// block length comes from the L1 data cache it detects at run time: 512 on
/// a 32 KiB 8-way cache (AMD Zen, most Intel cores), 1024 on a 48 KiB 12-way
/// one (Intel Ice Lake and later servers), with the same operands. Different
/// blocks sum in a different order, so the same product differed in its last
/// bits from one CPU model to the next. A call whose `k` is at most this
/// length is summed in one block whatever the cache (the crate never takes
/// a block shorter than 512), so [`gemm_fixed_depth`] splits longer products
/// itself, at positions that depend only on the shape.
pub(crate) const GEMM_DEPTH: usize = 512;

/// The depth blocks [`gemm_fixed_depth`] sums `k` in, as `(start, len)`:
/// `k` itself up to [`GEMM_DEPTH`] (one empty block for `k = 0`), else
/// `ceil(k / GEMM_DEPTH)` blocks of equal length (the last one shorter by
/// the remainder). A function of `k` alone; each block is summed in one pass by every code path of the
/// `gemm` crate, and the blocks' sums are added onto the destination in
/// order.
pub(crate) fn depth_blocks(k: usize) -> impl Iterator<Item = (usize, usize)> {
    let len = k.div_ceil(k.div_ceil(GEMM_DEPTH).max(1)).max(1);
    // An empty sum is one empty block: the crate then clears `dst` (or
    // keeps it, when accumulating).
    (0..k.max(1)).step_by(len).map(move |s| (s, len.min(k - s)))
}

/// `dst = (accumulate ? dst : 0) + lhs · rhs` through the `gemm` crate, with
/// the summed dimension cut into [`depth_blocks`] so that the sums, and so
/// every bit of the result, depend on the shapes and strides only, not on
/// the cache sizes of the CPU that runs it. Each operand is
/// `(pointer, row stride, column stride)` in elements; `lhs` is `[m, k]`,
/// `rhs` `[k, n]` and `dst` `[m, n]`.
///
/// # Safety
/// The pointers and strides must describe in-bounds matrices, `dst` must be
/// valid for writes (and for reads when accumulating), and nothing else may
/// access `dst` meanwhile.
pub(crate) unsafe fn gemm_fixed_depth<T: Elem>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_cs, dst_rs): (*mut T, isize, isize),
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const T, isize, isize),
    (rhs, rhs_rs, rhs_cs): (*const T, isize, isize),
    par: Parallelism,
) {
    for (start, len) in depth_blocks(k) {
        let off = start as isize;
        gemm::gemm(
            m,
            n,
            len,
            dst,
            dst_cs,
            dst_rs,
            accumulate || start > 0,
            lhs.offset(off * lhs_cs),
            lhs_cs,
            lhs_rs,
            rhs.offset(off * rhs_rs),
            rhs_cs,
            rhs_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
}

/// How to spread `count` independent jobs over the rayon pool: one job per task
/// when there are enough of them, otherwise sequential jobs with a parallel
/// GEMM inside each.
pub(crate) fn inner_parallelism(count: usize) -> (bool, Parallelism) {
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        (false, Parallelism::None)
    } else if count >= threads {
        (true, Parallelism::None)
    } else {
        (false, Parallelism::Rayon(threads))
    }
}

/// Adds the bias and applies the ReLU to one image's `[cout, n]` output.
#[inline(always)]
pub(crate) fn epilogue<T: Elem>(out: &mut [T], n: usize, bias: Option<&[T]>, relu: bool) {
    for (c, row) in out.chunks_exact_mut(n).enumerate() {
        let b = bias.map_or(T::ZERO, |b| b[c]);
        match (bias.is_some(), relu) {
            (true, true) => row.iter_mut().for_each(|v| {
                let z = *v + b;
                *v = if z > T::ZERO { z } else { T::ZERO };
            }),
            (true, false) => row.iter_mut().for_each(|v| *v += b),
            (false, true) => row.iter_mut().for_each(|v| {
                *v = if *v > T::ZERO { *v } else { T::ZERO };
            }),
            (false, false) => {}
        }
    }
}

/// The forward pass: `relu?(w ⊛ x + b)` as a fresh `[batch, cout, ho, wo]`
/// vector.
pub(crate) fn forward<T: Elem>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    relu: bool,
) -> Vec<T> {
    let (n, kdim, out_image) = (g.n(), g.kdim(), g.out_image());
    let mut out = Output::new(g.batch * out_image);
    let dst = out.ptr();
    let (per_task, par) = inner_parallelism(g.batch);
    let image = |bi: usize| {
        let xb = &x[bi * g.x_image()..][..g.x_image()];
        let mut scratch;
        let cols: &[T] = if g.is_pointwise() {
            xb
        } else {
            scratch = Scratch::new(kdim * n);
            im2col(g, xb, &mut scratch);
            &scratch
        };
        // SAFETY: image `bi` owns the disjoint range `bi * out_image..` of
        // the output, which the GEMM writes in full before the slice below
        // reads it; the operands are in-bounds `[cout, kdim]` and `[kdim, n]`.
        unsafe {
            let ob = dst.at(bi * out_image);
            matmul(
                (g.cout, n, kdim),
                ob,
                false,
                Mat::rows(w, kdim),
                Mat::rows(cols, n),
                par,
            );
            epilogue(std::slice::from_raw_parts_mut(ob, out_image), n, bias, relu);
        }
    };
    if per_task {
        (0..g.batch).into_par_iter().for_each(image);
    } else {
        (0..g.batch).for_each(image);
    }
    // SAFETY: every image's range was written by its GEMM above.
    unsafe { out.finish() }
}

/// Which gradients the backward pass must produce.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wanted {
    pub x: bool,
    pub w: bool,
    pub b: bool,
}

/// Gradients of a convolution; a field is `None` when it was not wanted.
pub(crate) struct ConvGrads<T> {
    pub x: Option<Vec<T>>,
    pub w: Option<Vec<T>>,
    pub b: Option<Vec<T>>,
}

/// One batch chunk's partial sums of the weight and bias gradients.
struct Partial<T> {
    w: Option<Vec<T>>,
    b: Option<Vec<T>>,
}

/// The backward pass. `relu_out`, when given, is the output of the fused
/// ReLU forward: the incoming gradient is masked to where it is positive.
pub(crate) fn backward<T: Elem>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    relu_out: Option<&[T]>,
    grad_out: &[T],
    wanted: Wanted,
) -> ConvGrads<T> {
    let (n, kdim, out_image, x_image) = (g.n(), g.kdim(), g.out_image(), g.x_image());
    let mut dx = wanted.x.then(|| Output::new(g.batch * x_image));
    let dx_ptr = dx.as_mut().map(Output::ptr);

    // Contiguous chunks of images, one per thread, each reducing its own
    // partial weight and bias gradients; the partials are summed at the end in
    // a fixed order, so results do not depend on scheduling.
    let (per_task, par) = inner_parallelism(g.batch);
    let chunks = if per_task {
        rayon::current_num_threads().min(g.batch)
    } else {
        1
    };
    let chunk_len = g.batch.div_ceil(chunks.max(1));
    let run_chunk = |c: usize| -> Partial<T> {
        let images = c * chunk_len..((c + 1) * chunk_len).min(g.batch);
        let mut pw = (wanted.w && !images.is_empty()).then(|| Output::new(g.cout * kdim));
        let mut pb = wanted.b.then(|| vec![T::ZERO; g.cout]);
        let pw_ptr = pw.as_mut().map(Output::ptr);
        for (i, bi) in images.clone().enumerate() {
            let gsrc = &grad_out[bi * out_image..][..out_image];
            let mut masked;
            let gb: &[T] = match relu_out {
                Some(out) => {
                    masked = Scratch::new(out_image);
                    let ob = &out[bi * out_image..][..out_image];
                    for ((m, &gv), &o) in masked.iter_mut().zip(gsrc).zip(ob) {
                        *m = if o > T::ZERO { gv } else { T::ZERO };
                    }
                    &masked
                }
                None => gsrc,
            };
            if let Some(pb) = pb.as_mut() {
                for (acc, row) in pb.iter_mut().zip(gb.chunks_exact(n)) {
                    *acc += row.iter().fold(T::ZERO, |s, &v| s + v);
                }
            }
            let xb = &x[bi * x_image..][..x_image];
            if let Some(pw_ptr) = pw_ptr {
                let mut scratch;
                let cols: &[T] = if g.is_pointwise() {
                    xb
                } else {
                    scratch = Scratch::new(kdim * n);
                    im2col(g, xb, &mut scratch);
                    &scratch
                };
                // SAFETY: this chunk owns its partial; the first image writes
                // it in full and later ones accumulate onto it.
                unsafe {
                    matmul(
                        (g.cout, kdim, n),
                        pw_ptr.at(0),
                        i > 0,
                        Mat::rows(gb, n),
                        Mat::transposed(cols, n),
                        par,
                    );
                }
            }
            if let Some(dx_ptr) = dx_ptr {
                // SAFETY: image `bi` owns this range of the input gradient and
                // writes all of it here: zeros first, then the GEMM or col2im.
                unsafe { input_grad_image(g, w, gb, dx_ptr, bi, par) };
            }
        }
        Partial {
            // SAFETY: a non-empty chunk's first image wrote the whole partial.
            w: pw.map(|p| unsafe { p.finish() }),
            b: pb,
        }
    };
    let partials: Vec<Partial<T>> = if per_task {
        (0..chunks).into_par_iter().map(run_chunk).collect()
    } else {
        (0..chunks).map(run_chunk).collect()
    };

    let mut total_w: Option<Vec<T>> = None;
    let mut total_b: Option<Vec<T>> = None;
    for p in partials {
        sum_into(&mut total_w, p.w);
        sum_into(&mut total_b, p.b);
    }
    ConvGrads {
        // SAFETY: `input_grad_image` wrote every image's range.
        x: dx.map(|d| unsafe { d.finish() }),
        // An empty batch has no partials: its gradients are zero.
        w: wanted
            .w
            .then(|| total_w.unwrap_or_else(|| vec![T::ZERO; g.cout * kdim])),
        b: wanted
            .b
            .then(|| total_b.unwrap_or_else(|| vec![T::ZERO; g.cout])),
    }
}

pub(crate) fn sum_into<T: Elem>(total: &mut Option<Vec<T>>, part: Option<Vec<T>>) {
    match (total.as_mut(), part) {
        (Some(t), Some(p)) => t.iter_mut().zip(&p).for_each(|(a, &b)| *a += b),
        (None, p) => *total = p,
        (_, None) => {}
    }
}

/// Writes image `bi`'s input gradient `col2im(wᵀ · gb)` in full.
///
/// # Safety
/// `dx` must point to a buffer of at least `(bi + 1) * x_image` elements whose
/// image-`bi` range no other thread touches.
#[inline(always)]
pub(crate) unsafe fn input_grad_image<T: Elem>(
    g: &ConvGeom,
    w: &[T],
    gb: &[T],
    dx: OutPtr<T>,
    bi: usize,
    par: Parallelism,
) {
    let (n, kdim, x_image) = (g.n(), g.kdim(), g.x_image());
    let dst = dx.at(bi * x_image);
    let wt = Mat::transposed(w, kdim);
    if g.is_pointwise() {
        // The column matrix is the image itself, so the GEMM lands in place.
        matmul((kdim, n, g.cout), dst, false, wt, Mat::rows(gb, n), par);
        return;
    }
    let mut dcols = Scratch::new(kdim * n);
    matmul(
        (kdim, n, g.cout),
        dcols.as_mut_ptr(),
        false,
        wt,
        Mat::rows(gb, n),
        par,
    );
    std::ptr::write_bytes(dst, 0, x_image);
    col2im_add(g, &dcols, std::slice::from_raw_parts_mut(dst, x_image));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct seven-loop convolution, the reference for the GEMM version.
    fn naive(g: &ConvGeom, x: &[f64], w: &[f64]) -> Vec<f64> {
        let (ho, wo) = (g.ho(), g.wo());
        let mut out = vec![0.0; g.batch * g.cout * ho * wo];
        for b in 0..g.batch {
            for co in 0..g.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = 0.0;
                        for ci in 0..g.cin {
                            for ky in 0..g.k {
                                for kx in 0..g.k {
                                    let iy = (oy + ky) as isize - g.pad as isize;
                                    let ix = (ox + kx) as isize - g.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((b * g.cin + ci) * g.h + iy as usize) * g.w
                                        + ix as usize];
                                    s += xv * w[((co * g.cin + ci) * g.k + ky) * g.k + kx];
                                }
                            }
                        }
                        out[((b * g.cout + co) * ho + oy) * wo + ox] = s;
                    }
                }
            }
        }
        out
    }

    fn ramp(len: usize, seed: usize) -> Vec<f64> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104729) % 1013) as f64) / 1013.0 - 0.5)
            .collect()
    }

    #[test]
    fn forward_matches_naive_loops() {
        for (k, pad) in [(1, 0), (1, 2), (3, 0), (3, 1), (3, 2), (5, 1), (5, 2)] {
            let g = ConvGeom {
                batch: 3,
                cin: 2,
                h: 6,
                w: 7,
                cout: 4,
                k,
                pad,
            };
            let x = ramp(g.batch * g.x_image(), 1);
            let w = ramp(g.cout * g.kdim(), 2);
            let got = forward(&g, &x, &w, None, false);
            let want = naive(&g, &x, &w);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "k={k} pad={pad}: {a} vs {b}");
            }
        }
    }

    /// `col2im` is the adjoint of `im2col`: <im2col(x), c> = <x, col2im(c)>.
    #[test]
    fn col2im_is_adjoint_of_im2col() {
        for (k, pad) in [(1, 2), (3, 1), (5, 1), (5, 3)] {
            let g = ConvGeom {
                batch: 1,
                cin: 2,
                h: 5,
                w: 4,
                cout: 1,
                k,
                pad,
            };
            let x = ramp(g.x_image(), 3);
            let c = ramp(g.kdim() * g.n(), 4);
            let mut cols = vec![9.0; c.len()];
            im2col(&g, &x, &mut cols);
            let mut back = vec![0.0; x.len()];
            col2im_add(&g, &c, &mut back);
            let lhs: f64 = cols.iter().zip(&c).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
            assert!((lhs - rhs).abs() < 1e-12, "k={k} pad={pad}: {lhs} vs {rhs}");
        }
    }

    /// The depth blocks tile `0..k` in order, none longer than
    /// `GEMM_DEPTH`, all equal but the last, and as few as that allows.
    #[test]
    fn depth_blocks_tile_k() {
        assert_eq!(super::depth_blocks(0).collect::<Vec<_>>(), vec![(0, 0)]);
        assert_eq!(super::depth_blocks(512).collect::<Vec<_>>(), vec![(0, 512)]);
        assert_eq!(
            super::depth_blocks(784).collect::<Vec<_>>(),
            vec![(0, 392), (392, 392)]
        );
        for k in (1..5000).chain([6272, 300_000, 1_000_003]) {
            let blocks: Vec<_> = super::depth_blocks(k).collect();
            assert_eq!(blocks.len(), k.div_ceil(super::GEMM_DEPTH), "k={k}");
            let mut next = 0;
            for (i, &(start, len)) in blocks.iter().enumerate() {
                assert_eq!(start, next, "k={k}");
                assert!(len >= 1 && len <= super::GEMM_DEPTH, "k={k}");
                if i + 1 < blocks.len() {
                    assert_eq!(len, blocks[0].1, "k={k}");
                }
                next += len;
            }
            assert_eq!(next, k, "k={k}");
        }
    }
}

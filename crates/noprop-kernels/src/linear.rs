//! A fully connected layer `y = x wᵀ + b` on contiguous row-major host
//! slices, as single GEMMs.
//!
//! candle composes it from a transpose, a matmul and a broadcast add, whose
//! backward pass adds the weight gradient, transposed and strided, onto a
//! fresh zero tensor; here the weight gradient comes out of one GEMM already
//! in the weight's layout.

use crate::conv::{matmul, Mat};
use crate::elem::{Elem, Output};
use gemm::Parallelism;

/// The shape of one product, already validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinearGeom {
    pub batch: usize,
    pub inp: usize,
    pub out: usize,
}

/// GEMMs smaller than this many multiply-adds run on one thread: spreading
/// them costs more than it saves.
const PARALLEL_MIN: usize = 1 << 21;

fn parallelism(macs: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && macs >= PARALLEL_MIN {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `x wᵀ + b` as a fresh `[batch, out]` vector.
pub(crate) fn forward<T: Elem>(g: &LinearGeom, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
    let mut y = Vec::with_capacity(g.batch * g.out);
    for _ in 0..g.batch {
        y.extend_from_slice(b);
    }
    // SAFETY: `y` holds `batch * out` initialised elements that the GEMM
    // accumulates onto; `x` is `[batch, inp]` and `w` is `[out, inp]`, read
    // transposed.
    unsafe {
        matmul(
            (g.batch, g.out, g.inp),
            y.as_mut_ptr(),
            true,
            Mat::rows(x, g.inp),
            Mat::transposed(w, g.inp),
            parallelism(g.batch * g.out * g.inp),
        );
    }
    y
}

/// `grad · w`, the input gradient `[batch, inp]`.
pub(crate) fn grad_x<T: Elem>(g: &LinearGeom, grad: &[T], w: &[T]) -> Vec<T> {
    let mut dx = Output::new(g.batch * g.inp);
    // SAFETY: the GEMM writes all `batch * inp` elements without reading them.
    unsafe {
        matmul(
            (g.batch, g.inp, g.out),
            dx.ptr().at(0),
            false,
            Mat::rows(grad, g.out),
            Mat::rows(w, g.inp),
            parallelism(g.batch * g.out * g.inp),
        );
        dx.finish()
    }
}

/// `a · b` as a fresh row-major `[m, n]` vector, for strided operands: `a`
/// is `[m, k]` and `b` `[k, n]`, each given as its first element and its
/// (row, column) strides in elements.
///
/// # Safety
/// Both operands must lie in bounds of live allocations for the strides
/// given, and stay unchanged during the call.
pub(crate) unsafe fn product<T: Elem>(
    (m, n, k): (usize, usize, usize),
    a: (*const T, usize, usize),
    b: (*const T, usize, usize),
) -> Vec<T> {
    let mut out = Output::new(m * n);
    // SAFETY: the GEMM writes all `m * n` elements without reading them.
    unsafe {
        matmul(
            (m, n, k),
            out.ptr().at(0),
            false,
            Mat::strided(a.0, a.1, a.2),
            Mat::strided(b.0, b.1, b.2),
            parallelism(m * n * k),
        );
        out.finish()
    }
}

/// `gradᵀ · x`, the weight gradient `[out, inp]`.
pub(crate) fn grad_w<T: Elem>(g: &LinearGeom, grad: &[T], x: &[T]) -> Vec<T> {
    let mut dw = Output::new(g.out * g.inp);
    // SAFETY: the GEMM writes all `out * inp` elements without reading them.
    unsafe {
        matmul(
            (g.out, g.inp, g.batch),
            dw.ptr().at(0),
            false,
            Mat::transposed(grad, g.out),
            Mat::rows(x, g.inp),
            parallelism(g.batch * g.out * g.inp),
        );
        dw.finish()
    }
}

/// The column sums of `grad`, the bias gradient `[out]`, row by row in order.
pub(crate) fn grad_b<T: Elem>(g: &LinearGeom, grad: &[T]) -> Vec<T> {
    let mut db = vec![T::ZERO; g.out];
    for row in grad.chunks_exact(g.out) {
        for (acc, &v) in db.iter_mut().zip(row) {
            *acc += v;
        }
    }
    db
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_loops() {
        let g = LinearGeom {
            batch: 3,
            inp: 5,
            out: 4,
        };
        let x: Vec<f64> = (0..15).map(|i| (i as f64 * 0.37).sin()).collect();
        let w: Vec<f64> = (0..20).map(|i| (i as f64 * 0.11).cos()).collect();
        let b = [0.5, -1.0, 2.0, 0.25];
        let y = forward(&g, &x, &w, &b);
        for r in 0..3 {
            for o in 0..4 {
                let want: f64 = b[o] + (0..5).map(|i| x[r * 5 + i] * w[o * 5 + i]).sum::<f64>();
                assert!((y[r * 4 + o] - want).abs() < 1e-12);
            }
        }
    }
}

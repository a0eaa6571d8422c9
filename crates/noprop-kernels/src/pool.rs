//! 2x2 stride-2 max-pooling on contiguous NCHW host slices, with the winning
//! position of every window kept for the backward pass.

use crate::elem::{Elem, Output};
use rayon::prelude::*;

/// The shape of one pooling, already validated (`h, w >= 2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolGeom {
    /// Batch times channels: the number of independent planes.
    pub planes: usize,
    pub h: usize,
    pub w: usize,
}

impl PoolGeom {
    /// Odd sizes drop the last row or column, like PyTorch's floor mode.
    pub(crate) fn ho(&self) -> usize {
        self.h / 2
    }
    pub(crate) fn wo(&self) -> usize {
        self.w / 2
    }
}

/// Planes per rayon task, so that small planes do not drown in scheduling.
fn planes_per_task(plane_len: usize) -> usize {
    (16 * 1024 / plane_len.max(1)).max(1)
}

/// The window offsets in scan order: top-left, top-right, bottom-left,
/// bottom-right. Ties go to the earliest, as in PyTorch.
#[inline]
fn window_argmax<T: Elem>(v: [T; 4]) -> (T, u8) {
    let (mut best, mut at) = (v[0], 0u8);
    for (i, &c) in v.iter().enumerate().skip(1) {
        // A NaN wins over numbers and is kept once found, so it propagates.
        let best_is_nan = best != best;
        if !best_is_nan && (c > best || c != c) {
            best = c;
            at = i as u8;
        }
    }
    (best, at)
}

/// Returns the pooled values `[planes, ho, wo]` and, per window, the offset
/// (0..4 in [`window_argmax`] order) of the element that won.
pub(crate) fn forward<T: Elem>(g: &PoolGeom, x: &[T]) -> (Vec<T>, Vec<u8>) {
    let (h, w, ho, wo) = (g.h, g.w, g.ho(), g.wo());
    let out_len = g.planes * ho * wo;
    let mut out = Output::<T>::new(out_len);
    let mut arg = Output::<u8>::new(out_len);
    let (out_ptr, arg_ptr) = (out.ptr(), arg.ptr());
    let plane = |p: usize| {
        let xp = &x[p * h * w..][..h * w];
        for oy in 0..ho {
            let top = &xp[2 * oy * w..][..w];
            let bottom = &xp[(2 * oy + 1) * w..][..w];
            let base = (p * ho + oy) * wo;
            for ox in 0..wo {
                let (v, a) = window_argmax([
                    top[2 * ox],
                    top[2 * ox + 1],
                    bottom[2 * ox],
                    bottom[2 * ox + 1],
                ]);
                // SAFETY: plane `p` owns the output range `p * ho * wo..`.
                unsafe {
                    out_ptr.at(base + ox).write(v);
                    arg_ptr.at(base + ox).write(a);
                }
            }
        }
    };
    (0..g.planes)
        .into_par_iter()
        .with_min_len(planes_per_task(h * w))
        .for_each(plane);
    // SAFETY: each plane wrote all of its `ho * wo` windows.
    unsafe { (out.finish(), arg.finish()) }
}

/// Routes each window's gradient to the element that won it; every other input
/// element, including a dropped odd row or column, gets zero.
pub(crate) fn backward<T: Elem>(g: &PoolGeom, argmax: &[u8], grad_out: &[T]) -> Vec<T> {
    let (h, w, ho, wo) = (g.h, g.w, g.ho(), g.wo());
    let mut dx = vec![T::ZERO; g.planes * h * w];
    dx.par_chunks_mut(h * w)
        .with_min_len(planes_per_task(h * w))
        .enumerate()
        .for_each(|(p, dp)| {
            let base = p * ho * wo;
            let (gp, ap) = (&grad_out[base..][..ho * wo], &argmax[base..][..ho * wo]);
            for oy in 0..ho {
                for ox in 0..wo {
                    let i = oy * wo + ox;
                    let a = usize::from(ap[i]);
                    dp[(2 * oy + a / 2) * w + 2 * ox + a % 2] = gp[i];
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_maximum_wins_ties() {
        assert_eq!(window_argmax([1.0f32, 3.0, 3.0, 2.0]), (3.0, 1));
        assert_eq!(window_argmax([5.0f32, 5.0, 5.0, 5.0]), (5.0, 0));
        assert_eq!(window_argmax([-1.0f64, -2.0, -3.0, -0.5]), (-0.5, 3));
    }

    #[test]
    fn nan_propagates() {
        let (v, a) = window_argmax([1.0f32, f32::NAN, 9.0, 2.0]);
        assert!(v.is_nan());
        assert_eq!(a, 1);
    }

    #[test]
    fn odd_sizes_floor() {
        let g = PoolGeom {
            planes: 1,
            h: 3,
            w: 5,
        };
        let x: Vec<f32> = (0..15).map(|v| v as f32).collect();
        let (out, arg) = forward(&g, &x);
        assert_eq!(out, [6.0, 8.0]);
        assert_eq!(arg, [3, 3]);
        let dx = backward(&g, &arg, &[1.0f32, 2.0]);
        let mut want = vec![0.0f32; 15];
        want[6] = 1.0;
        want[8] = 2.0;
        assert_eq!(dx, want);
    }
}

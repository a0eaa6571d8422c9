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

/// The maximum of a window given in scan order (top-left, top-right,
/// bottom-left, bottom-right) and its offset there, the earliest on ties as in
/// PyTorch. A NaN wins its window so that it propagates.
///
/// Random data makes every comparison a coin flip, so the common path is
/// branch-free: `max` instructions for the value, integer arithmetic on the
/// equality flags for the offset.
#[inline(always)]
fn window_argmax<T: Elem>(v: [T; 4]) -> (T, u8) {
    let [a, b, c, d] = v;
    if a.is_nan() | b.is_nan() | c.is_nan() | d.is_nan() {
        return first_nan(v);
    }
    let m = a.max_num(b).max_num(c.max_num(d));
    let at = u8::from(a != m) * (1 + u8::from(b != m) * (1 + u8::from(c != m)));
    (m, at)
}

#[cold]
fn first_nan<T: Elem>(v: [T; 4]) -> (T, u8) {
    let at = v.iter().position(|x| x.is_nan()).unwrap_or(0);
    (v[at], at as u8)
}

/// Returns the pooled values `[planes, ho, wo]` and, per window, the offset
/// (0..4 in [`window_argmax`] order) of the element that won.
pub(crate) fn forward<T: Elem>(g: &PoolGeom, x: &[T]) -> (Vec<T>, Vec<u8>) {
    let (h, w, ho, wo) = (g.h, g.w, g.ho(), g.wo());
    let out_len = g.planes * ho * wo;
    let mut out = Output::<T>::new(out_len);
    let mut arg = Output::<u8>::new(out_len);
    out.slots()
        .par_chunks_mut(ho * wo)
        .zip(arg.slots().par_chunks_mut(ho * wo))
        .enumerate()
        .with_min_len(planes_per_task(h * w))
        .for_each(|(p, (op, ap))| {
            let xp = &x[p * h * w..][..h * w];
            for (oy, (orow, arow)) in op
                .chunks_exact_mut(wo)
                .zip(ap.chunks_exact_mut(wo))
                .enumerate()
            {
                let top = &xp[2 * oy * w..][..2 * wo];
                let bottom = &xp[(2 * oy + 1) * w..][..2 * wo];
                let windows = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                for ((o, a), (t, b)) in orow.iter_mut().zip(arow.iter_mut()).zip(windows) {
                    let (v, at) = window_argmax([t[0], t[1], b[0], b[1]]);
                    o.write(v);
                    a.write(at);
                }
            }
        });
    // SAFETY: the chunks cover both buffers and every window wrote its slot.
    unsafe { (out.finish(), arg.finish()) }
}

/// Routes each window's gradient to the element that won it; every other input
/// element, including a dropped odd row or column, gets zero.
pub(crate) fn backward<T: Elem>(g: &PoolGeom, argmax: &[u8], grad_out: &[T]) -> Vec<T> {
    let (h, w, ho, wo) = (g.h, g.w, g.ho(), g.wo());
    let mut dx = Output::<T>::new(g.planes * h * w);
    dx.slots()
        .par_chunks_mut(h * w)
        .enumerate()
        .with_min_len(planes_per_task(h * w))
        .for_each(|(p, dp)| {
            let base = p * ho * wo;
            let (gp, ap) = (&grad_out[base..][..ho * wo], &argmax[base..][..ho * wo]);
            let pick = |won: bool, v: T| if won { v } else { T::ZERO };
            for (oy, (grow, arow)) in gp.chunks_exact(wo).zip(ap.chunks_exact(wo)).enumerate() {
                let (top, bottom) = dp[2 * oy * w..][..2 * w].split_at_mut(w);
                let windows = top.chunks_exact_mut(2).zip(bottom.chunks_exact_mut(2));
                for ((&gv, &at), (t, b)) in grow.iter().zip(arow).zip(windows) {
                    t[0].write(pick(at == 0, gv));
                    t[1].write(pick(at == 1, gv));
                    b[0].write(pick(at == 2, gv));
                    b[1].write(pick(at == 3, gv));
                }
                if w % 2 == 1 {
                    top[w - 1].write(T::ZERO);
                    bottom[w - 1].write(T::ZERO);
                }
            }
            if h % 2 == 1 {
                dp[(h - 1) * w..].iter_mut().for_each(|v| {
                    v.write(T::ZERO);
                });
            }
        });
    // SAFETY: every plane wrote its `2 * ho` full rows and, for odd sizes, the
    // last row and column.
    unsafe { dx.finish() }
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

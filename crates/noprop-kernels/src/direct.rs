//! Direct convolution for few input channels (the first layer's one or three),
//! vectorized over output channels.
//!
//! With `cin * k * k` taps per output pixel (9 for MNIST), im2col builds a
//! patch matrix nine times the image and hands the GEMM a reduction of only
//! nine, which no GEMM runs well. Here each output pixel keeps its `cout`
//! accumulators in registers, channels last, and adds each tap's input value
//! times that tap's row of the transposed weights `wt [taps][cout]`; the
//! weight gradient sums over pixels one tap at a time, again in registers.
//! Images are padded first, so that no tap needs a bounds test. Pixels are
//! written channels-last (`[ho * wo][cout]`) into a scratch image, which the
//! stage then pools and writes out in NCHW.

use crate::conv::ConvGeom;
use crate::elem::Elem;
use crate::winograd::{for_lanes_wide, LaneFn, Lanes};

/// The transposed weights `wt [taps][cout]` of `w [cout][cin][k][k]`.
pub(crate) fn transpose_weights<T: Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let (taps, cout) = (g.kdim(), g.cout);
    let mut wt = vec![T::ZERO; taps * cout];
    for co in 0..cout {
        for t in 0..taps {
            wt[t * cout + co] = w[co * taps + t];
        }
    }
    wt
}

/// The weight gradient `dw [cout][cin][k][k]` from its transpose.
pub(crate) fn untranspose_weights<T: Elem>(g: &ConvGeom, dwt: &[T]) -> Vec<T> {
    let (taps, cout) = (g.kdim(), g.cout);
    let mut dw = vec![T::ZERO; cout * taps];
    for co in 0..cout {
        for t in 0..taps {
            dw[co * taps + t] = dwt[t * cout + co];
        }
    }
    dw
}

/// The padded size `(hp, wp)` of an image.
pub(crate) fn padded_dims(g: &ConvGeom) -> (usize, usize) {
    (g.h + 2 * g.pad, g.w + 2 * g.pad)
}

/// The offset of each tap (`ci`, `ky`, `kx`, weight order) from its output
/// pixel's top-left corner in the padded planes `[cin][hp][wp]`.
pub(crate) fn tap_offsets(g: &ConvGeom) -> Vec<usize> {
    let (hp, wp) = padded_dims(g);
    let mut offs = Vec::with_capacity(g.kdim());
    for ci in 0..g.cin {
        for ky in 0..g.k {
            for kx in 0..g.k {
                offs.push(ci * hp * wp + ky * wp + kx);
            }
        }
    }
    offs
}

/// Copies one image `x [cin][h][w]` into zero-padded planes `xp [cin][hp][wp]`.
#[inline(always)]
pub(crate) fn pad_planes<T: Elem>(g: &ConvGeom, x: &[T], xp: &mut [T]) {
    let (hp, wp) = padded_dims(g);
    let xp = &mut xp[..g.cin * hp * wp];
    xp.fill(T::ZERO);
    for ci in 0..g.cin {
        for y in 0..g.h {
            xp[(ci * hp + y + g.pad) * wp + g.pad..][..g.w]
                .copy_from_slice(&x[(ci * g.h + y) * g.w..][..g.w]);
        }
    }
}

/// `y [ho * wo][cout] = relu(b + conv(x))` for one image, from its padded
/// planes `xp`; the accumulators of an output pixel stay in registers.
#[inline(always)]
pub(crate) fn forward_image<T: Elem>(
    g: &ConvGeom,
    xp: &[T],
    offs: &[usize],
    wt: &[T],
    b: &[T],
    y: &mut [T],
) {
    struct Px<'a, T> {
        xp: &'a [T],
        offs: &'a [usize],
        base: usize,
        wt: &'a [T],
        b: &'a [T],
        y: &'a mut [T],
        n: usize,
        at0: usize,
    }
    impl<T: Elem> LaneFn<T> for Px<'_, T> {
        #[inline(always)]
        fn run<const W: usize>(&mut self, at: usize) {
            let mut acc = Lanes::<T, W>::load(self.b, at);
            for (t, &o) in self.offs.iter().enumerate() {
                acc = Lanes::splat(self.xp[self.base + o])
                    .mul_add(Lanes::load(self.wt, t * self.n + at), acc);
            }
            acc.relu().store(self.y, self.at0 + at);
        }
    }
    let (cout, wo) = (g.cout, g.wo());
    let (_, wp) = padded_dims(g);
    let wt = &wt[..offs.len() * cout];
    for oy in 0..g.ho() {
        for ox in 0..wo {
            let at0 = (oy * wo + ox) * cout;
            for_lanes_wide(
                cout,
                &mut Px {
                    xp,
                    offs,
                    base: oy * wp + ox,
                    wt,
                    b: &b[..cout],
                    y: &mut *y,
                    n: cout,
                    at0,
                },
            );
        }
    }
}

/// Adds one image's weight gradient `dwt [taps][cout] += Σ_p x_t(p) dc[p]`
/// from the convolution-output gradient `dc [ho * wo][cout]`, one tap at a
/// time so that the sums over pixels stay in registers.
#[inline(always)]
pub(crate) fn weight_grad_image<T: Elem>(
    g: &ConvGeom,
    xp: &[T],
    offs: &[usize],
    dc: &[T],
    dwt: &mut [T],
) {
    struct Acc<'a, T> {
        g: &'a ConvGeom,
        xp: &'a [T],
        off: usize,
        dc: &'a [T],
        dwt: &'a mut [T],
        n: usize,
        row: usize,
    }
    impl<T: Elem> LaneFn<T> for Acc<'_, T> {
        #[inline(always)]
        fn run<const W: usize>(&mut self, at: usize) {
            let (wo, wp) = (self.g.wo(), padded_dims(self.g).1);
            let mut acc = Lanes::<T, W>::splat(T::ZERO);
            for oy in 0..self.g.ho() {
                for ox in 0..wo {
                    let v = self.xp[oy * wp + ox + self.off];
                    acc = Lanes::splat(v)
                        .mul_add(Lanes::load(self.dc, (oy * wo + ox) * self.n + at), acc);
                }
            }
            (Lanes::load(self.dwt, self.row + at) + acc).store(self.dwt, self.row + at);
        }
    }
    let cout = g.cout;
    for (t, &off) in offs.iter().enumerate() {
        for_lanes_wide(
            cout,
            &mut Acc {
                g,
                xp,
                off,
                dc,
                dwt: &mut *dwt,
                n: cout,
                row: t * cout,
            },
        );
    }
}

/// One image's input gradient `dx [cin][h][w]` (overwritten) from the
/// convolution-output gradient `dc [ho * wo][cout]`; `dxp` is scratch for
/// the padded planes.
#[inline(always)]
pub(crate) fn input_grad_image<T: Elem>(
    g: &ConvGeom,
    offs: &[usize],
    wt: &[T],
    dc: &[T],
    dxp: &mut [T],
    dx: &mut [T],
) {
    let (cout, wo) = (g.cout, g.wo());
    let (hp, wp) = padded_dims(g);
    let dxp = &mut dxp[..g.cin * hp * wp];
    dxp.fill(T::ZERO);
    for oy in 0..g.ho() {
        for ox in 0..wo {
            let dp = &dc[(oy * wo + ox) * cout..][..cout];
            for (t, &off) in offs.iter().enumerate() {
                let wr = &wt[t * cout..][..cout];
                dxp[oy * wp + ox + off] += wr
                    .iter()
                    .zip(dp)
                    .fold(T::ZERO, |s, (&a, &b)| a.mul_add(b, s));
            }
        }
    }
    for ci in 0..g.cin {
        for y in 0..g.h {
            dx[(ci * g.h + y) * g.w..][..g.w]
                .copy_from_slice(&dxp[(ci * hp + y + g.pad) * wp + g.pad..][..g.w]);
        }
    }
}

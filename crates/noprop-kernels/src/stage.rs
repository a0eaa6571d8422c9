//! A fused convolution stage on contiguous NCHW host slices:
//! `dropout(maxpool2x2(relu(conv(x, w) + b)))`, with the pooling and the
//! dropout optional, forward and backward.
//!
//! Fusing keeps the full-resolution convolution output out of candle's graph:
//! the forward pass pools each tile (or image) while it is still in cache and
//! remembers each window's winner in one byte, set to [`NO_GRAD`] where the
//! ReLU'd maximum is zero or dropout dropped the output; the backward pass
//! rebuilds the sparse gradient of the convolution output from those bytes
//! one tile (or image) at a time, and never redraws the dropout mask (an
//! unpooled output is positive exactly where the ReLU and the mask let the
//! gradient through). candle would otherwise hold the big tensor, zero-fill
//! a gradient of its size and add into it.
//!
//! Three algorithms compute the convolution:
//! - [`Algo::Winograd`]: F(2x2, 3x3) (see [`crate::winograd`]) for 3x3 kernels
//!   with padding 1 over even-sized images, 16 GEMMs per group of images;
//! - [`Algo::Direct`]: a direct convolution vectorized over output channels
//!   (see [`crate::direct`]) for few input channels, where the reduction of
//!   an im2col or Winograd GEMM would be too short to pay;
//! - [`Algo::Im2col`]: im2col and one GEMM per image, for everything else.
//!
//! Work is split into chunks of [`CHUNK`] images, run in parallel; each chunk
//! reduces its own partial weight and bias gradients and the partials are
//! summed in chunk order, so every result is the same for any thread count.
//! A chunk's work is compiled twice, for the baseline target and for AVX2
//! with FMA, and the second runs where the CPU has them (see
//! [`crate::elem::avx2_fma`]); everything it calls is `#[inline(always)]` so
//! that it is compiled with the chunk's target features.

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::conv::{self, im2col, matmul, matmul_strided, ConvGeom, ConvGrads, Mat, Wanted};
use crate::direct;
use crate::dropout::Mask;
use crate::elem::{Elem, OutPtr, Output, Scratch};
use crate::winograd::{self, for_lanes, LaneFn, Lanes, Wino};
use gemm::Parallelism;
use rayon::prelude::*;

/// Images per parallel task. Fixed, so that the order in which partial
/// gradients are summed does not depend on the thread count.
const CHUNK: usize = 8;

/// Images whose tiles share one set of Winograd GEMMs: 196 GEMM rows for
/// 14x14 images, over which each GEMM's packing of the weights is spread.
/// (2 and 4 timed alike on the development machine.)
const WINO_GROUP: usize = 4;

/// The window code of a pooled output whose ReLU'd maximum is zero: no
/// gradient flows back through it (0..=3 name the winning cell otherwise).
pub(crate) const NO_GRAD: u8 = 4;

/// How the convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algo {
    Im2col,
    Winograd,
    Direct,
}

/// Whether [`Algo::Winograd`] can compute this convolution.
pub(crate) fn winograd_fits(g: &ConvGeom) -> bool {
    g.k == 3 && g.pad == 1 && g.h.is_multiple_of(2) && g.w.is_multiple_of(2) && g.h > 0 && g.w > 0
}

/// The shape of a stage: the convolution and whether a 2x2 pool follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StageGeom {
    pub conv: ConvGeom,
    pub pool: bool,
}

impl StageGeom {
    /// Output height.
    pub(crate) fn oh(&self) -> usize {
        if self.pool {
            self.conv.ho() / 2
        } else {
            self.conv.ho()
        }
    }
    /// Output width.
    pub(crate) fn ow(&self) -> usize {
        if self.pool {
            self.conv.wo() / 2
        } else {
            self.conv.wo()
        }
    }
    /// Output elements per image.
    pub(crate) fn out_image(&self) -> usize {
        self.conv.cout * self.oh() * self.ow()
    }
    fn wino(&self) -> Wino {
        let c = &self.conv;
        Wino {
            cin: c.cin,
            cout: c.cout,
            h: c.h,
            w: c.w,
        }
    }
}

/// The output and, for pooled stages, each window's code.
pub(crate) struct StageOut<T> {
    pub out: Vec<T>,
    pub arg: Option<Vec<u8>>,
}

/// The maximum of four ReLU outputs and its window code: the first maximum in
/// scan order, or [`NO_GRAD`] when the maximum is zero.
#[inline(always)]
fn pool4<T: Elem>([a, b, c, d]: [T; 4]) -> (T, u8) {
    let m = a.max_num(b).max_num(c.max_num(d));
    let at = u8::from(a != m) * (1 + u8::from(b != m) * (1 + u8::from(c != m)));
    (m, if m > T::ZERO { at } else { NO_GRAD })
}

/// Runs `f` on every chunk of images, in parallel when there are threads and
/// chunks to spare, and returns the results in chunk order.
fn for_chunks<R: Send>(batch: usize, f: impl Fn(Range<usize>) -> R + Sync + Send) -> Vec<R> {
    let n = batch.div_ceil(CHUNK);
    let range = |c: usize| c * CHUNK..((c + 1) * CHUNK).min(batch);
    if rayon::current_num_threads() > 1 && n > 1 {
        (0..n).into_par_iter().map(|c| f(range(c))).collect()
    } else {
        (0..n).map(|c| f(range(c))).collect()
    }
}

/// The forward pass: a fresh `[batch, cout, oh, ow]` output and the window
/// codes of a pooled stage.
pub(crate) fn forward<T: Elem>(
    sg: &StageGeom,
    algo: Algo,
    x: &[T],
    w: &[T],
    b: &[T],
    mask: Option<&Mask>,
) -> StageOut<T> {
    let g = &sg.conv;
    let oi = sg.out_image();
    let mut out = Output::<T>::new(g.batch * oi);
    let mut arg = sg.pool.then(|| Output::<u8>::new(g.batch * oi));
    let (op, ap) = (out.ptr(), arg.as_mut().map(Output::ptr));
    // Winograd's transformed weights, or the direct method's transposed ones.
    let wk = match algo {
        Algo::Winograd => winograd::transform_weights(&sg.wino(), w),
        Algo::Direct => direct::transpose_weights(g, w),
        Algo::Im2col => Vec::new(),
    };
    let ctx = FwdChunk {
        sg,
        algo,
        x,
        w,
        wk: &wk,
        b,
        mask,
        out: op,
        arg: ap,
    };
    // SAFETY: each chunk writes only its own images' ranges of `out` and `arg`.
    for_chunks(g.batch, |images| unsafe { forward_chunk(&ctx, images) });
    // SAFETY: the chunks cover every image, and each wrote its ranges in full.
    unsafe {
        StageOut {
            out: out.finish(),
            arg: arg.map(|a| a.finish()),
        }
    }
}

/// What every chunk of a forward pass reads, and where it writes.
struct FwdChunk<'a, T> {
    sg: &'a StageGeom,
    algo: Algo,
    x: &'a [T],
    w: &'a [T],
    /// Transformed (Winograd) or transposed (direct) weights.
    wk: &'a [T],
    b: &'a [T],
    mask: Option<&'a Mask>,
    out: OutPtr<T>,
    arg: Option<OutPtr<u8>>,
}

/// The forward pass of one chunk of images, compiled for AVX2 and FMA where
/// the CPU has them (see [`avx2_fma`]).
///
/// # Safety
/// The chunk's ranges of `out` and `arg` must belong to the caller.
unsafe fn forward_chunk<T: Elem>(ctx: &FwdChunk<'_, T>, images: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    if crate::elem::avx2_fma() {
        return forward_chunk_avx2(ctx, images);
    }
    forward_chunk_body(ctx, images)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_chunk_avx2<T: Elem>(ctx: &FwdChunk<'_, T>, images: Range<usize>) {
    forward_chunk_body(ctx, images)
}

#[inline(always)]
unsafe fn forward_chunk_body<T: Elem>(ctx: &FwdChunk<'_, T>, images: Range<usize>) {
    let &FwdChunk {
        sg,
        algo,
        x,
        w,
        wk,
        b,
        mask,
        out,
        arg,
    } = ctx;
    let oi = sg.out_image();
    match algo {
        Algo::Winograd => wino_forward(sg, x, wk, b, images.clone(), out, arg),
        Algo::Direct => direct_forward(sg, x, wk, b, images.clone(), out, arg),
        Algo::Im2col => im2col_forward(sg, x, w, b, images.clone(), out, arg),
    }
    // Every image of the chunk is written; now its dropout.
    if let Some(mask) = mask {
        let (start, len) = (images.start * oi, images.len() * oi);
        let done = std::slice::from_raw_parts_mut(out.at(start), len);
        match arg {
            // A dropped window passes no gradient either: its code says so,
            // and the backward pass never redraws the mask.
            Some(arg) => {
                let codes = std::slice::from_raw_parts_mut(arg.at(start), len);
                mask.apply_in_place_with_codes(start, done, codes, NO_GRAD);
            }
            // An unpooled output is positive exactly where the ReLU passed
            // and the mask kept it, which is all the backward pass needs.
            None => mask.apply_in_place_at(start, done),
        }
    }
}

/// Writes image `bi`'s output: pooled values and codes, or the ReLU output.
///
/// # Safety
/// `out` and `arg` must be valid for image `bi`'s range, owned by the caller.
#[inline(always)]
unsafe fn write_pooled_planes<T: Elem>(
    sg: &StageGeom,
    y: &[T],
    bi: usize,
    out: OutPtr<T>,
    arg: Option<OutPtr<u8>>,
) {
    let g = &sg.conv;
    let oi = sg.out_image();
    let o = out.slots(bi * oi, oi);
    let Some(arg) = arg else {
        for (d, &v) in o.iter_mut().zip(y) {
            d.write(v);
        }
        return;
    };
    let a = arg.slots(bi * oi, oi);
    let (ho, wo, oh, ow) = (g.ho(), g.wo(), sg.oh(), sg.ow());
    for c in 0..g.cout {
        let plane = &y[c * ho * wo..][..ho * wo];
        for oy in 0..oh {
            let top = &plane[2 * oy * wo..][..2 * ow];
            let bottom = &plane[(2 * oy + 1) * wo..][..2 * ow];
            let base = (c * oh + oy) * ow;
            for ox in 0..ow {
                let (v, code) = pool4([
                    top[2 * ox],
                    top[2 * ox + 1],
                    bottom[2 * ox],
                    bottom[2 * ox + 1],
                ]);
                o[base + ox].write(v);
                a[base + ox].write(code);
            }
        }
    }
}

/// The forward pass of `images` by im2col and one GEMM per image.
///
/// # Safety
/// As for [`write_pooled_planes`], for every image of `images`.
#[inline(always)]
unsafe fn im2col_forward<T: Elem>(
    sg: &StageGeom,
    x: &[T],
    w: &[T],
    b: &[T],
    images: Range<usize>,
    out: OutPtr<T>,
    arg: Option<OutPtr<u8>>,
) {
    let g = &sg.conv;
    let (n, kdim, x_len) = (g.n(), g.kdim(), g.x_image());
    let mut y = Scratch::<T>::new(g.cout * n);
    let mut cols = Scratch::<T>::new(if g.is_pointwise() { 0 } else { kdim * n });
    for bi in images {
        let xb = &x[bi * x_len..][..x_len];
        let c: &[T] = if g.is_pointwise() {
            xb
        } else {
            im2col(g, xb, &mut cols);
            &cols
        };
        matmul(
            (g.cout, n, kdim),
            y.as_mut_ptr(),
            false,
            Mat::rows(w, kdim),
            Mat::rows(c, n),
            Parallelism::None,
        );
        conv::epilogue(&mut y, n, Some(b), true);
        write_pooled_planes(sg, &y, bi, out, arg);
    }
}

/// The forward pass of `images` by the direct method; `wt` holds the
/// transposed weights.
///
/// # Safety
/// As for [`write_pooled_planes`], for every image of `images`.
#[inline(always)]
unsafe fn direct_forward<T: Elem>(
    sg: &StageGeom,
    x: &[T],
    wt: &[T],
    b: &[T],
    images: Range<usize>,
    out: OutPtr<T>,
    arg: Option<OutPtr<u8>>,
) {
    let g = &sg.conv;
    let x_len = g.x_image();
    let (hp, wp) = direct::padded_dims(g);
    let offs = direct::tap_offsets(g);
    let mut y = Scratch::<T>::new(g.n() * g.cout);
    let mut xp = Scratch::<T>::new(g.cin * hp * wp);
    for bi in images {
        direct::pad_planes(g, &x[bi * x_len..][..x_len], &mut xp);
        direct::forward_image(g, &xp, &offs, wt, b, &mut y);
        write_channels_last(sg, &y, bi, out, arg);
    }
}

/// Writes image `bi`'s output from its channels-last ReLU output
/// `y [ho * wo][cout]`: pooled values and codes, or the transposed `y`.
///
/// # Safety
/// As for [`write_pooled_planes`].
#[inline(always)]
unsafe fn write_channels_last<T: Elem>(
    sg: &StageGeom,
    y: &[T],
    bi: usize,
    out: OutPtr<T>,
    arg: Option<OutPtr<u8>>,
) {
    let g = &sg.conv;
    let (cout, n, wo) = (g.cout, g.n(), g.wo());
    let oi = sg.out_image();
    let o = out.slots(bi * oi, oi);
    let Some(arg) = arg else {
        for (p, px) in y.chunks_exact(cout).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                o[c * n + p].write(v);
            }
        }
        return;
    };
    let a = arg.slots(bi * oi, oi);
    let (oh, ow) = (sg.oh(), sg.ow());
    struct Pool<'a, T> {
        y: &'a [T],
        o: &'a mut [MaybeUninit<T>],
        a: &'a mut [MaybeUninit<u8>],
        cells: [usize; 4],
        q: usize,
        plane: usize,
    }
    impl<T: Elem> LaneFn<T> for Pool<'_, T> {
        #[inline(always)]
        fn run<const W: usize>(&mut self, at: usize) {
            let [k0, k1, k2, k3] = self.cells;
            let (c0, c1) = (
                Lanes::<T, W>::load(self.y, k0 + at),
                Lanes::<T, W>::load(self.y, k1 + at),
            );
            let (c2, c3) = (
                Lanes::<T, W>::load(self.y, k2 + at),
                Lanes::<T, W>::load(self.y, k3 + at),
            );
            for j in 0..W {
                let (v, code) = pool4([c0.0[j], c1.0[j], c2.0[j], c3.0[j]]);
                let k = (at + j) * self.plane + self.q;
                self.o[k].write(v);
                self.a[k].write(code);
            }
        }
    }
    for py in 0..oh {
        for px in 0..ow {
            let tl = (2 * py * wo + 2 * px) * cout;
            let cells = [tl, tl + cout, tl + wo * cout, tl + (wo + 1) * cout];
            for_lanes(
                cout,
                &mut Pool {
                    y,
                    o: &mut *o,
                    a: &mut *a,
                    cells,
                    q: py * ow + px,
                    plane: oh * ow,
                },
            );
        }
    }
}

/// The forward pass of `images` by Winograd's F(2x2, 3x3), `WINO_GROUP`
/// images per set of GEMMs; `u` holds the transformed weights.
///
/// # Safety
/// As for [`write_pooled_planes`], for every image of `images`.
#[inline(always)]
unsafe fn wino_forward<T: Elem>(
    sg: &StageGeom,
    x: &[T],
    u: &[T],
    b: &[T],
    images: Range<usize>,
    out: OutPtr<T>,
    arg: Option<OutPtr<u8>>,
) {
    let wg = sg.wino();
    let (cin, cout, tiles, x_len) = (wg.cin, wg.cout, wg.tiles(), sg.conv.x_image());
    let oi = sg.out_image();
    let group_max = WINO_GROUP.min(images.len());
    let mut xp = Scratch::<T>::new(wg.padded());
    let mut tbuf = Scratch::<T>::new(wg.row_buf());
    let mut v = Scratch::<T>::new(group_max * tiles * 16 * cin);
    let mut m = Scratch::<T>::new(group_max * tiles * 16 * cout);
    let mut start = images.start;
    while start < images.end {
        let group = start..(start + WINO_GROUP).min(images.end);
        for (k, bi) in group.clone().enumerate() {
            winograd::pad_channels_last(&wg, &x[bi * x_len..][..x_len], &mut xp);
            winograd::input_transform(
                &wg,
                &xp,
                &mut v[k * tiles * 16 * cin..][..tiles * 16 * cin],
                &mut tbuf,
            );
        }
        let rows = group.len() * tiles;
        for pt in 0..16 {
            matmul_strided(
                (rows, cout, cin),
                m.as_mut_ptr().add(pt * cout),
                16 * cout,
                false,
                Mat::strided(v.as_ptr().add(pt * cin), 16 * cin, 1),
                Mat::strided(u.as_ptr().add(pt * cin * cout), cout, 1),
                Parallelism::None,
            );
        }
        for (k, bi) in group.clone().enumerate() {
            let mk = &m[k * tiles * 16 * cout..][..tiles * 16 * cout];
            let o = out.slots(bi * oi, oi);
            let a = arg.map(|a| a.slots(bi * oi, oi));
            wino_output_image(sg, mk, b, o, a);
        }
        start = group.end;
    }
}

/// The output transform, bias, ReLU and (optional) pooling of one image's
/// tiles `m [tiles][16][cout]` into its NCHW output.
#[inline(always)]
fn wino_output_image<T: Elem>(
    sg: &StageGeom,
    m: &[T],
    b: &[T],
    out: &mut [MaybeUninit<T>],
    arg: Option<&mut [MaybeUninit<u8>]>,
) {
    let wg = sg.wino();
    let (cout, tw, tiles, w) = (wg.cout, wg.tw(), wg.tiles(), wg.w);
    let b = &b[..cout];
    match arg {
        Some(arg) => {
            struct Pooled<'a, T> {
                m: &'a [T],
                b: &'a [T],
                out: &'a mut [MaybeUninit<T>],
                arg: &'a mut [MaybeUninit<u8>],
                n: usize,
                tiles: usize,
                p: usize,
            }
            impl<T: Elem> LaneFn<T> for Pooled<'_, T> {
                #[inline(always)]
                fn run<const W: usize>(&mut self, at: usize) {
                    let [y0, y1, y2, y3] =
                        winograd::tile_outputs::<T, W>(self.m, self.n, self.b, at);
                    for j in 0..W {
                        let (v, code) = pool4([y0.0[j], y1.0[j], y2.0[j], y3.0[j]]);
                        let k = (at + j) * self.tiles + self.p;
                        self.out[k].write(v);
                        self.arg[k].write(code);
                    }
                }
            }
            for p in 0..tiles {
                let mp = &m[p * 16 * cout..][..16 * cout];
                for_lanes(
                    cout,
                    &mut Pooled {
                        m: mp,
                        b,
                        out: &mut *out,
                        arg: &mut *arg,
                        n: cout,
                        tiles,
                        p,
                    },
                );
            }
        }
        None => {
            struct Full<'a, T> {
                m: &'a [T],
                b: &'a [T],
                out: &'a mut [MaybeUninit<T>],
                n: usize,
                hw: usize,
                base: usize,
                w: usize,
            }
            impl<T: Elem> LaneFn<T> for Full<'_, T> {
                #[inline(always)]
                fn run<const W: usize>(&mut self, at: usize) {
                    let y = winograd::tile_outputs::<T, W>(self.m, self.n, self.b, at);
                    for j in 0..W {
                        let k = (at + j) * self.hw + self.base;
                        for (px, v) in [k, k + 1, k + self.w, k + self.w + 1].into_iter().zip(y) {
                            self.out[px].write(v.0[j]);
                        }
                    }
                }
            }
            let hw = wg.h * w;
            for ti in 0..wg.th() {
                for tj in 0..tw {
                    let mp = &m[(ti * tw + tj) * 16 * cout..][..16 * cout];
                    for_lanes(
                        cout,
                        &mut Full {
                            m: mp,
                            b,
                            out: &mut *out,
                            n: cout,
                            hw,
                            base: 2 * ti * w + 2 * tj,
                            w,
                        },
                    );
                }
            }
        }
    }
}

/// One chunk's partial parameter gradients.
struct Partial<T> {
    w: Option<Vec<T>>,
    b: Option<Vec<T>>,
}

/// The backward pass from the output gradient `grad`, the stage's output
/// `out` (for the ReLU mask of an unpooled stage) and the window codes `arg`
/// (for a pooled one).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Elem>(
    sg: &StageGeom,
    algo: Algo,
    x: &[T],
    w: &[T],
    out: &[T],
    arg: Option<&[u8]>,
    mask: Option<&Mask>,
    grad: &[T],
    wanted: Wanted,
) -> ConvGrads<T> {
    let g = &sg.conv;
    let oi = sg.out_image();
    let mut dx = wanted.x.then(|| Output::<T>::new(g.batch * g.x_image()));
    let dxp = dx.as_mut().map(Output::ptr);
    let wg = sg.wino();
    let u = match algo {
        Algo::Winograd if wanted.x => Some(winograd::transform_weights(&wg, w)),
        Algo::Direct => Some(direct::transpose_weights(g, w)),
        _ => None,
    };
    // The dropout factor of a kept element; dropped ones are known from the
    // window codes (pooled) or the zero output (unpooled).
    let scale = T::from_f64(mask.map_or(1.0, |m| m.scale));
    let partials = for_chunks(g.batch, |images| {
        let (start, end) = (images.start * oi, images.end * oi);
        let ctx = ChunkGrad {
            sg,
            x,
            w,
            u: u.as_deref(),
            out: &out[start..end],
            arg: arg.map(|a| &a[start..end]),
            gs: &grad[start..end],
            scale,
            wanted,
        };
        // SAFETY: each chunk writes only its own images' input gradients.
        unsafe { backward_chunk(&ctx, algo, images, dxp) }
    });
    let mut total_w: Option<Vec<T>> = None;
    let mut total_b: Option<Vec<T>> = None;
    for p in partials {
        conv::sum_into(&mut total_w, p.w);
        conv::sum_into(&mut total_b, p.b);
    }
    let dw = wanted.w.then(|| match (algo, total_w) {
        (Algo::Winograd, Some(du)) => winograd::weight_grad(&wg, &du),
        (Algo::Direct, Some(dwt)) => direct::untranspose_weights(g, &dwt),
        (Algo::Im2col, Some(dw)) => dw,
        // An empty batch has no partials: its gradients are zero.
        (_, None) => vec![T::ZERO; g.cout * g.kdim()],
    });
    ConvGrads {
        // SAFETY: every chunk wrote its images' input gradients in full.
        x: dx.map(|d| unsafe { d.finish() }),
        w: dw,
        b: wanted
            .b
            .then(|| total_b.unwrap_or_else(|| vec![T::ZERO; g.cout])),
    }
}

/// The backward pass of one chunk of images, compiled for AVX2 and FMA
/// where the CPU has them (see [`avx2_fma`]).
///
/// # Safety
/// The chunk's range of `dx` must belong to the caller.
unsafe fn backward_chunk<T: Elem>(
    ctx: &ChunkGrad<'_, T>,
    algo: Algo,
    images: Range<usize>,
    dx: Option<OutPtr<T>>,
) -> Partial<T> {
    #[cfg(target_arch = "x86_64")]
    if crate::elem::avx2_fma() {
        return backward_chunk_avx2(ctx, algo, images, dx);
    }
    backward_chunk_body(ctx, algo, images, dx)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_chunk_avx2<T: Elem>(
    ctx: &ChunkGrad<'_, T>,
    algo: Algo,
    images: Range<usize>,
    dx: Option<OutPtr<T>>,
) -> Partial<T> {
    backward_chunk_body(ctx, algo, images, dx)
}

#[inline(always)]
unsafe fn backward_chunk_body<T: Elem>(
    ctx: &ChunkGrad<'_, T>,
    algo: Algo,
    images: Range<usize>,
    dx: Option<OutPtr<T>>,
) -> Partial<T> {
    match algo {
        Algo::Winograd => ctx.winograd(images, dx),
        Algo::Direct => ctx.direct(images, dx),
        Algo::Im2col => ctx.im2col(images, dx),
    }
}

/// What one chunk's backward pass reads; the slices `out`, `arg` and `gs`
/// start at the chunk's first image.
struct ChunkGrad<'a, T> {
    sg: &'a StageGeom,
    x: &'a [T],
    w: &'a [T],
    u: Option<&'a [T]>,
    out: &'a [T],
    arg: Option<&'a [u8]>,
    gs: &'a [T],
    scale: T,
    wanted: Wanted,
}

impl<T: Elem> ChunkGrad<'_, T> {
    /// The gradient of the chunk's `i`-th image's convolution output (after
    /// bias, before ReLU), dense `[cout][ho][wo]`, into `dc`.
    #[inline(always)]
    fn dense_grad(&self, i: usize, dc: &mut [T]) {
        let sg = self.sg;
        let g = &sg.conv;
        let (oi, wo, oh, ow) = (sg.out_image(), g.wo(), sg.oh(), sg.ow());
        let gs = &self.gs[i * oi..][..oi];
        let scale = self.scale;
        match self.arg {
            Some(arg) => {
                let arg = &arg[i * oi..][..oi];
                dc.fill(T::ZERO);
                for (c, plane) in dc.chunks_exact_mut(g.n()).enumerate() {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let k = (c * oh + oy) * ow + ox;
                            let code = arg[k] as usize;
                            if code < NO_GRAD as usize {
                                plane[(2 * oy + code / 2) * wo + 2 * ox + code % 2] = gs[k] * scale;
                            }
                        }
                    }
                }
            }
            None => {
                let out = &self.out[i * oi..][..oi];
                for ((d, &gv), &o) in dc.iter_mut().zip(gs).zip(out) {
                    *d = if o > T::ZERO { gv * scale } else { T::ZERO };
                }
            }
        }
    }

    /// The transformed output gradients `dM = A dY Aᵀ` of every tile of the
    /// chunk's `i`-th image, into `dm [tiles][16][cout]`, from the gradient
    /// `dY` of its convolution output (after bias, before ReLU); adds the
    /// sums of `dY` per channel into `db`.
    #[inline(always)]
    fn tile_grads(&self, i: usize, dm: &mut [T], db: &mut [T]) {
        let sg = self.sg;
        let wg = sg.wino();
        let (oi, cout, tiles, tw, w) = (sg.out_image(), wg.cout, wg.tiles(), wg.tw(), wg.w);
        let gs = &self.gs[i * oi..][..oi];
        let db = &mut db[..cout];
        match self.arg {
            Some(arg) => {
                // One window per tile: the gradient goes to its winning cell.
                struct Pooled<'a, T> {
                    gs: &'a [T],
                    arg: &'a [u8],
                    dm: &'a mut [T],
                    db: &'a mut [T],
                    n: usize,
                    tiles: usize,
                    p: usize,
                    scale: T,
                }
                impl<T: Elem> LaneFn<T> for Pooled<'_, T> {
                    #[inline(always)]
                    fn run<const W: usize>(&mut self, at: usize) {
                        let k = at * self.tiles + self.p;
                        let g = Lanes::<T, W>::gather(self.gs, k, self.tiles)
                            * Lanes::splat(self.scale);
                        let mut code = [0u8; W];
                        for (j, c) in code.iter_mut().enumerate() {
                            *c = self.arg[k + j * self.tiles];
                        }
                        let mut d = [Lanes::<T, W>::splat(T::ZERO); 4];
                        for (cell, dc) in d.iter_mut().enumerate() {
                            let mut m = [false; W];
                            for (b, &c) in m.iter_mut().zip(&code) {
                                *b = c == cell as u8;
                            }
                            *dc = g.select(m);
                        }
                        (Lanes::load(self.db, at) + d[0] + d[1] + d[2] + d[3]).store(self.db, at);
                        winograd::store_tile_adjoint(d, self.dm, self.n, at);
                    }
                }
                let arg = &arg[i * oi..][..oi];
                for p in 0..tiles {
                    let dmp = &mut dm[p * 16 * cout..][..16 * cout];
                    for_lanes(
                        cout,
                        &mut Pooled {
                            gs,
                            arg,
                            dm: dmp,
                            db: &mut *db,
                            n: cout,
                            tiles,
                            p,
                            scale: self.scale,
                        },
                    );
                }
            }
            None => {
                // Four pixels per tile, each through the ReLU and dropout mask
                // that its (positive or zero) output records.
                struct Full<'a, T> {
                    gs: &'a [T],
                    out: &'a [T],
                    dm: &'a mut [T],
                    db: &'a mut [T],
                    n: usize,
                    hw: usize,
                    base: usize,
                    w: usize,
                    scale: T,
                }
                impl<T: Elem> LaneFn<T> for Full<'_, T> {
                    #[inline(always)]
                    fn run<const W: usize>(&mut self, at: usize) {
                        let k = at * self.hw + self.base;
                        let mut d = [Lanes::<T, W>::splat(T::ZERO); 4];
                        for (dc, px) in d.iter_mut().zip([k, k + 1, k + self.w, k + self.w + 1]) {
                            let g = Lanes::<T, W>::gather(self.gs, px, self.hw)
                                * Lanes::splat(self.scale);
                            *dc = g.select(Lanes::<T, W>::gather(self.out, px, self.hw).positive());
                        }
                        (Lanes::load(self.db, at) + d[0] + d[1] + d[2] + d[3]).store(self.db, at);
                        winograd::store_tile_adjoint(d, self.dm, self.n, at);
                    }
                }
                let out = &self.out[i * oi..][..oi];
                let hw = wg.h * w;
                for ti in 0..wg.th() {
                    for tj in 0..tw {
                        let dmp = &mut dm[(ti * tw + tj) * 16 * cout..][..16 * cout];
                        let base = 2 * ti * w + 2 * tj;
                        for_lanes(
                            cout,
                            &mut Full {
                                gs,
                                out,
                                dm: dmp,
                                db: &mut *db,
                                n: cout,
                                hw,
                                base,
                                w,
                                scale: self.scale,
                            },
                        );
                    }
                }
            }
        }
    }

    /// The gradient of the chunk's `i`-th image's convolution output,
    /// channels last `[ho * wo][cout]`, into `dc`; adds its sums into `db`.
    #[inline(always)]
    fn channels_last_grad(&self, i: usize, dc: &mut [T], db: &mut [T]) {
        let sg = self.sg;
        let g = &sg.conv;
        let (oi, cout, n, wo, oh, ow) = (sg.out_image(), g.cout, g.n(), g.wo(), sg.oh(), sg.ow());
        let gs = &self.gs[i * oi..][..oi];
        let dc = &mut dc[..n * cout];
        match self.arg {
            Some(arg) => {
                let arg = &arg[i * oi..][..oi];
                dc.fill(T::ZERO);
                for c in 0..cout {
                    for py in 0..oh {
                        for px in 0..ow {
                            let k = (c * oh + py) * ow + px;
                            let code = arg[k] as usize;
                            if code < NO_GRAD as usize {
                                let p = (2 * py + code / 2) * wo + 2 * px + code % 2;
                                dc[p * cout + c] = gs[k] * self.scale;
                            }
                        }
                    }
                }
            }
            None => {
                let out = &self.out[i * oi..][..oi];
                for (p, px) in dc.chunks_exact_mut(cout).enumerate() {
                    for (c, d) in px.iter_mut().enumerate() {
                        let k = c * n + p;
                        *d = if out[k] > T::ZERO {
                            gs[k] * self.scale
                        } else {
                            T::ZERO
                        };
                    }
                }
            }
        }
        for px in dc.chunks_exact(cout) {
            for (acc, &v) in db.iter_mut().zip(px) {
                *acc += v;
            }
        }
    }

    /// Direct-method backward of `images`, one image at a time.
    ///
    /// # Safety
    /// As for [`ChunkGrad::im2col`].
    #[inline(always)]
    unsafe fn direct(&self, images: Range<usize>, dx: Option<OutPtr<T>>) -> Partial<T> {
        let g = &self.sg.conv;
        let (x_len, wt) = (g.x_image(), self.u.unwrap_or(&[]));
        let (hp, wp) = direct::padded_dims(g);
        let offs = direct::tap_offsets(g);
        let mut dc = Scratch::<T>::new(g.n() * g.cout);
        let mut xp = Scratch::<T>::new(if self.wanted.w { g.cin * hp * wp } else { 0 });
        let mut dxp = Scratch::<T>::new(if dx.is_some() { g.cin * hp * wp } else { 0 });
        let mut pw =
            (self.wanted.w && !images.is_empty()).then(|| vec![T::ZERO; g.kdim() * g.cout]);
        let mut db = vec![T::ZERO; g.cout];
        let first = images.start;
        for bi in images {
            self.channels_last_grad(bi - first, &mut dc, &mut db);
            let xb = &self.x[bi * x_len..][..x_len];
            if let Some(pw) = pw.as_mut() {
                direct::pad_planes(g, xb, &mut xp);
                direct::weight_grad_image(g, &xp, &offs, &dc, pw);
            }
            if let Some(dx) = dx {
                let p = dx.at(bi * x_len);
                std::ptr::write_bytes(p, 0, x_len);
                direct::input_grad_image(
                    g,
                    &offs,
                    wt,
                    &dc,
                    &mut dxp,
                    std::slice::from_raw_parts_mut(p, x_len),
                );
            }
        }
        Partial {
            w: pw,
            b: self.wanted.b.then_some(db),
        }
    }

    /// im2col backward of `images`: the dense convolution-output gradient of
    /// one image at a time, then one GEMM per gradient.
    ///
    /// # Safety
    /// `dx` (when wanted) must be valid for these images, owned by the caller.
    #[inline(always)]
    unsafe fn im2col(&self, images: Range<usize>, dx: Option<OutPtr<T>>) -> Partial<T> {
        let g = &self.sg.conv;
        let (n, kdim) = (g.n(), g.kdim());
        let mut dc = Scratch::<T>::new(g.cout * n);
        let mut cols = Scratch::<T>::new(if g.is_pointwise() { 0 } else { kdim * n });
        let mut pw = (self.wanted.w && !images.is_empty()).then(|| vec![T::ZERO; g.cout * kdim]);
        let mut pb = self.wanted.b.then(|| vec![T::ZERO; g.cout]);
        for (i, bi) in images.enumerate() {
            self.dense_grad(i, &mut dc);
            if let Some(pb) = pb.as_mut() {
                for (acc, row) in pb.iter_mut().zip(dc.chunks_exact(n)) {
                    *acc += row.iter().fold(T::ZERO, |s, &v| s + v);
                }
            }
            let xb = &self.x[bi * g.x_image()..][..g.x_image()];
            if let Some(pw) = pw.as_mut() {
                let c: &[T] = if g.is_pointwise() {
                    xb
                } else {
                    im2col(g, xb, &mut cols);
                    &cols
                };
                matmul(
                    (g.cout, kdim, n),
                    pw.as_mut_ptr(),
                    true,
                    Mat::rows(&dc, n),
                    Mat::transposed(c, n),
                    Parallelism::None,
                );
            }
            if let Some(dx) = dx {
                conv::input_grad_image(g, self.w, &dc, dx, bi, Parallelism::None);
            }
        }
        Partial { w: pw, b: pb }
    }

    /// Winograd backward of `images`, `WINO_GROUP` images per set of GEMMs.
    ///
    /// # Safety
    /// As for [`ChunkGrad::im2col`].
    #[inline(always)]
    unsafe fn winograd(&self, images: Range<usize>, dx: Option<OutPtr<T>>) -> Partial<T> {
        let sg = self.sg;
        let wg = sg.wino();
        let (cin, cout, tiles, x_len) = (wg.cin, wg.cout, wg.tiles(), sg.conv.x_image());
        let group_max = WINO_GROUP.min(images.len());
        let (want_w, want_x) = (self.wanted.w, dx.is_some());
        let mut xp = Scratch::<T>::new(if want_w { wg.padded() } else { 0 });
        let mut buf = Scratch::<T>::new(wg.row_buf());
        let mut v = Scratch::<T>::new(if want_w {
            group_max * tiles * 16 * cin
        } else {
            0
        });
        let mut dm = Scratch::<T>::new(group_max * tiles * 16 * cout);
        let mut dv = Scratch::<T>::new(if want_x {
            group_max * tiles * 16 * cin
        } else {
            0
        });
        let mut dxpad = Scratch::<T>::new(if want_x { wg.padded() } else { 0 });
        let mut pu = (want_w && !images.is_empty()).then(|| vec![T::ZERO; 16 * cin * cout]);
        let mut db = vec![T::ZERO; cout];
        let first = images.start;
        let mut start = images.start;
        while start < images.end {
            let group = start..(start + WINO_GROUP).min(images.end);
            let rows = group.len() * tiles;
            for (k, bi) in group.clone().enumerate() {
                self.tile_grads(
                    bi - first,
                    &mut dm[k * tiles * 16 * cout..][..tiles * 16 * cout],
                    &mut db,
                );
                if want_w {
                    winograd::pad_channels_last(&wg, &self.x[bi * x_len..][..x_len], &mut xp);
                    winograd::input_transform(
                        &wg,
                        &xp,
                        &mut v[k * tiles * 16 * cin..][..tiles * 16 * cin],
                        &mut buf,
                    );
                }
            }
            if let Some(pu) = pu.as_mut() {
                for pt in 0..16 {
                    matmul_strided(
                        (cin, cout, rows),
                        pu.as_mut_ptr().add(pt * cin * cout),
                        cout,
                        true,
                        Mat::strided(v.as_ptr().add(pt * cin), 1, 16 * cin),
                        Mat::strided(dm.as_ptr().add(pt * cout), 16 * cout, 1),
                        Parallelism::None,
                    );
                }
            }
            if let (Some(dx), Some(u)) = (dx, self.u) {
                for pt in 0..16 {
                    matmul_strided(
                        (rows, cin, cout),
                        dv.as_mut_ptr().add(pt * cin),
                        16 * cin,
                        false,
                        Mat::strided(dm.as_ptr().add(pt * cout), 16 * cout, 1),
                        Mat::strided(u.as_ptr().add(pt * cin * cout), 1, cout),
                        Parallelism::None,
                    );
                }
                for (k, bi) in group.clone().enumerate() {
                    winograd::input_transform_adjoint(
                        &wg,
                        &dv[k * tiles * 16 * cin..][..tiles * 16 * cin],
                        &mut dxpad,
                        &mut buf,
                    );
                    winograd::crop_channels_first(&wg, &dxpad, dx.slots(bi * x_len, x_len));
                }
            }
            start = group.end;
        }
        Partial {
            w: pu,
            b: self.wanted.b.then_some(db),
        }
    }
}

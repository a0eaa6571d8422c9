//! A fused convolution stage on contiguous NCHW host slices:
//! `dropout(maxpool2x2(relu(conv(x, w) + b)))`, with the pooling and the
//! dropout optional, forward and backward.
//!
//! Fusing keeps the full-resolution convolution output out of candle's graph:
//! the forward pass pools each tile (or image) while it is still in cache and
//! remembers each window's winner in one byte; the backward pass rebuilds the
//! sparse gradient of the convolution output from those bytes one tile (or
//! image) at a time. candle would otherwise hold the big tensor, zero-fill a
//! gradient of its size and add into it.
//!
//! Two algorithms compute the convolution:
//! - [`Algo::Winograd`]: F(2x2, 3x3) (see [`crate::winograd`]) for 3x3 kernels
//!   with padding 1 over even-sized images, 16 GEMMs per group of images;
//! - [`Algo::Im2col`]: im2col and one GEMM per image, for everything else
//!   (and for few input channels, where the GEMMs of the Winograd method
//!   would be too thin to pay).
//!
//! Work is split into chunks of [`CHUNK`] images, run in parallel; each chunk
//! reduces its own partial weight and bias gradients and the partials are
//! summed in chunk order, so every result is the same for any thread count.

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::conv::{self, im2col, matmul, matmul_strided, ConvGeom, ConvGrads, Mat, Wanted};
use crate::dropout::Mask;
use crate::elem::{Elem, OutPtr, Output, Scratch};
use crate::winograd::{self, Wino};
use gemm::Parallelism;
use rayon::prelude::*;

/// Images per parallel task. Fixed, so that the order in which partial
/// gradients are summed does not depend on the thread count.
const CHUNK: usize = 8;

/// Images whose tiles share one set of Winograd GEMMs.
const WINO_GROUP: usize = 2;

/// The window code of a pooled output whose ReLU'd maximum is zero: no
/// gradient flows back through it (0..=3 name the winning cell otherwise).
pub(crate) const NO_GRAD: u8 = 4;

/// How the convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algo {
    Im2col,
    Winograd,
}

/// Whether [`Algo::Winograd`] can compute this convolution.
pub(crate) fn winograd_fits(g: &ConvGeom) -> bool {
    g.k == 3 && g.pad == 1 && g.h % 2 == 0 && g.w % 2 == 0 && g.h > 0 && g.w > 0
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
pub(crate) fn forward<T: Elem>(sg: &StageGeom, algo: Algo, x: &[T], w: &[T], b: &[T], mask: Option<&Mask>) -> StageOut<T> {
    let g = &sg.conv;
    let oi = sg.out_image();
    let mut out = Output::<T>::new(g.batch * oi);
    let mut arg = sg.pool.then(|| Output::<u8>::new(g.batch * oi));
    let (op, ap) = (out.ptr(), arg.as_mut().map(Output::ptr));
    let u = (algo == Algo::Winograd).then(|| winograd::transform_weights(&sg.wino(), w));
    for_chunks(g.batch, |images| {
        // SAFETY: each chunk writes only its own images' ranges of `out` and
        // `arg`, all of them, before the dropout below reads them back.
        unsafe {
            match &u {
                Some(u) => wino_forward(sg, x, u, b, images.clone(), op, ap),
                None => im2col_forward(sg, x, w, b, images.clone(), op, ap),
            }
            if let Some(mask) = mask {
                let (start, len) = (images.start * oi, images.len() * oi);
                let done = std::slice::from_raw_parts_mut(op.at(start), len);
                match ap {
                    // A dropped window passes no gradient either: its code
                    // says so, and the backward pass never redraws the mask.
                    Some(ap) => {
                        let codes = std::slice::from_raw_parts_mut(ap.at(start), len);
                        let scale = T::from_f64(mask.scale);
                        mask.for_each_kept(start, len, |k, kept| {
                            done[k] = done[k] * if kept { scale } else { T::ZERO };
                            codes[k] = if kept { codes[k] } else { NO_GRAD };
                        });
                    }
                    // An unpooled output is positive exactly where the ReLU
                    // passed and the mask kept it, which is all the backward
                    // pass needs.
                    None => mask.apply_in_place_at(start, done),
                }
            }
        }
    });
    // SAFETY: the chunks cover every image, and each wrote its ranges in full.
    unsafe {
        StageOut {
            out: out.finish(),
            arg: arg.map(|a| a.finish()),
        }
    }
}

/// Writes image `bi`'s output: pooled values and codes, or the ReLU output.
///
/// # Safety
/// `out` and `arg` must be valid for image `bi`'s range, owned by the caller.
unsafe fn write_pooled_planes<T: Elem>(sg: &StageGeom, y: &[T], bi: usize, out: OutPtr<T>, arg: Option<OutPtr<u8>>) {
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
                let (v, code) = pool4([top[2 * ox], top[2 * ox + 1], bottom[2 * ox], bottom[2 * ox + 1]]);
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
        matmul((g.cout, n, kdim), y.as_mut_ptr(), false, Mat::rows(w, kdim), Mat::rows(c, n), Parallelism::None);
        conv::epilogue(&mut y, n, Some(b), true);
        write_pooled_planes(sg, &y, bi, out, arg);
    }
}

/// The forward pass of `images` by Winograd's F(2x2, 3x3), `WINO_GROUP`
/// images per set of GEMMs; `u` holds the transformed weights.
///
/// # Safety
/// As for [`write_pooled_planes`], for every image of `images`.
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
    let mut y = Scratch::<T>::new(4 * cout);
    let mut start = images.start;
    while start < images.end {
        let group = start..(start + WINO_GROUP).min(images.end);
        for (k, bi) in group.clone().enumerate() {
            winograd::pad_channels_last(&wg, &x[bi * x_len..][..x_len], &mut xp);
            winograd::input_transform(&wg, &xp, &mut v[k * tiles * 16 * cin..][..tiles * 16 * cin], &mut tbuf);
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
            wino_output_image(sg, mk, b, &mut y, o, a);
        }
        start = group.end;
    }
}

/// The output transform, bias, ReLU and (optional) pooling of one image's
/// tiles `m [tiles][16][cout]` into its NCHW output.
fn wino_output_image<T: Elem>(
    sg: &StageGeom,
    m: &[T],
    b: &[T],
    y: &mut [T],
    out: &mut [MaybeUninit<T>],
    mut arg: Option<&mut [MaybeUninit<u8>]>,
) {
    let wg = sg.wino();
    let (cout, tw, tiles, w) = (wg.cout, wg.tw(), wg.tiles(), wg.w);
    let hw = wg.h * w;
    for ti in 0..wg.th() {
        for tj in 0..tw {
            let p = ti * tw + tj;
            winograd::output_tile(cout, &m[p * 16 * cout..][..16 * cout], b, y);
            let (y0, rest) = y.split_at(cout);
            let (y1, rest) = rest.split_at(cout);
            let (y2, y3) = rest.split_at(cout);
            match arg.as_deref_mut() {
                Some(a) => {
                    for c in 0..cout {
                        let (v, code) = pool4([y0[c], y1[c], y2[c], y3[c]]);
                        out[c * tiles + p].write(v);
                        a[c * tiles + p].write(code);
                    }
                }
                None => {
                    for c in 0..cout {
                        let base = c * hw + 2 * ti * w + 2 * tj;
                        out[base].write(y0[c]);
                        out[base + 1].write(y1[c]);
                        out[base + w].write(y2[c]);
                        out[base + w + 1].write(y3[c]);
                    }
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
    let u = (algo == Algo::Winograd && wanted.x).then(|| winograd::transform_weights(&wg, w));
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
        unsafe {
            match algo {
                Algo::Winograd => ctx.winograd(images, dxp),
                Algo::Im2col => ctx.im2col(images, dxp),
            }
        }
    });
    let mut total_w: Option<Vec<T>> = None;
    let mut total_b: Option<Vec<T>> = None;
    for p in partials {
        conv::sum_into(&mut total_w, p.w);
        conv::sum_into(&mut total_b, p.b);
    }
    let dw = wanted.w.then(|| match (algo, total_w) {
        (Algo::Winograd, Some(du)) => winograd::weight_grad(&wg, &du),
        (Algo::Im2col, Some(dw)) => dw,
        // An empty batch has no partials: its gradients are zero.
        (_, None) => vec![T::ZERO; g.cout * g.kdim()],
    });
    ConvGrads {
        // SAFETY: every chunk wrote its images' input gradients in full.
        x: dx.map(|d| unsafe { d.finish() }),
        w: dw,
        b: wanted.b.then(|| total_b.unwrap_or_else(|| vec![T::ZERO; g.cout])),
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

    /// The gradients of the chunk's `i`-th image's convolution output per
    /// Winograd tile, `[tiles][4][cout]` (the tile's 2x2 pixels in row-major
    /// order, channels last), into `dyt`, and their sums into `db`.
    fn tile_grads(&self, i: usize, dyt: &mut [T], db: Option<&mut [T]>) {
        let sg = self.sg;
        let wg = sg.wino();
        let (oi, cout, tiles, tw, w) = (sg.out_image(), wg.cout, wg.tiles(), wg.tw(), wg.w);
        let gs = &self.gs[i * oi..][..oi];
        let dyt = &mut dyt[..tiles * 4 * cout];
        let scale = self.scale;
        match self.arg {
            Some(arg) => {
                let arg = &arg[i * oi..][..oi];
                for c in 0..cout {
                    let (gc, ac) = (&gs[c * tiles..][..tiles], &arg[c * tiles..][..tiles]);
                    for p in 0..tiles {
                        let (gv, code) = (gc[p] * scale, ac[p]);
                        let d = &mut dyt[p * 4 * cout + c..];
                        for k in 0..4 {
                            d[k * cout] = if code == k as u8 { gv } else { T::ZERO };
                        }
                    }
                }
            }
            None => {
                let out = &self.out[i * oi..][..oi];
                let hw = wg.h * w;
                for c in 0..cout {
                    let (gc, oc) = (&gs[c * hw..][..hw], &out[c * hw..][..hw]);
                    for ti in 0..wg.th() {
                        for tj in 0..tw {
                            let d = &mut dyt[(ti * tw + tj) * 4 * cout + c..];
                            let base = 2 * ti * w + 2 * tj;
                            for (k, px) in [base, base + 1, base + w, base + w + 1].into_iter().enumerate() {
                                d[k * cout] = if oc[px] > T::ZERO { gc[px] * scale } else { T::ZERO };
                            }
                        }
                    }
                }
            }
        }
        if let Some(db) = db {
            for row in dyt.chunks_exact(cout) {
                for (acc, &v) in db.iter_mut().zip(row) {
                    *acc += v;
                }
            }
        }
    }

    /// im2col backward of `images`: the dense convolution-output gradient of
    /// one image at a time, then one GEMM per gradient.
    ///
    /// # Safety
    /// `dx` (when wanted) must be valid for these images, owned by the caller.
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
                matmul((g.cout, kdim, n), pw.as_mut_ptr(), true, Mat::rows(&dc, n), Mat::transposed(c, n), Parallelism::None);
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
    unsafe fn winograd(&self, images: Range<usize>, dx: Option<OutPtr<T>>) -> Partial<T> {
        let sg = self.sg;
        let wg = sg.wino();
        let (cin, cout, tiles, x_len) = (wg.cin, wg.cout, wg.tiles(), sg.conv.x_image());
        let group_max = WINO_GROUP.min(images.len());
        let (want_w, want_x) = (self.wanted.w, dx.is_some());
        let mut xp = Scratch::<T>::new(if want_w { wg.padded() } else { 0 });
        let mut buf = Scratch::<T>::new(wg.row_buf());
        let mut v = Scratch::<T>::new(if want_w { group_max * tiles * 16 * cin } else { 0 });
        let mut dm = Scratch::<T>::new(group_max * tiles * 16 * cout);
        let mut dv = Scratch::<T>::new(if want_x { group_max * tiles * 16 * cin } else { 0 });
        let mut dxpad = Scratch::<T>::new(if want_x { wg.padded() } else { 0 });
        let mut dy = Scratch::<T>::new(tiles * 4 * cout);
        let mut pu = (want_w && !images.is_empty()).then(|| vec![T::ZERO; 16 * cin * cout]);
        let mut pb = self.wanted.b.then(|| vec![T::ZERO; cout]);
        let first = images.start;
        let mut start = images.start;
        while start < images.end {
            let group = start..(start + WINO_GROUP).min(images.end);
            let rows = group.len() * tiles;
            for (k, bi) in group.clone().enumerate() {
                self.tile_grads(bi - first, &mut dy, pb.as_deref_mut());
                for p in 0..tiles {
                    winograd::output_tile_adjoint(cout, &dy[p * 4 * cout..][..4 * cout], &mut dm[(k * tiles + p) * 16 * cout..][..16 * cout]);
                }
                if want_w {
                    winograd::pad_channels_last(&wg, &self.x[bi * x_len..][..x_len], &mut xp);
                    winograd::input_transform(&wg, &xp, &mut v[k * tiles * 16 * cin..][..tiles * 16 * cin], &mut buf);
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
                    winograd::input_transform_adjoint(&wg, &dv[k * tiles * 16 * cin..][..tiles * 16 * cin], &mut dxpad, &mut buf);
                    winograd::crop_channels_first(&wg, &dxpad, dx.slots(bi * x_len, x_len));
                }
            }
            start = group.end;
        }
        Partial { w: pu, b: pb }
    }
}

//! The candle custom ops that put the host kernels of [`crate::conv`] and
//! [`crate::pool`] into candle's autograd graph.

use crate::conv::{self, ConvGeom, Wanted};
use crate::elem::Elem;
use crate::pool::{self, PoolGeom};
use crate::KernelError;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::OnceLock;

const CONV: &str = "conv2d";
const POOL: &str = "max_pool2x2";

/// The contiguous elements of a CPU storage under `layout`.
fn host_slice<'a, T: Elem>(
    s: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
    arg: &'static str,
) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or(KernelError::NotHostContiguous { op, arg })?;
    Ok(&data[start..end])
}

/// The contiguous elements of a storage that must live on the CPU.
fn storage_slice<'a, T: Elem>(
    s: &'a Storage,
    layout: &Layout,
    op: &'static str,
    arg: &'static str,
) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(s) => host_slice(s, layout, op, arg),
        _ => Err(KernelError::NotHostContiguous { op, arg }.into()),
    }
}

/// A host vector as a CPU tensor of `shape`, moved rather than copied.
fn host_tensor<T: Elem>(v: Vec<T>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// The convolution geometry of validated `x` and `w` dims.
pub(crate) fn conv_geom(x: &[usize], w: &[usize], pad: usize) -> ConvGeom {
    ConvGeom {
        batch: x[0],
        cin: x[1],
        h: x[2],
        w: x[3],
        cout: w[0],
        k: w[2],
        pad,
    }
}

/// The settings shared by the with- and without-bias convolution ops.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvOp {
    pub padding: usize,
    pub relu: bool,
    pub input_grad: bool,
}

impl ConvOp {
    fn name(&self) -> &'static str {
        if self.relu {
            "noprop-conv2d-relu"
        } else {
            "noprop-conv2d"
        }
    }

    fn fwd<T: Elem>(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = conv_geom(xl.dims(), wl.dims(), self.padding);
        let x = host_slice::<T>(xs, xl, CONV, "x")?;
        let w = host_slice::<T>(ws, wl, CONV, "w")?;
        let b = bias
            .map(|(bs, bl)| host_slice::<T>(bs, bl, CONV, "b"))
            .transpose()?;
        let out = conv::forward(&g, x, w, b, self.relu);
        let shape = Shape::from((g.batch, g.cout, g.ho(), g.wo()));
        Ok((T::to_cpu_storage_owned(out), shape))
    }

    fn cpu_fwd(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        match x.0.dtype() {
            DType::F32 => self.fwd::<f32>(x, w, b),
            DType::F64 => self.fwd::<f64>(x, w, b),
            dtype => Err(KernelError::UnsupportedDType { op: CONV, dtype }.into()),
        }
    }

    fn bwd_typed<T: Elem>(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        wanted: Wanted,
    ) -> Result<[Option<Tensor>; 3]> {
        let g = conv_geom(x.dims(), w.dims(), self.padding);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        // The fused ReLU's mask comes from its output.
        let res_guard = self.relu.then(|| res.storage_and_layout());
        let relu_out = match &res_guard {
            Some((rs, rl)) => Some(storage_slice::<T>(rs, rl, CONV, "output")?),
            None => None,
        };
        let grads = conv::backward(
            &g,
            storage_slice::<T>(&xs, xl, CONV, "x")?,
            storage_slice::<T>(&ws, wl, CONV, "w")?,
            relu_out,
            storage_slice::<T>(&gs, gl, CONV, "grad")?,
            wanted,
        );
        Ok([
            grads.x.map(|v| host_tensor(v, x.shape())).transpose()?,
            grads.w.map(|v| host_tensor(v, w.shape())).transpose()?,
            grads
                .b
                .map(|v| host_tensor(v, &Shape::from(g.cout)))
                .transpose()?,
        ])
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        // Only gradients that reach a tracked tensor are computed; the input
        // gradient additionally needs the caller's consent, since the first
        // layer's input is data.
        let wanted = Wanted {
            x: self.input_grad && x.track_op(),
            w: w.track_op(),
            b: b.is_some_and(Tensor::track_op),
        };
        // Gradients that arrive through broadcasts can have zero strides.
        let grad = grad.contiguous()?;
        match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, w, res, &grad, wanted),
            DType::F64 => self.bwd_typed::<f64>(x, w, res, &grad, wanted),
            dtype => Err(KernelError::UnsupportedDType { op: CONV, dtype }.into()),
        }
    }
}

/// `conv2d(x, w)` without bias, as a binary custom op.
pub(crate) struct ConvNoBias(pub ConvOp);

impl CustomOp2 for ConvNoBias {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = self.0.bwd(x, w, None, res, grad)?;
        Ok((dx, dw))
    }
}

/// `conv2d(x, w) + b`, as a ternary custom op.
pub(crate) struct ConvBias(pub ConvOp);

impl CustomOp3 for ConvBias {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd((xs, xl), (ws, wl), Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = self.0.bwd(x, w, Some(b), res, grad)?;
        Ok((dx, dw, db))
    }
}

/// 2x2 max-pooling whose forward pass remembers each window's winner, so the
/// backward pass routes the whole gradient there.
#[derive(Default)]
pub(crate) struct MaxPoolOp {
    argmax: OnceLock<Vec<u8>>,
}

impl MaxPoolOp {
    fn geom(dims: &[usize]) -> PoolGeom {
        PoolGeom {
            planes: dims[0] * dims[1],
            h: dims[2],
            w: dims[3],
        }
    }

    fn fwd<T: Elem>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let g = Self::geom(dims);
        let (out, argmax) = pool::forward(&g, host_slice::<T>(s, l, POOL, "x")?);
        // candle runs a custom op's forward once per op value, so the slot is
        // empty here; were it not, the winners would be the same anyway.
        let _ = self.argmax.set(argmax);
        let shape = Shape::from((dims[0], dims[1], g.ho(), g.wo()));
        Ok((T::to_cpu_storage_owned(out), shape))
    }

    fn bwd_typed<T: Elem>(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let g = Self::geom(x.dims());
        let (gs, gl) = grad.storage_and_layout();
        let grad_out = storage_slice::<T>(&gs, gl, POOL, "grad")?;
        let recomputed;
        let argmax = match self.argmax.get() {
            Some(a) => a,
            None => {
                let (xs, xl) = x.storage_and_layout();
                recomputed = pool::forward(&g, storage_slice::<T>(&xs, xl, POOL, "x")?).1;
                &recomputed
            }
        };
        host_tensor(pool::backward(&g, argmax, grad_out), x.shape())
    }
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "noprop-max-pool2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.fwd::<f32>(s, l),
            DType::F64 => self.fwd::<f64>(s, l),
            dtype => Err(KernelError::UnsupportedDType { op: POOL, dtype }.into()),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, &grad)?,
            DType::F64 => self.bwd_typed::<f64>(x, &grad)?,
            dtype => return Err(KernelError::UnsupportedDType { op: POOL, dtype }.into()),
        };
        Ok(Some(dx))
    }
}

const DROPOUT: &str = "dropout";

/// Inverted dropout with a counter-based mask; the backward pass redraws the
/// same mask from the seed instead of storing it.
pub(crate) struct DropoutOp(pub crate::dropout::Mask);

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "noprop-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(self.0.apply(host_slice::<f32>(s, l, DROPOUT, "x")?)),
            DType::F64 => CpuStorage::F64(self.0.apply(host_slice::<f64>(s, l, DROPOUT, "x")?)),
            dtype => return Err(KernelError::UnsupportedDType { op: DROPOUT, dtype }.into()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let dx = match grad.dtype() {
            DType::F32 => host_tensor(
                self.0
                    .apply(storage_slice::<f32>(&gs, gl, DROPOUT, "grad")?),
                x.shape(),
            )?,
            DType::F64 => host_tensor(
                self.0
                    .apply(storage_slice::<f64>(&gs, gl, DROPOUT, "grad")?),
                x.shape(),
            )?,
            dtype => return Err(KernelError::UnsupportedDType { op: DROPOUT, dtype }.into()),
        };
        Ok(Some(dx))
    }
}

const LINEAR: &str = "linear";

/// `x wᵀ + b` as a ternary custom op whose backward pass produces each
/// gradient with one GEMM (or one sum), in its argument's layout.
pub(crate) struct LinearOp;

impl LinearOp {
    fn geom(x: &[usize], w: &[usize]) -> crate::linear::LinearGeom {
        crate::linear::LinearGeom {
            batch: x[0],
            inp: x[1],
            out: w[0],
        }
    }

    fn fwd<T: Elem>(
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Self::geom(xl.dims(), wl.dims());
        let y = crate::linear::forward(
            &g,
            host_slice::<T>(xs, xl, LINEAR, "x")?,
            host_slice::<T>(ws, wl, LINEAR, "w")?,
            host_slice::<T>(bs, bl, LINEAR, "b")?,
        );
        Ok((T::to_cpu_storage_owned(y), Shape::from((g.batch, g.out))))
    }

    fn bwd_typed<T: Elem>(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Self::geom(x.dims(), w.dims());
        let (gs, gl) = grad.storage_and_layout();
        let gr = storage_slice::<T>(&gs, gl, LINEAR, "grad")?;
        let dx = if x.track_op() {
            let (ws, wl) = w.storage_and_layout();
            let dx = crate::linear::grad_x(&g, gr, storage_slice::<T>(&ws, wl, LINEAR, "w")?);
            Some(host_tensor(dx, x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let (xs, xl) = x.storage_and_layout();
            let dw = crate::linear::grad_w(&g, gr, storage_slice::<T>(&xs, xl, LINEAR, "x")?);
            Some(host_tensor(dw, w.shape())?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(host_tensor(crate::linear::grad_b(&g, gr), b.shape())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "noprop-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match xs.dtype() {
            DType::F32 => Self::fwd::<f32>(xs, xl, ws, wl, bs, bl),
            DType::F64 => Self::fwd::<f64>(xs, xl, ws, wl, bs, bl),
            dtype => Err(KernelError::UnsupportedDType { op: LINEAR, dtype }.into()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        match x.dtype() {
            DType::F32 => Self::bwd_typed::<f32>(x, w, b, &grad),
            DType::F64 => Self::bwd_typed::<f64>(x, w, b, &grad),
            dtype => Err(KernelError::UnsupportedDType { op: LINEAR, dtype }.into()),
        }
    }
}

const MATMUL: &str = "matmul";

/// `a · b` for 2-D operands in any strided layout, as a binary custom op
/// whose sums do not depend on the CPU model (see [`crate::matmul`]).
pub(crate) struct MatMulOp;

impl MatMulOp {
    fn fwd<T: Elem>(
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bad = || KernelError::MatMulShapes {
            a: al.dims().to_vec(),
            b: bl.dims().to_vec(),
        };
        let (&[m, k], &[k2, n]) = (al.dims(), bl.dims()) else {
            return Err(bad().into());
        };
        if k != k2 {
            return Err(bad().into());
        }
        let operand = |s: &CpuStorage, l: &Layout| -> Result<(*const T, usize, usize)> {
            let data = s.as_slice::<T>()?;
            let (rows, cols) = (l.dims()[0], l.dims()[1]);
            let (rs, cs) = (l.stride()[0], l.stride()[1]);
            if rows == 0 || cols == 0 {
                return Ok((data.as_ptr(), rs, cs));
            }
            // The last element the strides reach must lie inside the storage.
            let last = (rows - 1)
                .checked_mul(rs)
                .zip((cols - 1).checked_mul(cs))
                .and_then(|(r, c)| r.checked_add(c))
                .and_then(|rc| rc.checked_add(l.start_offset()));
            match last {
                Some(last) if last < data.len() => Ok((data[l.start_offset()..].as_ptr(), rs, cs)),
                _ => Err(bad().into()),
            }
        };
        let (a, b) = (operand(a, al)?, operand(b, bl)?);
        // SAFETY: both operands were checked to lie inside their storage.
        let y = unsafe { crate::linear::product::<T>((m, n, k), a, b) };
        Ok((T::to_cpu_storage_owned(y), Shape::from((m, n))))
    }
}

impl CustomOp2 for MatMulOp {
    fn name(&self) -> &'static str {
        "noprop-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match a.dtype() {
            DType::F32 => Self::fwd::<f32>(a, al, b, bl),
            DType::F64 => Self::fwd::<f64>(a, al, b, bl),
            dtype => Err(KernelError::UnsupportedDType { op: MATMUL, dtype }.into()),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let da = if a.track_op() {
            Some(crate::matmul(grad, &b.t()?)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(crate::matmul(&a.t()?, grad)?)
        } else {
            None
        };
        Ok((da, db))
    }
}

const STAGE: &str = "conv_stage";

/// The fused `dropout(maxpool(relu(conv(x, w) + b)))` stage as a ternary
/// custom op. The forward pass keeps each pooling window's code for the
/// backward pass, which redraws the dropout mask from its seed.
pub(crate) struct ConvStageOp {
    pub padding: usize,
    pub pool: bool,
    pub input_grad: bool,
    pub algo: crate::stage::Algo,
    pub mask: Option<crate::dropout::Mask>,
    pub arg: OnceLock<Vec<u8>>,
}

impl ConvStageOp {
    fn geom(&self, x: &[usize], w: &[usize]) -> crate::stage::StageGeom {
        crate::stage::StageGeom {
            conv: conv_geom(x, w, self.padding),
            pool: self.pool,
        }
    }

    fn fwd<T: Elem>(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        (bs, bl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let sg = self.geom(xl.dims(), wl.dims());
        let r = crate::stage::forward(
            &sg,
            self.algo,
            host_slice::<T>(xs, xl, STAGE, "x")?,
            host_slice::<T>(ws, wl, STAGE, "w")?,
            host_slice::<T>(bs, bl, STAGE, "b")?,
            self.mask.as_ref(),
        );
        if let Some(arg) = r.arg {
            // candle runs a custom op's forward once per op value.
            let _ = self.arg.set(arg);
        }
        let shape = Shape::from((sg.conv.batch, sg.conv.cout, sg.oh(), sg.ow()));
        Ok((T::to_cpu_storage_owned(r.out), shape))
    }

    fn bwd_typed<T: Elem>(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        wanted: Wanted,
    ) -> Result<[Option<Tensor>; 3]> {
        let sg = self.geom(x.dims(), w.dims());
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let xv = storage_slice::<T>(&xs, xl, STAGE, "x")?;
        let wv = storage_slice::<T>(&ws, wl, STAGE, "w")?;
        let arg = match (self.pool, self.arg.get()) {
            (false, _) => None,
            (true, Some(a)) => Some(a.as_slice()),
            // candle always runs an op's forward pass before its backward.
            (true, None) => return Err(KernelError::MissingForward { op: STAGE }.into()),
        };
        let grads = crate::stage::backward(
            &sg,
            self.algo,
            xv,
            wv,
            storage_slice::<T>(&rs, rl, STAGE, "output")?,
            arg,
            self.mask.as_ref(),
            storage_slice::<T>(&gs, gl, STAGE, "grad")?,
            wanted,
        );
        Ok([
            grads.x.map(|v| host_tensor(v, x.shape())).transpose()?,
            grads.w.map(|v| host_tensor(v, w.shape())).transpose()?,
            grads
                .b
                .map(|v| host_tensor(v, &Shape::from(sg.conv.cout)))
                .transpose()?,
        ])
    }
}

impl CustomOp3 for ConvStageOp {
    fn name(&self) -> &'static str {
        "noprop-conv-stage"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match xs.dtype() {
            DType::F32 => self.fwd::<f32>((xs, xl), (ws, wl), (bs, bl)),
            DType::F64 => self.fwd::<f64>((xs, xl), (ws, wl), (bs, bl)),
            dtype => Err(KernelError::UnsupportedDType { op: STAGE, dtype }.into()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wanted = Wanted {
            x: self.input_grad && x.track_op(),
            w: w.track_op(),
            b: b.track_op(),
        };
        let grad = grad.contiguous()?;
        let [dx, dw, db] = match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, w, res, &grad, wanted)?,
            DType::F64 => self.bwd_typed::<f64>(x, w, res, &grad, wanted)?,
            dtype => return Err(KernelError::UnsupportedDType { op: STAGE, dtype }.into()),
        };
        Ok((dx, dw, db))
    }
}

const BN: &str = "batch_norm1d";

/// Training-mode BatchNorm1d as a ternary custom op over `(x, gamma, beta)`.
/// The forward pass hands the batch statistics to its caller through
/// `stats` (for the running averages); the backward pass recomputes them
/// from `x`, which gives the same values.
pub(crate) struct BatchNormOp {
    pub eps: f64,
    pub stats: std::sync::Arc<OnceLock<(Vec<f64>, Vec<f64>)>>,
}

impl BatchNormOp {
    fn geom(x: &[usize]) -> crate::bn::BnGeom {
        crate::bn::BnGeom {
            batch: x[0],
            features: x[1],
        }
    }

    fn fwd<T: Elem>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Self::geom(xl.dims());
        let x = host_slice::<T>(xs, xl, BN, "x")?;
        let (mean, var) = crate::bn::stats(&g, x);
        let istd = crate::bn::inv_std(&var, self.eps);
        let y = crate::bn::forward(
            &g,
            x,
            host_slice::<T>(ws, wl, BN, "weight")?,
            host_slice::<T>(bs, bl, BN, "bias")?,
            &mean,
            &istd,
        );
        let to64 = |v: &[T]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
        let _ = self.stats.set((to64(&mean), to64(&var)));
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }

    fn bwd_typed<T: Elem>(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Self::geom(x.dims());
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let xv = storage_slice::<T>(&xs, xl, BN, "x")?;
        let (mean, var) = crate::bn::stats(&g, xv);
        let istd = crate::bn::inv_std(&var, self.eps);
        let wanted = crate::bn::BnWanted {
            x: x.track_op(),
            gamma: w.track_op(),
            beta: b.track_op(),
        };
        let r = crate::bn::backward(
            &g,
            xv,
            storage_slice::<T>(&ws, wl, BN, "weight")?,
            &mean,
            &istd,
            storage_slice::<T>(&gs, gl, BN, "grad")?,
            wanted,
        );
        Ok((
            r.x.map(|v| host_tensor(v, x.shape())).transpose()?,
            r.gamma.map(|v| host_tensor(v, w.shape())).transpose()?,
            r.beta.map(|v| host_tensor(v, b.shape())).transpose()?,
        ))
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "noprop-batch-norm1d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match xs.dtype() {
            DType::F32 => self.fwd::<f32>(xs, xl, ws, wl, bs, bl),
            DType::F64 => self.fwd::<f64>(xs, xl, ws, wl, bs, bl),
            dtype => Err(KernelError::UnsupportedDType { op: BN, dtype }.into()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, w, b, &grad),
            DType::F64 => self.bwd_typed::<f64>(x, w, b, &grad),
            dtype => Err(KernelError::UnsupportedDType { op: BN, dtype }.into()),
        }
    }
}

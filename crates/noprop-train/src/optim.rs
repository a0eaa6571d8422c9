//! AdamW with its state exposed, so that checkpoints can save and restore it
//! and a resumed run continues exactly where it stopped.
//!
//! On the CPU an `f32` parameter is updated in one fused pass that reads the
//! gradient once and rewrites the parameter and both moments in place (the
//! moments then live in host vectors). The tensor-op formulation, kept for
//! other devices and dtypes and as the oracle in tests, allocates a fresh
//! tensor for each of its nine ops, which for the 1.6M-weight Linear of the
//! image path costs more than the arithmetic. Both paths round identically:
//! the fused loop performs the same `f32` operations in the same order
//! (candle's scalar ops are `x * a + b` in the tensor's dtype).

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{
    backprop::GradStore, CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var,
};
use rayon::prelude::*;

/// AdamW hyperparameters (PyTorch's defaults for the betas and eps).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
}

impl AdamWParams {
    /// The given learning rate and weight decay with betas (0.9, 0.999) and eps 1e-8.
    pub fn new(lr: f64, weight_decay: f64) -> Self {
        Self {
            lr,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Where a parameter's moments live.
enum Moments {
    /// A contiguous `f32` parameter on the CPU: host vectors in the
    /// parameter's row-major order, updated in place by [`FusedStep`].
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Anything else: tensors, updated by candle ops.
    Tensors { m: Tensor, v: Tensor },
}

struct Slot {
    name: String,
    var: Var,
    moments: Moments,
    /// This parameter's learning rate, where it differs from the optimizer's.
    lr: Option<f64>,
}

/// Whether `var` takes the fused host update.
fn fused_for(var: &Var, fused: bool) -> bool {
    fused && var.device().is_cpu() && var.dtype() == DType::F32 && var.as_tensor().is_contiguous()
}

/// AdamW (Loshchilov and Hutter), as PyTorch's `torch.optim.AdamW`: the decay
/// multiplies the parameter by `1 - lr * wd` before the Adam step. A
/// parameter without a gradient in a step is left alone (no decay either).
pub struct AdamW {
    params: AdamWParams,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// An optimizer over named variables (sorted by name for a stable order).
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> candle_core::Result<Self> {
        Self::with_fused(vars, params, true)
    }

    /// [`AdamW::new`] that never takes the fused host update: every parameter
    /// is updated with candle tensor ops (the reference in tests).
    pub fn unfused(vars: Vec<(String, Var)>, params: AdamWParams) -> candle_core::Result<Self> {
        Self::with_fused(vars, params, false)
    }

    fn with_fused(
        mut vars: Vec<(String, Var)>,
        params: AdamWParams,
        fused: bool,
    ) -> candle_core::Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let moments = if fused_for(&var, fused) {
                    let n = var.elem_count();
                    Moments::Host {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    Moments::Tensors {
                        m: var.zeros_like()?,
                        v: var.zeros_like()?,
                    }
                };
                Ok(Slot {
                    name,
                    var,
                    moments,
                    lr: None,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            slots,
            step: 0,
        })
    }

    /// Gives the parameter `name` its own learning rate (its decoupled decay
    /// scales with it, as in a PyTorch parameter group; 0 freezes it).
    /// Returns whether the optimizer holds a parameter of that name.
    pub fn set_lr(&mut self, name: &str, lr: f64) -> bool {
        self.set_lr_where(|s| s.name == name, lr)
    }

    /// As [`Self::set_lr`], for the parameter that is `var` itself (the same
    /// tensor, whatever its name). Returns whether the optimizer holds it.
    pub fn set_lr_of(&mut self, var: &Tensor, lr: f64) -> bool {
        self.set_lr_where(|s| s.var.as_tensor().id() == var.id(), lr)
    }

    fn set_lr_where(&mut self, is: impl Fn(&Slot) -> bool, lr: f64) -> bool {
        self.slots
            .iter_mut()
            .filter(|s| is(s))
            .map(|s| s.lr = Some(lr))
            .count()
            > 0
    }

    /// The variables, in their (name) order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// The number of steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update from the gradients in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for slot in self.slots.iter_mut() {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let p = AdamWParams {
                lr: slot.lr.unwrap_or(p.lr),
                ..p
            };
            let step_size = p.lr / bc1;
            let coeffs = Coeffs {
                beta1: p.beta1 as f32,
                one_minus_beta1: (1.0 - p.beta1) as f32,
                beta2: p.beta2 as f32,
                one_minus_beta2: (1.0 - p.beta2) as f32,
                inv_bc2: (1.0 / bc2) as f32,
                eps: p.eps as f32,
                decay: (1.0 - p.lr * p.weight_decay) as f32,
                step_size: step_size as f32,
            };
            match &mut slot.moments {
                Moments::Host { m, v } if g.device().is_cpu() && g.dtype() == DType::F32 => {
                    let g = g.contiguous()?;
                    let op = FusedStep {
                        m: Mutex::new(m),
                        v: Mutex::new(v),
                        c: coeffs,
                    };
                    slot.var.as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Host { m, v } => {
                    // A gradient of another dtype or device than the parameter:
                    // let candle convert and complain as the tensor path would.
                    let shape = slot.var.shape().clone();
                    let mt = Tensor::from_slice(m, shape.clone(), &Device::Cpu)?;
                    let vt = Tensor::from_slice(v, shape, &Device::Cpu)?;
                    let (mt, vt) = tensor_step(&slot.var, g, &mt, &vt, &p, bc2, step_size)?;
                    *m = mt.flatten_all()?.to_vec1()?;
                    *v = vt.flatten_all()?.to_vec1()?;
                }
                Moments::Tensors { m, v } => {
                    let (mn, vn) = tensor_step(&slot.var, g, m, v, &p, bc2, step_size)?;
                    *m = mn;
                    *v = vn;
                }
            }
        }
        Ok(())
    }

    /// The moments under `{prefix}{name}.m` / `.v`, as tensors of the
    /// parameter's shape that later steps do not change.
    pub fn state(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            let (m, v) = match &s.moments {
                Moments::Tensors { m, v } => (m.clone(), v.clone()),
                Moments::Host { m, v } => {
                    let host = |x: &Vec<f32>| {
                        Tensor::from_slice(x, s.var.shape().clone(), &Device::Cpu)
                            .expect("a host vector has its parameter's element count")
                    };
                    (host(m), host(v))
                }
            };
            out.insert(format!("{prefix}{}.m", s.name), m);
            out.insert(format!("{prefix}{}.v", s.name), v);
        }
        out
    }

    /// Each moment of [`AdamW::state`] (same names, no prefix) that holds
    /// NaN or infinite values, with how many; host moments are scanned in
    /// place, without the copy `state` makes.
    pub fn non_finite(&self) -> candle_core::Result<Vec<(String, usize)>> {
        let count = |x: &[f32]| x.iter().filter(|v| !v.is_finite()).count();
        let mut out = Vec::new();
        for s in &self.slots {
            let (m, v) = match &s.moments {
                Moments::Host { m, v } => (count(m), count(v)),
                Moments::Tensors { m, v } => {
                    let host = |t: &Tensor| -> candle_core::Result<usize> {
                        Ok(count(
                            &t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                        ))
                    };
                    (host(m)?, host(v)?)
                }
            };
            for (suffix, n) in [("m", m), ("v", v)] {
                if n > 0 {
                    out.push((format!("{}.{suffix}", s.name), n));
                }
            }
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state`] with the same prefix, and the step count.
    pub fn load_state(
        &mut self,
        prefix: &str,
        tensors: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<(), String> {
        for s in self.slots.iter_mut() {
            let mut loaded = Vec::with_capacity(2);
            for suffix in ["m", "v"] {
                let key = format!("{prefix}{}.{suffix}", s.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| format!("optimizer state {key} is missing"))?;
                if t.dims() != s.var.dims() {
                    return Err(format!(
                        "optimizer state {key} has shape {:?}, expected {:?}",
                        t.dims(),
                        s.var.dims()
                    ));
                }
                loaded.push(t);
            }
            match &mut s.moments {
                Moments::Host { m, v } => {
                    for (dst, t) in [m, v].into_iter().zip(loaded) {
                        *dst = t
                            .to_dtype(DType::F32)
                            .and_then(|t| t.flatten_all())
                            .and_then(|t| t.to_vec1::<f32>())
                            .map_err(|e| e.to_string())?;
                    }
                }
                Moments::Tensors { m, v } => {
                    for (dst, t) in [m, v].into_iter().zip(loaded) {
                        *dst = t
                            .to_dtype(s.var.dtype())
                            .and_then(|t| t.to_device(s.var.device()))
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The update with candle tensor ops; returns the new moments and sets the
/// parameter.
fn tensor_step(
    var: &Var,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    p: &AdamWParams,
    bc2: f64,
    step_size: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let m = ((m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
    let v = ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
    let denom = ((&v / bc2)?.sqrt()? + p.eps)?;
    let decayed = (var.as_tensor() * (1.0 - p.lr * p.weight_decay))?;
    let next = (decayed - ((&m / denom)? * step_size)?)?;
    var.set(&next)?;
    Ok((m, v))
}

/// One step's coefficients, rounded to `f32` exactly as candle's scalar ops
/// round them.
#[derive(Debug, Clone, Copy)]
struct Coeffs {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_bc2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
}

impl Coeffs {
    /// Updates one chunk. Each line mirrors one op of [`tensor_step`]; the
    /// `+ 0.0` terms are the additive halves of candle's affine ops, kept so
    /// that a negative zero rounds the same way.
    #[inline(always)]
    fn apply(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let mn = (*m * self.beta1 + 0.0) + (g * self.one_minus_beta1 + 0.0);
            let vn = (*v * self.beta2 + 0.0) + ((g * g) * self.one_minus_beta2 + 0.0);
            let denom = ((vn * self.inv_bc2 + 0.0).sqrt() * 1.0) + self.eps;
            let decayed = *p * self.decay + 0.0;
            *p = decayed - ((mn / denom) * self.step_size + 0.0);
            *m = mn;
            *v = vn;
        }
    }
}

/// The fused in-place update of one `f32` parameter and its host moments.
struct FusedStep<'a> {
    m: Mutex<&'a mut Vec<f32>>,
    v: Mutex<&'a mut Vec<f32>>,
    c: Coeffs,
}

/// Elements per parallel task: large enough to amortise scheduling, small
/// enough that the big Linear weight spreads over all threads.
const CHUNK: usize = 32 * 1024;

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "noprop-adamw-step"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (ps, gs) else {
            candle_core::bail!("noprop-adamw-step: the parameter and its gradient must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (pl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!(
                "noprop-adamw-step: the parameter and its gradient must be contiguous"
            );
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut m = self
            .m
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned moment lock".into()))?;
        let mut v = self
            .v
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned moment lock".into()))?;
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!(
                "noprop-adamw-step: {} parameters but {} gradients, {} and {} moments",
                p.len(),
                g.len(),
                m.len(),
                v.len()
            );
        }
        let c = self.c;
        if p.len() <= CHUNK {
            c.apply(p, &mut m[..], &mut v[..], g);
        } else {
            // Elementwise, so the result does not depend on how chunks are scheduled.
            p.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((p, m), v), g)| c.apply(p, m, v, g));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(seed: u32, dims: &[usize]) -> Var {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 1000) as f32 / 500.0 - 1.0
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap()).unwrap()
    }

    /// A NaN or infinity in a saved moment is found by name and count, in
    /// host moments (scanned in place) as in tensor ones.
    #[test]
    fn non_finite_moments_are_named() {
        let vars = vec![
            ("a".to_string(), var(1, &[4])),
            ("b".to_string(), var(2, &[2, 3])),
        ];
        let mut opt = AdamW::new(vars, AdamWParams::new(1e-3, 0.0)).unwrap();
        assert!(opt.non_finite().unwrap().is_empty());
        let mut state = opt.state("");
        let bad = Tensor::from_vec(
            vec![0.0f32, f32::NAN, 1.0, f32::INFINITY, 2.0, 3.0],
            (2, 3),
            &Device::Cpu,
        )
        .unwrap();
        state.insert("b.v".into(), bad);
        opt.load_state("", &state, 1).unwrap();
        assert_eq!(opt.non_finite().unwrap(), vec![("b.v".to_string(), 2)]);
    }

    /// Two identical parameter sets, one per optimizer, and a few steps on
    /// the same gradients: the fused update must match the tensor ops bit
    /// for bit, and the saved state must match too.
    #[test]
    fn fused_matches_tensor_ops_bit_for_bit() {
        // The large shape takes the parallel path.
        let shapes: [&[usize]; 3] = [&[3, 5], &[7], &[300, 250]];
        let make = || -> Vec<(String, Var)> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("p{i}"), var(i as u32, d)))
                .collect()
        };
        let (a, b) = (make(), make());
        let params = AdamWParams::new(1e-2, 1e-3);
        let mut fused = AdamW::new(a.clone(), params).unwrap();
        let mut plain = AdamW::unfused(b.clone(), params).unwrap();
        for step in 0..5u32 {
            for (vars, opt) in [(&a, &mut fused), (&b, &mut plain)] {
                // A loss whose gradient differs per element and per step.
                let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
                for (i, (_, v)) in vars.iter().enumerate() {
                    let w = var(step * 10 + i as u32 + 1, v.dims());
                    let term = (v.as_tensor().sqr().unwrap() * w.as_tensor())
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    loss = (loss + term).unwrap();
                }
                let grads = loss.backward().unwrap();
                opt.step(&grads).unwrap();
            }
            for ((_, x), (_, y)) in a.iter().zip(&b) {
                let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                assert!(
                    x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "step {step}"
                );
            }
        }
        let (sf, sp) = (fused.state("o."), plain.state("o."));
        assert_eq!(sf.keys().collect::<Vec<_>>(), sp.keys().collect::<Vec<_>>());
        for (k, t) in &sf {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = sp[k].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(t.dims(), sp[k].dims());
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{k}"
            );
        }
    }

    /// Saving and loading the fused state round-trips exactly, and later steps
    /// do not change a state already taken.
    #[test]
    fn fused_state_round_trips() {
        let vars = vec![("w".to_string(), var(1, &[40, 3]))];
        let mut opt = AdamW::new(vars.clone(), AdamWParams::new(1e-2, 0.0)).unwrap();
        let grads = vars[0]
            .1
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads).unwrap();
        let saved = opt.state("");
        let before: Vec<f32> = saved["w.m"].flatten_all().unwrap().to_vec1().unwrap();
        opt.step(&grads).unwrap();
        let after: Vec<f32> = saved["w.m"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(before, after);
        let mut other = AdamW::new(vars, AdamWParams::new(1e-2, 0.0)).unwrap();
        other.load_state("", &saved, 1).unwrap();
        let again = other.state("");
        for k in ["w.m", "w.v"] {
            let x: Vec<f32> = saved[k].flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = again[k].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(x, y);
        }
        assert_eq!(other.steps(), 1);
    }

    /// A parameter given its own rate by `set_lr` moves exactly as under an
    /// optimizer built with that rate, on the fused and the tensor path, while
    /// the others keep the optimizer's rate; rate 0 leaves it untouched.
    #[test]
    fn a_parameter_can_have_its_own_learning_rate() {
        let grads_for = |vars: &[(String, Var)]| {
            let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
            for (_, v) in vars {
                // The weights depend on the parameter's shape only, so each
                // parameter gets the same gradient alone or beside the other.
                let w = var(v.elem_count() as u32, v.dims());
                loss = (loss
                    + (v.as_tensor().sqr().unwrap() * w.as_tensor())
                        .unwrap()
                        .sum_all()
                        .unwrap())
                .unwrap();
            }
            loss.backward().unwrap()
        };
        let values = |v: &Var| -> Vec<f32> { v.flatten_all().unwrap().to_vec1().unwrap() };
        for fused in [true, false] {
            let build = |vars: Vec<(String, Var)>, lr: f64| {
                let p = AdamWParams::new(lr, 1e-2);
                if fused {
                    AdamW::new(vars, p)
                } else {
                    AdamW::unfused(vars, p)
                }
                .unwrap()
            };
            for own in [3e-3, 0.0] {
                let mixed = vec![
                    ("a".to_string(), var(1, &[4, 5])),
                    ("embed".to_string(), var(2, &[3, 6])),
                ];
                let start = values(&mixed[1].1);
                let mut opt = build(mixed.clone(), 1e-2);
                assert!(opt.set_lr("embed", own));
                assert!(!opt.set_lr("missing", own));
                let single_a = vec![("a".to_string(), var(1, &[4, 5]))];
                let single_e = vec![("embed".to_string(), var(2, &[3, 6]))];
                let (mut opt_a, mut opt_e) =
                    (build(single_a.clone(), 1e-2), build(single_e.clone(), own));
                for _ in 0..3 {
                    opt.step(&grads_for(&mixed)).unwrap();
                    opt_a.step(&grads_for(&single_a)).unwrap();
                    opt_e.step(&grads_for(&single_e)).unwrap();
                }
                assert_eq!(
                    values(&mixed[0].1),
                    values(&single_a[0].1),
                    "fused {fused}, lr {own}"
                );
                assert_eq!(
                    values(&mixed[1].1),
                    values(&single_e[0].1),
                    "fused {fused}, lr {own}"
                );
                if own == 0.0 {
                    assert_eq!(values(&mixed[1].1), start, "rate 0 freezes");
                } else {
                    assert_ne!(values(&mixed[1].1), start);
                }
            }
        }
    }
}

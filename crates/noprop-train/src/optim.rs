//! AdamW with its state exposed, so that checkpoints can save and restore it
//! and a resumed run continues exactly where it stopped.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor, Var};

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
        Self { lr, weight_decay, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
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
    pub fn new(mut vars: Vec<(String, Var)>, params: AdamWParams) -> candle_core::Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.zeros_like()?;
                let v = var.zeros_like()?;
                Ok(Slot { name, var, m, v })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { params, slots, step: 0 })
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
        let step_size = p.lr / bc1;
        for slot in self.slots.iter_mut() {
            let Some(g) = grads.get(slot.var.as_tensor()) else { continue };
            let m = ((&slot.m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&slot.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + p.eps)?;
            let decayed = (slot.var.as_tensor() * (1.0 - p.lr * p.weight_decay))?;
            let next = (decayed - ((&m / denom)? * step_size)?)?;
            slot.var.set(&next)?;
            slot.m = m;
            slot.v = v;
        }
        Ok(())
    }

    /// The moments under `{prefix}{name}.m` / `.v`.
    pub fn state(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.insert(format!("{prefix}{}.m", s.name), s.m.clone());
            out.insert(format!("{prefix}{}.v", s.name), s.v.clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] with the same prefix, and the step count.
    pub fn load_state(&mut self, prefix: &str, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<(), String> {
        for s in self.slots.iter_mut() {
            for (suffix, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}{}.{suffix}", s.name);
                let t = tensors.get(&key).ok_or_else(|| format!("optimizer state {key} is missing"))?;
                if t.dims() != s.var.dims() {
                    return Err(format!("optimizer state {key} has shape {:?}, expected {:?}", t.dims(), s.var.dims()));
                }
                *dst = t
                    .to_dtype(s.var.dtype())
                    .and_then(|t| t.to_device(s.var.device()))
                    .map_err(|e| e.to_string())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

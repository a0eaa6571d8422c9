//! Seeded parameter initialisation behind candle-nn's `VarBuilder`.
//!
//! candle's own initialisers draw from the device RNG, which cannot be seeded
//! on CPU. [`seeded_var_builder`] returns a `VarBuilder` whose backend creates
//! each missing variable from a host ChaCha stream, in the order the model's
//! constructor asks for them, and records it in a `VarMap`. Building the same
//! model with the same seed therefore gives bit-identical parameters.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder, VarMap};
use noprop_core::NoiseRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

struct SeededBackend {
    map: VarMap,
    rng: Mutex<NoiseRng>,
}

fn fan_in(shape: &Shape) -> usize {
    // [out, in, k, k] or [out, in]: fan-in is everything after the first dim.
    shape.dims().iter().skip(1).product::<usize>().max(1)
}

impl SeededBackend {
    fn init(
        &self,
        shape: &Shape,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let mut guard = self
            .rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("init RNG poisoned".into()))?;
        let rng = guard.rng_mut();
        let values: Vec<f64> = match init {
            Init::Const(v) => vec![v; n],
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up)).collect(),
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| {
                    mean + stdev
                        * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng)
                })
                .collect(),
            Init::Kaiming {
                dist,
                non_linearity,
                ..
            } => {
                let std = non_linearity.gain() / (fan_in(shape) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                    }
                    candle_nn::init::NormalOrUniform::Normal => (0..n)
                        .map(|_| {
                            std * <StandardNormal as Distribution<f64>>::sample(
                                &StandardNormal,
                                rng,
                            )
                        })
                        .collect(),
                }
            }
        };
        Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)
    }
}

impl SimpleBackend for SeededBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap poisoned".into()))?;
        if let Some(var) = data.get(name) {
            let t = var.as_tensor();
            if t.shape() != &s {
                candle_core::bail!(
                    "parameter {name} exists with shape {:?}, asked for {:?}",
                    t.dims(),
                    s.dims()
                );
            }
            return Ok(t.clone());
        }
        let var = Var::from_tensor(&self.init(&s, h, dtype, dev)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap poisoned".into()))?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no parameter named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// A `VarBuilder` that creates missing variables in `map` from a host RNG seeded with `seed`.
pub fn seeded_var_builder(
    map: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededBackend {
        map: map.clone(),
        rng: Mutex::new(NoiseRng::new(seed)),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

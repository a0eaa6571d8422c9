//! Helpers shared by the integration tests: seeded inputs and tolerances.

#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A tensor of independent uniform values in `[-1, 1)` from a seeded host RNG
/// (candle's own CPU seeding does not work, huggingface/candle#2651).
pub fn uniform(seed: u64, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let len = dims.iter().product();
    let v: Vec<f64> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// Absolute plus relative tolerance, as `|a - b| <= abs + rel * |b|`.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
}

/// Single-precision kernels summing a few hundred products in a different
/// order than candle's.
pub const F32: Tolerance = Tolerance {
    abs: 1e-4,
    rel: 1e-4,
};

/// Central differences in f64 with a step of 1e-6 on well-scaled inputs.
pub const FINITE_DIFF: Tolerance = Tolerance {
    abs: 1e-6,
    rel: 1e-6,
};

/// Panics with the worst offending index unless `got` and `want` have the
/// same shape and agree within `tol`.
pub fn assert_close(got: &Tensor, want: &Tensor, tol: Tolerance, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let flat = |t: &Tensor| -> Vec<f64> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1())
            .unwrap_or_else(|e| panic!("{what}: cannot read tensor: {e}"))
    };
    let (g, w) = (flat(got), flat(want));
    let worst = g
        .iter()
        .zip(&w)
        .enumerate()
        .map(|(i, (a, b))| (i, (a - b).abs() - tol.abs - tol.rel * b.abs(), *a, *b))
        .max_by(|x, y| x.1.total_cmp(&y.1));
    if let Some((i, excess, a, b)) = worst {
        assert!(
            excess <= 0.0 && !excess.is_nan(),
            "{what}: element {i} is {a}, expected {b} (tolerance {tol:?})"
        );
    }
}

/// The gradient of the scalar `f` at `at` by central differences with step
/// `eps`, one element at a time.
pub fn numeric_grad(f: impl Fn(&Tensor) -> Result<f64>, at: &Tensor, eps: f64) -> Result<Tensor> {
    let base: Vec<f64> = at.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let mut grad = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut probe = base.clone();
        probe[i] = base[i] + eps;
        let up = f(&Tensor::from_vec(probe.clone(), at.shape(), &Device::Cpu)?)?;
        probe[i] = base[i] - eps;
        let down = f(&Tensor::from_vec(probe, at.shape(), &Device::Cpu)?)?;
        grad.push((up - down) / (2.0 * eps));
    }
    Tensor::from_vec(grad, at.shape(), &Device::Cpu)
}

/// `sum(y * r)`: a scalar whose gradient with respect to `y` is the fixed
/// random tensor `r`, so every output element matters with its own weight.
pub fn weighted_sum(y: &Tensor, r: &Tensor) -> Result<Tensor> {
    (y * r)?.sum_all()
}

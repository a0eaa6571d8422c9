//! Seeded host randomness.
//!
//! candle's CPU backend ignores `Device::set_seed` (huggingface/candle#2651),
//! so every random number in NoProp is drawn on the host from a ChaCha stream
//! and then copied to the device. One user-facing `seed` fans out into
//! independent sub-streams (initialisation, shuffling, noise, ...) through
//! [`sub_seed`], so adding draws to one stream never shifts another.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::CoreError;

/// Derives a sub-seed from a root seed and a path of integers
/// (for example `[STREAM_NOISE, epoch, block]`), by SplitMix64 mixing.
pub fn sub_seed(seed: u64, path: &[u64]) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    path.iter().fold(mix(seed), |acc, &p| mix(acc ^ mix(p)))
}

/// A seeded random stream that makes tensors on any device.
#[derive(Debug, Clone)]
pub struct NoiseRng {
    rng: ChaCha8Rng,
}

impl NoiseRng {
    /// A stream seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A stream seeded with `sub_seed(seed, path)`.
    pub fn derived(seed: u64, path: &[u64]) -> Self {
        Self::new(sub_seed(seed, path))
    }

    /// The underlying generator, for draws that are not tensors.
    pub fn rng_mut(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// Fills `out` with standard normal draws.
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        for v in out.iter_mut() {
            *v = StandardNormal.sample(&mut self.rng);
        }
    }

    /// A tensor of standard normal draws.
    ///
    /// `dtype` must be a float type: normal draws rounded to an integer type
    /// would be mostly 0, so that is a [`CoreError::NotFloat`] (converted
    /// into `candle_core::Error`) instead.
    pub fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if !dtype.is_float() {
            return Err(CoreError::NotFloat {
                what: "NoiseRng::randn: dtype",
                dtype,
            }
            .into());
        }
        let n = shape.iter().product();
        if dtype == DType::F64 {
            let v: Vec<f64> = (0..n)
                .map(|_| StandardNormal.sample(&mut self.rng))
                .collect();
            return Tensor::from_vec(v, shape, device);
        }
        let mut v = vec![0f32; n];
        self.fill_normal(&mut v);
        Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
    }

    /// A tensor of uniform draws in `[lo, hi)`.
    ///
    /// `lo` and `hi` must be finite with `lo < hi` (rand would panic on an
    /// empty range); otherwise the result is a [`CoreError::BadArgument`]
    /// converted into `candle_core::Error`.
    pub fn uniform(
        &mut self,
        shape: &[usize],
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        for (name, value) in [("lo", lo), ("hi", hi)] {
            if !value.is_finite() {
                return Err(CoreError::BadArgument {
                    name,
                    value,
                    reason: "must be finite",
                }
                .into());
            }
        }
        if lo >= hi {
            return Err(CoreError::BadArgument {
                name: "hi",
                value: hi,
                reason: "must be greater than lo",
            }
            .into());
        }
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.rng.random_range(lo..hi)).collect();
        Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
    }
}

//! BatchNorm1d in training mode on a contiguous row-major `[batch, features]`
//! host slice: batch statistics, normalisation and the affine map in one
//! pass each way, with the closed-form backward pass.
//!
//! With `xhat = (x - mean) * istd`, `istd = 1 / sqrt(var + eps)` (biased
//! variance over the batch) and `y = gamma * xhat + beta`, the gradients are
//!
//! ```text
//! dbeta  = sum_b dy
//! dgamma = sum_b dy * xhat
//! dx     = gamma * istd / B * (B * dy - dbeta - xhat * dgamma)
//! ```
//!
//! candle builds the same layer from about a dozen generic ops (means,
//! broadcasts, a square root), each allocating a tensor and each with its own
//! backward node; this is two sweeps over the batch forward and two backward.

use crate::elem::Elem;

/// The shape of one normalisation, already validated (`batch >= 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BnGeom {
    pub batch: usize,
    pub features: usize,
}

/// Per-feature batch mean and biased variance, two-pass (the mean first), in
/// row order so that the result does not depend on threading.
pub(crate) fn stats<T: Elem>(g: &BnGeom, x: &[T]) -> (Vec<T>, Vec<T>) {
    let f = g.features;
    let inv_b = T::from_f64(1.0 / g.batch as f64);
    let mut mean = vec![T::ZERO; f];
    for row in x.chunks_exact(f) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m *= inv_b);
    let mut var = vec![T::ZERO; f];
    for row in x.chunks_exact(f) {
        for ((s, &v), &m) in var.iter_mut().zip(row).zip(&mean) {
            let d = v - m;
            *s += d * d;
        }
    }
    var.iter_mut().for_each(|s| *s *= inv_b);
    (mean, var)
}

/// `1 / sqrt(var + eps)` per feature.
pub(crate) fn inv_std<T: Elem>(var: &[T], eps: f64) -> Vec<T> {
    var.iter()
        .map(|&v| T::from_f64(1.0 / (v.to_f64() + eps).sqrt()))
        .collect()
}

/// `gamma * (x - mean) * istd + beta` as a fresh vector.
pub(crate) fn forward<T: Elem>(
    g: &BnGeom,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    mean: &[T],
    istd: &[T],
) -> Vec<T> {
    let f = g.features;
    // Centring first keeps the precision of features whose mean is large
    // against their spread.
    let scale: Vec<T> = gamma.iter().zip(istd).map(|(&w, &s)| w * s).collect();
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(f) {
        y.extend((0..f).map(|i| (row[i] - mean[i]) * scale[i] + beta[i]));
    }
    y
}

/// Which gradients the caller wants.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BnWanted {
    pub x: bool,
    pub gamma: bool,
    pub beta: bool,
}

/// The gradients of a training-mode BatchNorm; a field is `None` when not wanted.
pub(crate) struct BnGrads<T> {
    pub x: Option<Vec<T>>,
    pub gamma: Option<Vec<T>>,
    pub beta: Option<Vec<T>>,
}

/// The closed-form backward pass from the input, `gamma`, the batch
/// statistics and the output gradient `dy`.
pub(crate) fn backward<T: Elem>(
    g: &BnGeom,
    x: &[T],
    gamma: &[T],
    mean: &[T],
    istd: &[T],
    dy: &[T],
    wanted: BnWanted,
) -> BnGrads<T> {
    let f = g.features;
    let mut dbeta = vec![T::ZERO; f];
    let mut dgamma = vec![T::ZERO; f];
    for (xr, gr) in x.chunks_exact(f).zip(dy.chunks_exact(f)) {
        for i in 0..f {
            let xhat = (xr[i] - mean[i]) * istd[i];
            dbeta[i] += gr[i];
            dgamma[i] += gr[i] * xhat;
        }
    }
    let dx = wanted.x.then(|| {
        let b = T::from_f64(g.batch as f64);
        let inv_b = T::from_f64(1.0 / g.batch as f64);
        let k: Vec<T> = gamma
            .iter()
            .zip(istd)
            .map(|(&w, &s)| w * s * inv_b)
            .collect();
        let mut dx = Vec::with_capacity(x.len());
        for (xr, gr) in x.chunks_exact(f).zip(dy.chunks_exact(f)) {
            dx.extend((0..f).map(|i| {
                let xhat = (xr[i] - mean[i]) * istd[i];
                k[i] * (b * gr[i] - dbeta[i] - xhat * dgamma[i])
            }));
        }
        dx
    });
    BnGrads {
        x: dx,
        gamma: wanted.gamma.then_some(dgamma),
        beta: wanted.beta.then_some(dbeta),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normalised features have zero mean and unit (biased) variance.
    #[test]
    fn normalises_each_feature() {
        let g = BnGeom {
            batch: 5,
            features: 3,
        };
        let x: Vec<f64> = (0..15)
            .map(|i| ((i * 37 % 11) as f64) * 0.7 - 2.0)
            .collect();
        let (mean, var) = stats(&g, &x);
        let istd = inv_std(&var, 0.0);
        let y = forward(&g, &x, &[1.0; 3], &[0.0; 3], &mean, &istd);
        let (m2, v2) = stats(&g, &y);
        for f in 0..3 {
            assert!(
                m2[f].abs() < 1e-12 && (v2[f] - 1.0).abs() < 1e-12,
                "{m2:?} {v2:?}"
            );
        }
    }
}

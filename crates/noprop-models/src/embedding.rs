//! Class embeddings `W_embed` `[m, d]` (spec section 6).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use noprop_core::NoiseRng;

use crate::ModelError;

/// How `W_embed` is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingKind {
    /// `W_embed = I_m`, fixed, `d = m`.
    OneHot,
    /// Learned, `d` given ("dim=20" in the paper): semi-orthogonal rows when
    /// `d >= m`, standard normal entries otherwise.
    Learned {
        /// The latent dimension `d`.
        dim: usize,
    },
    /// Learned, `d = C*H*W`, initialised per class with a training image
    /// (see [`prototype_init`]); the label path sees `z` as an image.
    Prototype,
}

impl EmbeddingKind {
    /// The latent dimension `d` for `m` classes and images of `image_len` values.
    pub fn latent_dim(self, classes: usize, image_len: usize) -> usize {
        match self {
            EmbeddingKind::OneHot => classes,
            EmbeddingKind::Learned { dim } => dim,
            EmbeddingKind::Prototype => image_len,
        }
    }

    /// True when `W_embed` is trained.
    pub fn is_learned(self) -> bool {
        !matches!(self, EmbeddingKind::OneHot)
    }
}

/// `W_embed`, fixed or a trainable variable.
#[derive(Debug, Clone)]
pub struct ClassEmbedding {
    kind: EmbeddingKind,
    weight: Tensor,
    var: Option<Var>,
}

impl ClassEmbedding {
    /// The fixed identity.
    pub fn one_hot(classes: usize, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            kind: EmbeddingKind::OneHot,
            weight: Tensor::eye(classes, dtype, device)?,
            var: None,
        })
    }

    /// A learned `[m, d]` embedding: orthonormal rows when `d >= m`, N(0, 1) entries otherwise.
    pub fn learned(
        classes: usize,
        dim: usize,
        rng: &mut NoiseRng,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let init = random_init(classes, dim, dim >= classes, rng, dtype, device)?;
        Self::trainable(EmbeddingKind::Learned { dim }, &init)
    }

    /// A learned embedding starting from `init` `[m, C*H*W]` (see [`prototype_indices`]).
    pub fn prototype(init: &Tensor) -> candle_core::Result<Self> {
        Self::trainable(EmbeddingKind::Prototype, init)
    }

    /// A learned embedding of `kind` starting from `init` `[m, d]`.
    pub fn trainable(kind: EmbeddingKind, init: &Tensor) -> candle_core::Result<Self> {
        if kind == EmbeddingKind::OneHot {
            candle_core::bail!("a one-hot embedding is fixed, not trainable");
        }
        let var = Var::from_tensor(init)?;
        Ok(Self {
            kind,
            weight: var.as_tensor().clone(),
            var: Some(var),
        })
    }

    /// How it was made.
    pub fn kind(&self) -> EmbeddingKind {
        self.kind
    }

    /// `W_embed` `[m, d]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The trainable variable, if learned.
    pub fn var(&self) -> Option<&Var> {
        self.var.as_ref()
    }
}

/// A random `[m, d]` initialisation: N(0, 1) entries, with the rows made
/// orthonormal when `orthogonal` (which needs `d >= m`).
pub fn random_init(
    classes: usize,
    dim: usize,
    orthogonal: bool,
    rng: &mut NoiseRng,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut w = vec![0f32; classes * dim];
    rng.fill_normal(&mut w);
    if orthogonal {
        if dim < classes {
            candle_core::bail!("orthonormal rows need d >= m, got d = {dim} < m = {classes}");
        }
        orthonormalise_rows(&mut w, classes, dim);
    }
    Tensor::from_vec(w, (classes, dim), device)?.to_dtype(dtype)
}

/// Sets a Linear head `f_out` (the variables in `head`) to `g` times the
/// dual basis of `embed` = `W_embed` `[m, d]` (see [`dual_basis`]) and its
/// bias to 0, so that `f_out(u_y) ≈ g e_y` ranks class `y` first from the
/// start. The gain `g = ln(9 (m - 1))` makes `softmax(f_out(u_y))` give `y`
/// probability 0.9 (4.4 for m = 10, 6.8 for m = 100): high enough that the
/// cross-entropy is not capped near `ln(1 + (m - 1)/e)` while the head
/// grows, as it is with `g = 1`. The `head_init = "embedding"` of every
/// method.
pub fn align_head(head: &VarMap, embed: &Tensor) -> Result<(), ModelError> {
    let m = embed.dim(0)?;
    let gain = (9.0 * (m.max(2) - 1) as f64).ln();
    let weight = (dual_basis(embed, 1e-3)? * gain)?;
    let data = head
        .data()
        .lock()
        .map_err(|_| ModelError::Config("VarMap poisoned".into()))?;
    for (name, var) in data.iter() {
        if name.ends_with("weight") {
            var.set(&weight.to_dtype(var.dtype())?)?;
        } else {
            var.set(&var.zeros_like()?)?;
        }
    }
    Ok(())
}

/// The ridge-regularised dual basis of the rows `u_y` of `W_embed` `[m, d]`:
/// `A = (U U^T + eps I)^{-1} U` with `eps = ridge * tr(U U^T) / m`, so that
/// `A U^T ≈ I` when the rows are independent (and the least-squares
/// compromise when `d < m`). A Linear head with weight `A` scores `u_y`
/// highest for class `y`. Computed on the host in f64 (Cholesky).
pub fn dual_basis(weight: &Tensor, ridge: f64) -> candle_core::Result<Tensor> {
    let (m, d) = weight.dims2()?;
    let u: Vec<f64> = weight.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let mut g = vec![0f64; m * m];
    for i in 0..m {
        for j in 0..=i {
            let dot: f64 = (0..d).map(|k| u[i * d + k] * u[j * d + k]).sum();
            g[i * m + j] = dot;
            g[j * m + i] = dot;
        }
    }
    let eps = ridge * (0..m).map(|i| g[i * m + i]).sum::<f64>() / m as f64;
    if !(eps > 0.0 && eps.is_finite()) {
        candle_core::bail!("the embedding has no non-zero row, or ridge {ridge} is not positive");
    }
    for i in 0..m {
        g[i * m + i] += eps;
    }
    // Cholesky G = L L^T, in place in the lower triangle.
    for j in 0..m {
        let s = g[j * m + j] - (0..j).map(|k| g[j * m + k].powi(2)).sum::<f64>();
        let ljj = s.sqrt();
        g[j * m + j] = ljj;
        for i in j + 1..m {
            let s = g[i * m + j] - (0..j).map(|k| g[i * m + k] * g[j * m + k]).sum::<f64>();
            g[i * m + j] = s / ljj;
        }
    }
    // Solve L L^T A = U column by column of U.
    let mut a = u;
    for c in 0..d {
        for i in 0..m {
            let s = a[i * d + c] - (0..i).map(|k| g[i * m + k] * a[k * d + c]).sum::<f64>();
            a[i * d + c] = s / g[i * m + i];
        }
        for i in (0..m).rev() {
            let s = a[i * d + c] - (i + 1..m).map(|k| g[k * m + i] * a[k * d + c]).sum::<f64>();
            a[i * d + c] = s / g[i * m + i];
        }
    }
    Tensor::from_vec(a, (m, d), weight.device())?.to_dtype(weight.dtype())
}

/// Gram-Schmidt on the rows of a row-major `[rows, cols]` matrix (rows <= cols), in f64.
fn orthonormalise_rows(w: &mut [f32], rows: usize, cols: usize) {
    let mut m: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    for i in 0..rows {
        for j in 0..i {
            let dot: f64 = (0..cols).map(|k| m[i * cols + k] * m[j * cols + k]).sum();
            for k in 0..cols {
                m[i * cols + k] -= dot * m[j * cols + k];
            }
        }
        let norm = (0..cols)
            .map(|k| m[i * cols + k].powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        for k in 0..cols {
            m[i * cols + k] /= norm;
        }
    }
    for (dst, src) in w.iter_mut().zip(m) {
        *dst = src as f32;
    }
}

/// The prototype initialisation: for each class, the training image whose
/// median (Euclidean) distance to the other images of its class is smallest.
/// Returns the index of that image per class.
///
/// `images` is row-major `[N, image_len]`; distances are computed with one
/// matrix product per class on `device`.
pub fn prototype_indices(
    images: &[f32],
    labels: &[u32],
    image_len: usize,
    classes: usize,
    device: &Device,
) -> candle_core::Result<Vec<usize>> {
    let mut out = Vec::with_capacity(classes);
    for c in 0..classes as u32 {
        let members: Vec<usize> = labels
            .iter()
            .enumerate()
            .filter(|(_, &y)| y == c)
            .map(|(i, _)| i)
            .collect();
        if members.is_empty() {
            candle_core::bail!("class {c} has no training image to build its prototype from");
        }
        if members.len() <= 2 {
            out.push(members[0]);
            continue;
        }
        let mut rows = Vec::with_capacity(members.len() * image_len);
        for &i in &members {
            rows.extend_from_slice(&images[i * image_len..(i + 1) * image_len]);
        }
        let x = Tensor::from_vec(rows, (members.len(), image_len), device)?.to_dtype(DType::F64)?;
        let sq = x.sqr()?.sum_keepdim(1)?;
        // Squared distances |a|^2 + |b|^2 - 2 a.b; the median of squares orders like the median of distances.
        let d2 = sq
            .broadcast_add(&sq.t()?)?
            .sub(&(noprop_kernels::matmul(&x, &x.t()?)? * 2.0)?)?;
        let d2: Vec<Vec<f64>> = d2.to_vec2()?;
        let mut best = (f64::INFINITY, members[0]);
        for (r, row) in d2.into_iter().enumerate() {
            let mut others: Vec<f64> = row
                .into_iter()
                .enumerate()
                .filter(|(k, _)| *k != r)
                .map(|(_, v)| v)
                .collect();
            let mid = (others.len() - 1) / 2;
            let (_, med, _) = others.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
            if *med < best.0 {
                best = (*med, members[r]);
            }
        }
        out.push(best.1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_basis_inverts_independent_rows_and_ranks_the_right_class_first() {
        let dev = Device::Cpu;
        let mut rng = NoiseRng::new(3);
        // Independent, far from orthogonal rows (a shared offset), d > m.
        let mut w = vec![0f32; 4 * 7];
        rng.fill_normal(&mut w);
        w.iter_mut().for_each(|v| *v += 2.0);
        let u = Tensor::from_vec(w, (4, 7), &dev).unwrap();
        let a = dual_basis(&u, 1e-9).unwrap();
        let prod: Vec<Vec<f32>> = a.matmul(&u.t().unwrap()).unwrap().to_vec2().unwrap();
        for (i, row) in prod.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-4, "A U^T [{i},{j}] = {v}");
            }
        }
        // One-hot: the identity, shrunk by the ridge.
        let eye = Tensor::eye(5, DType::F32, &dev).unwrap();
        let a: Vec<Vec<f32>> = dual_basis(&eye, 1e-3).unwrap().to_vec2().unwrap();
        assert!((a[2][2] - 1.0 / 1.001).abs() < 1e-6 && a[2][3] == 0.0);
        // d < m (rank-deficient Gram matrix): the ridge keeps it finite.
        let mut w = vec![0f32; 12 * 6];
        rng.fill_normal(&mut w);
        let u = Tensor::from_vec(w, (12, 6), &dev).unwrap();
        let scores: Vec<Vec<f32>> = dual_basis(&u, 1e-3)
            .unwrap()
            .matmul(&u.t().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(scores.iter().flatten().all(|v| v.is_finite()));
        assert!(dual_basis(&Tensor::zeros((3, 4), DType::F32, &dev).unwrap(), 1e-3).is_err());
    }

    #[test]
    fn learned_rows_are_orthonormal() {
        let e = ClassEmbedding::learned(10, 20, &mut NoiseRng::new(0), DType::F64, &Device::Cpu)
            .unwrap();
        let w = e.weight();
        let g: Vec<Vec<f64>> = w.matmul(&w.t().unwrap()).unwrap().to_vec2().unwrap();
        for (i, row) in g.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-6, "G[{i}][{j}] = {v}");
            }
        }
    }

    #[test]
    fn prototype_picks_the_image_of_smallest_median_distance() {
        // Class 0: 1-D "images" at 0, 1, 2, 10 -> medians of distances to the
        // others: 0 -> 2, 1 -> 1, 2 -> 2 (of 1, 2, 8: median 2), 10 -> 9; pick value 1.
        // Class 1: 5, 6, 50 -> medians 5 -> (1, 45) lower median 1, 6 -> (1, 44) 1, 50 -> 44;
        // ties go to the first, value 5.
        let images = [0.0f32, 5.0, 1.0, 6.0, 2.0, 50.0, 10.0];
        let labels = [0u32, 1, 0, 1, 0, 1, 0];
        let idx = prototype_indices(&images, &labels, 1, 2, &Device::Cpu).unwrap();
        assert_eq!(idx, vec![2, 1]);
        assert!(prototype_indices(&images, &labels, 1, 3, &Device::Cpu).is_err());
    }
}

//! NoProp-FM (spec section 9, eq. 10-13, Algorithm 3): flow matching from
//! noise `z_0 ~ N(0, I)` at `t = 0` to the label embedding `z_1 = u_y` at `t = 1`.
//!
//! The network predicts a velocity `v(z_t, x, t)` and is trained to match
//! `z_1 - z_0` along the straight path between the two. Inference integrates
//! `dz/dt = v` and reads the class off the nearest embedding.

use candle_core::{DType, Tensor};

use crate::error::{check_float, check_shape, CoreError, Result};
use crate::ode::{grid, integrate, OdeSolver};
use crate::rng::NoiseRng;

/// The velocity field `v(z, x, t)` that a user's network implements for NoProp-FM.
pub trait VelocityField {
    /// The dimension `d` of the latent.
    fn latent_dim(&self) -> usize;
    /// The velocity `v(z_t, x, t)`.
    ///
    /// # Shapes
    /// `z`: `[B, d]`, `x`: `[B, ...]`, `t`: `[B]`; returns `[B, d]`.
    fn velocity(&self, z: &Tensor, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor>;

    /// [`velocity`](Self::velocity) with one time `t` for every row, as the
    /// samplers call it; override it where a network can share its time path
    /// across rows.
    fn velocity_at(&self, z: &Tensor, x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        self.velocity(
            z,
            x,
            &Tensor::full(t, (z.dim(0)?,), z.device())?.to_dtype(z.dtype())?,
        )
    }
}

fn same_shape(what: &'static str, a: &Tensor, reference: &Tensor) -> Result<()> {
    if a.dims() != reference.dims() {
        return Err(CoreError::Shape {
            what,
            expected: format!("{:?}", reference.dims()),
            found: a.dims().to_vec(),
        });
    }
    Ok(())
}

/// The point on the path (eq. 10): `z_t = t z_1 + (1 - t) z_0 + sigma eps`,
/// `eps ~ N(0, I)`. No noise is drawn when `sigma == 0` (the default), so the
/// random stream does not advance.
///
/// # Shapes
/// `z0`, `z1`: `[B, d]`, `t`: `[B]`; returns `[B, d]`.
pub fn fm_interpolate(
    z0: &Tensor,
    z1: &Tensor,
    t: &Tensor,
    sigma: f64,
    rng: &mut NoiseRng,
) -> Result<Tensor> {
    check_shape("fm_interpolate: z0", z0, &[None, None], "[B, d]")?;
    let eps = if sigma != 0.0 {
        Some(rng.randn(z0.dims(), z0.dtype(), z0.device())?)
    } else {
        None
    };
    fm_interpolate_with(z0, z1, t, sigma, eps.as_ref())
}

/// [`fm_interpolate`] with the noise given (`None` means no noise term).
///
/// # Shapes
/// `z0`, `z1`, `eps`: `[B, d]`, `t`: `[B]`; returns `[B, d]`.
pub fn fm_interpolate_with(
    z0: &Tensor,
    z1: &Tensor,
    t: &Tensor,
    sigma: f64,
    eps: Option<&Tensor>,
) -> Result<Tensor> {
    check_shape("fm_interpolate: z0", z0, &[None, None], "[B, d]")?;
    same_shape("fm_interpolate: z1", z1, z0)?;
    check_shape("fm_interpolate: t", t, &[Some(z0.dim(0)?)], "[B]")?;
    if !sigma.is_finite() || sigma < 0.0 {
        return Err(CoreError::BadArgument {
            name: "sigma",
            value: sigma,
            reason: "must be finite and >= 0",
        });
    }
    let tc = t.to_dtype(z0.dtype())?.unsqueeze(1)?;
    // z0 + t (z1 - z0) is the same point; this form is exact at t = 0 and t = 1.
    let mut z = (z1.broadcast_mul(&tc)? + z0.broadcast_mul(&tc.affine(-1.0, 1.0)?)?)?;
    if let Some(eps) = eps {
        same_shape("fm_interpolate: eps", eps, z0)?;
        z = (z + (eps * sigma)?)?;
    }
    Ok(z)
}

/// The regression target of eq. 11, `z_1 - z_0`.
///
/// # Shapes
/// `z0`, `z1`: `[B, d]`; returns `[B, d]`.
pub fn fm_target(z0: &Tensor, z1: &Tensor) -> Result<Tensor> {
    check_shape("fm_target: z0", z0, &[None, None], "[B, d]")?;
    same_shape("fm_target: z1", z1, z0)?;
    Ok((z1 - z0)?)
}

/// The flow-matching loss (eq. 11): `(1/B) sum_i ||v_i - (z_{1,i} - z_{0,i})||^2`,
/// the squared norm summed over `d`.
///
/// # Shapes
/// `v`, `z0`, `z1`: `[B, d]`; returns a scalar.
pub fn fm_loss(v: &Tensor, z0: &Tensor, z1: &Tensor) -> Result<Tensor> {
    let target = fm_target(z0, z1)?;
    same_shape("fm_loss: v", v, &target)?;
    Ok((v - target)?.sqr()?.sum(1)?.mean(0)?)
}

/// The one-step estimate of the endpoint used by the anchor loss (eq. 12):
/// `ztilde_1 = z_t + (1 - t) v`. The anchor term is then
/// [`cross_entropy`](crate::cross_entropy)`(f_out(ztilde_1), y)`.
///
/// # Shapes
/// `z_t`, `v`: `[B, d]`, `t`: `[B]`; returns `[B, d]`.
pub fn fm_extrapolate(z_t: &Tensor, v: &Tensor, t: &Tensor) -> Result<Tensor> {
    check_shape("fm_extrapolate: z_t", z_t, &[None, None], "[B, d]")?;
    same_shape("fm_extrapolate: v", v, z_t)?;
    check_shape("fm_extrapolate: t", t, &[Some(z_t.dim(0)?)], "[B]")?;
    let rest = t.to_dtype(z_t.dtype())?.affine(-1.0, 1.0)?.unsqueeze(1)?;
    Ok((z_t + v.broadcast_mul(&rest)?)?)
}

/// NoProp-FM inference (spec section 9): integrates `dz/dt = v(z, x, t)` from
/// `z_0 ~ N(0, I)` at `t = 0` to `t = 1` in `steps` steps on `t_k = k / steps`
/// (Euler: `z += v(z, x, t_k) / steps`; or Heun) and returns `z_1`. Classify
/// it with [`nearest_embedding`]. The paper uses 1000 Euler steps.
///
/// # Shapes
/// `x`: `[B, ...]` of a float dtype (integer input is
/// [`CoreError::NotFloat`]); returns `[B, d]` in `x`'s dtype.
pub fn sample_fm<V: VelocityField + ?Sized>(
    field: &V,
    x: &Tensor,
    steps: usize,
    solver: OdeSolver,
    rng: &mut NoiseRng,
) -> Result<Tensor> {
    check_float("sample_fm: x", x)?;
    let b = x.dim(0)?;
    let ts = grid(steps.max(1));
    let z0 = rng.randn(&[b, field.latent_dim()], x.dtype(), x.device())?;
    integrate(z0, steps, solver, |z, k| {
        let v = field.velocity_at(z, x, ts[k])?;
        same_shape("sample_fm: v", &v, z)?;
        Ok(v)
    })
}

/// The index of the embedding nearest to each row of `z` in Euclidean distance.
///
/// Distances are compared through `||w_j||^2 - 2 z . w_j` (the `||z||^2` term
/// is the same for every class), which avoids a `[B, m, d]` intermediate; ties
/// are broken towards either index.
///
/// # Shapes
/// `z`: `[B, d]`, `w_embed`: `[m, d]`; returns `[B]` of `u32`.
pub fn nearest_embedding(z: &Tensor, w_embed: &Tensor) -> Result<Tensor> {
    check_shape("nearest_embedding: z", z, &[None, None], "[B, d]")?;
    check_shape(
        "nearest_embedding: w_embed",
        w_embed,
        &[None, Some(z.dim(1)?)],
        "[m, d]",
    )?;
    if w_embed.dim(0)? == 0 {
        return Err(CoreError::Shape {
            what: "nearest_embedding: w_embed",
            expected: "[m, d] with m >= 1".to_string(),
            found: w_embed.dims().to_vec(),
        });
    }
    let w = w_embed.to_dtype(z.dtype())?;
    let cross = noprop_kernels::matmul(z, &w.t()?)?; // [B, m]
    let norms = w.sqr()?.sum(1)?; // [m]
    let score = cross.affine(-2.0, 0.0)?.broadcast_add(&norms)?;
    Ok(score.argmin(1)?.to_dtype(DType::U32)?)
}

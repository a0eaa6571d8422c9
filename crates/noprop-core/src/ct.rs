//! NoProp-CT (spec section 8, eq. 9, Algorithm 2): continuous-time sampling
//! of `t`, q-sampling, the loss and the two samplers.
//!
//! One network `uhat(z, x, t)` serves every `t` in `[0, 1]`; the schedule is a
//! [`ContinuousSchedule`], possibly learnable. Inference starts from
//! `z_0 ~ N(0, I)` and runs to `t = 1`, either with the eq. 3 update on a grid
//! ([`sample_ct_eq3`], the paper's) or along the probability-flow ODE
//! ([`sample_ct_ode`]).

use candle_core::{DType, Device, Tensor};

use crate::continuous::{sigmoid_f64, softplus, ContinuousSchedule};
use crate::error::{check_float, check_shape, CoreError, Result, ScheduleError};
use crate::loss::cross_entropy;
use crate::ode::{check_steps, grid, integrate, OdeSolver};
use crate::rng::NoiseRng;
use crate::sample::{eq3_update, Inference};
use crate::schedule::coefficients_between;

/// The continuous-time denoiser `uhat(z, x, t)` that a user's network implements.
pub trait ContinuousDenoiser {
    /// The dimension `d` of the latent.
    fn latent_dim(&self) -> usize;
    /// The prediction `uhat(z_t, x, t)` of the clean embedding.
    ///
    /// # Shapes
    /// `z`: `[B, d]`, `x`: `[B, ...]`, `t`: `[B]`; returns `[B, d]`.
    fn denoise(&self, z: &Tensor, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor>;

    /// [`denoise`](Self::denoise) with one time `t` for every row, as the
    /// samplers call it; override it where a network can share its time path
    /// across rows.
    fn denoise_at(&self, z: &Tensor, x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        self.denoise(
            z,
            x,
            &Tensor::full(t, (z.dim(0)?,), z.device())?.to_dtype(z.dtype())?,
        )
    }
}

/// Draws `t_i ~ U(0, 1)` for a batch; `dtype` must be a float type.
///
/// # Shapes
/// Returns `[batch]`.
pub fn sample_t(batch: usize, dtype: DType, device: &Device, rng: &mut NoiseRng) -> Result<Tensor> {
    if !dtype.is_float() {
        return Err(CoreError::NotFloat {
            what: "sample_t: dtype",
            dtype,
        });
    }
    Ok(rng.uniform(&[batch], 0.0, 1.0, dtype, device)?)
}

/// Draws stratified times for a batch: `t_i = (u + i / B) mod 1` for
/// `i = 0..B`, with a single `u ~ U(0, 1)` for the whole batch; `dtype` must
/// be a float type.
///
/// Each `t_i` on its own is still `U(0, 1)` (a uniform shift of a grid, taken
/// modulo 1), so every per-example term keeps its expectation, but the batch
/// covers `[0, 1)` evenly: one point in each interval `[k/B, (k+1)/B)`. This
/// is the low-discrepancy sampler of Kingma et al. (2021, Variational
/// Diffusion Models), which lowers the variance of a minibatch estimate of
/// an integral over `t` such as the NoProp-CT denoising term. It draws one
/// number from `rng` where [`sample_t`] draws `B`. Computed in `f64`, then
/// cast to `dtype`.
///
/// ```
/// use noprop_core::candle_core::{DType, Device};
/// use noprop_core::{sample_t_stratified, NoiseRng};
///
/// let t = sample_t_stratified(4, DType::F64, &Device::Cpu, &mut NoiseRng::new(0))?;
/// let mut t: Vec<f64> = t.to_vec1()?;
/// t.sort_by(|a, b| a.total_cmp(b));
/// // One time in each quarter of [0, 1), all a quarter apart.
/// for (k, w) in t.windows(2).enumerate() {
///     assert!((w[1] - w[0] - 0.25).abs() < 1e-12 && (t[k] * 4.0).floor() as usize == k);
/// }
/// # Ok::<(), noprop_core::CoreError>(())
/// ```
///
/// # Shapes
/// Returns `[batch]`.
pub fn sample_t_stratified(
    batch: usize,
    dtype: DType,
    device: &Device,
    rng: &mut NoiseRng,
) -> Result<Tensor> {
    if !dtype.is_float() {
        return Err(CoreError::NotFloat {
            what: "sample_t_stratified: dtype",
            dtype,
        });
    }
    let u: f64 = rand::Rng::random_range(rng.rng_mut(), 0.0..1.0);
    let n = batch.max(1) as f64;
    let t: Vec<f64> = (0..batch)
        .map(|i| (u + i as f64 / n).rem_euclid(1.0))
        .collect();
    Ok(Tensor::from_vec(t, batch, device)?.to_dtype(dtype)?)
}

/// Samples `z_i ~ q(z_{t_i} | y_i) = N(sqrt(abar(t_i)) u_i, (1 - abar(t_i)) I)`,
/// one time per row.
///
/// # Shapes
/// `u`: `[B, d]`, `t`: `[B]`; returns `[B, d]`.
pub fn q_sample_ct<S: ContinuousSchedule + ?Sized>(
    sched: &S,
    u: &Tensor,
    t: &Tensor,
    rng: &mut NoiseRng,
) -> Result<Tensor> {
    check_shape("q_sample_ct: u", u, &[None, None], "[B, d]")?;
    check_float("q_sample_ct: u", u)?;
    let eps = rng.randn(u.dims(), u.dtype(), u.device())?;
    q_sample_ct_with(sched, u, t, &eps)
}

/// [`q_sample_ct`] with the noise given. The factors are
/// `sqrt(abar) = exp(-softplus(gamma) / 2)` and
/// `sqrt(1 - abar) = exp(-softplus(-gamma) / 2)`, exact at both ends and with
/// finite gradients into a learnable schedule.
///
/// # Shapes
/// `u`, `eps`: `[B, d]`, `t`: `[B]`; returns `[B, d]`.
pub fn q_sample_ct_with<S: ContinuousSchedule + ?Sized>(
    sched: &S,
    u: &Tensor,
    t: &Tensor,
    eps: &Tensor,
) -> Result<Tensor> {
    check_shape("q_sample_ct: u", u, &[None, None], "[B, d]")?;
    check_shape("q_sample_ct: t", t, &[Some(u.dim(0)?)], "[B]")?;
    q_sample_ct_at_gamma(u, &sched.gamma(t)?, eps)
}

/// [`q_sample_ct_with`] given `gamma(t_i)` instead of the schedule and the
/// times: for a training step that needs the gradient with respect to each
/// example's `gamma(t_i)` (variance minimisation of the schedule, which
/// splits the graph there), the noising itself being unchanged.
///
/// # Shapes
/// `u`, `eps`: `[B, d]`, `gamma`: `[B]`; returns `[B, d]`.
pub fn q_sample_ct_at_gamma(u: &Tensor, gamma: &Tensor, eps: &Tensor) -> Result<Tensor> {
    check_shape("q_sample_ct: u", u, &[None, None], "[B, d]")?;
    check_shape("q_sample_ct: gamma", gamma, &[Some(u.dim(0)?)], "[B]")?;
    if eps.dims() != u.dims() {
        return Err(CoreError::Shape {
            what: "q_sample_ct: eps",
            expected: format!("{:?} (the shape of u)", u.dims()),
            found: eps.dims().to_vec(),
        });
    }
    let g = gamma.to_dtype(u.dtype())?;
    let signal = softplus(&g)?.affine(-0.5, 0.0)?.exp()?.unsqueeze(1)?;
    let noise = softplus(&g.neg()?)?
        .affine(-0.5, 0.0)?
        .exp()?
        .unsqueeze(1)?;
    Ok((u.broadcast_mul(&signal)? + eps.broadcast_mul(&noise)?)?)
}

/// `KL(q(z_0|y) || N(0, I))` averaged over the batch, with `abar_0` a tensor so
/// that a learnable schedule's `gamma(0)` receives its gradient:
/// `0.5 (abar_0 ||u||^2 + d (1 - abar_0) - d - d log(1 - abar_0))`.
///
/// # Shapes
/// `u`: `[B, d]`; `abar0`: `[]` or `[1]`; returns a scalar.
pub fn kl_prior_tensor(u: &Tensor, abar0: &Tensor) -> Result<Tensor> {
    check_shape("kl_prior_tensor: u", u, &[None, None], "[B, d]")?;
    if abar0.elem_count() != 1 || abar0.rank() > 1 {
        return Err(CoreError::Shape {
            what: "kl_prior_tensor: abar0",
            expected: "[] or [1]".to_string(),
            found: abar0.dims().to_vec(),
        });
    }
    let d = u.dim(1)? as f64;
    let a = abar0.flatten_all()?.squeeze(0)?.to_dtype(u.dtype())?;
    let sq = u.sqr()?.sum(1)?.mean(0)?;
    // abar ||u||^2 + d (1 - abar) - d = abar (||u||^2 - d).
    let first = (&a * (sq - d)?)?;
    let log_term = (a.affine(-1.0, 1.0)?.log()? * d)?;
    Ok(((first - log_term)? * 0.5)?)
}

/// The CT denoising term of eq. 9:
/// `eta / (2B) sum_i SNR'(t_i) ||uhat_i - u_i||^2`, squared norm summed over `d`.
///
/// # Shapes
/// `uhat`, `u`: `[B, d]`, `snr_prime`: `[B]`; returns a scalar.
pub fn ct_denoise_loss(uhat: &Tensor, u: &Tensor, snr_prime: &Tensor, eta: f64) -> Result<Tensor> {
    let names = [
        "ct_denoise_loss: u",
        "ct_denoise_loss: uhat",
        "ct_denoise_loss: snr_prime",
    ];
    let weighted = weighted_sq_errors(uhat, u, snr_prime, eta, names)?;
    Ok((weighted.mean(0)? * (eta / 2.0))?)
}

/// `SNR'(t_i) ||uhat_i - u_i||^2` `[B]` after checking the shapes and eta
/// (`names`: how errors call u, uhat and snr_prime).
fn weighted_sq_errors(
    uhat: &Tensor,
    u: &Tensor,
    snr_prime: &Tensor,
    eta: f64,
    names: [&'static str; 3],
) -> Result<Tensor> {
    check_shape(names[0], u, &[None, None], "[B, d]")?;
    // A negative eta would reward a worse denoiser.
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(CoreError::BadArgument {
            name: "eta",
            value: eta,
            reason: "must be finite and >= 0",
        });
    }
    if uhat.dims() != u.dims() {
        return Err(CoreError::Shape {
            what: names[1],
            expected: format!("{:?} (the shape of u)", u.dims()),
            found: uhat.dims().to_vec(),
        });
    }
    check_shape(names[2], snr_prime, &[Some(u.dim(0)?)], "[B]")?;
    let sq = (uhat - u)?.sqr()?.sum(1)?;
    Ok((sq * snr_prime.to_dtype(u.dtype())?)?)
}

/// The CT denoising term of eq. 9 per example, not averaged:
/// `L_i = eta / 2 SNR'(t_i) ||uhat_i - u_i||^2`, squared norm summed over
/// `d`, so that `mean_i L_i` is [`ct_denoise_loss`] (up to rounding). Per
/// example terms are what variance minimisation of the schedule needs
/// (Kingma et al. 2021: the gradient of `mean_i L_i^2`).
///
/// # Shapes
/// `uhat`, `u`: `[B, d]`, `snr_prime`: `[B]`; returns `[B]`.
pub fn ct_denoise_terms(uhat: &Tensor, u: &Tensor, snr_prime: &Tensor, eta: f64) -> Result<Tensor> {
    let names = [
        "ct_denoise_terms: u",
        "ct_denoise_terms: uhat",
        "ct_denoise_terms: snr_prime",
    ];
    let weighted = weighted_sq_errors(uhat, u, snr_prime, eta, names)?;
    Ok((weighted * (eta / 2.0))?)
}

/// The three terms of the NoProp-CT loss (eq. 9) and their sum.
#[derive(Debug, Clone)]
pub struct CtLoss {
    /// `-(1/B) sum log softmax(f_out(z_1))[y]`, with `z_1 ~ q(z_1|y)`.
    pub cross_entropy: Tensor,
    /// `(1/B) sum KL(q(z_0|y) || N(0, I))`.
    pub kl: Tensor,
    /// `eta / (2B) sum SNR'(t_i) ||uhat_i - u_i||^2`.
    pub denoise: Tensor,
    /// The sum of the three, to back-propagate.
    pub total: Tensor,
}

/// Assembles the NoProp-CT loss of eq. 9.
///
/// Pass `snr_prime = sched.snr_derivative(&t)?` and
/// `abar0 = sched.alpha_bar(&Tensor::zeros(1, dtype, device)?)?` (alpha-bar
/// at `t = 0`, a `[1]` tensor), as tensors, so that a learnable schedule is
/// trained by the same loss (as in variational diffusion models). The
/// [guide](crate::guide) shows a whole step.
///
/// ```
/// use noprop_core::candle_core::{DType, Device, Tensor};
/// use noprop_core::{ct_loss, ContinuousSchedule, FixedLinearGamma};
///
/// let dev = Device::Cpu;
/// let sched = FixedLinearGamma::default();
/// let u = Tensor::eye(3, DType::F32, &dev)?; // one-hot u_y for y = 0, 1, 2
/// let y = Tensor::new(&[0u32, 1, 2], &dev)?;
/// let t = Tensor::new(&[0.1f32, 0.5, 0.9], &dev)?;
/// let snr_prime = sched.snr_derivative(&t)?; // [B]
/// let abar0 = sched.alpha_bar(&Tensor::zeros(1, DType::F32, &dev)?)?; // [1]
/// // A perfect denoiser (uhat = u) and a confident head: only the KL term is left.
/// let logits = (&u * 20.0)?;
/// let loss = ct_loss(&logits, &y, &u, &u, &snr_prime, &abar0, 1.0)?;
/// assert_eq!(loss.denoise.to_scalar::<f32>()?, 0.0);
/// assert!(loss.total.to_scalar::<f32>()? < 0.01);
/// # Ok::<(), noprop_core::CoreError>(())
/// ```
///
/// # Shapes
/// `head_logits_z1`: `[B, m]`, `targets`: `[B]`, `uhat`, `u`: `[B, d]`,
/// `snr_prime`: `[B]`, `abar0`: `[]` or `[1]`; every term is a batch mean.
pub fn ct_loss(
    head_logits_z1: &Tensor,
    targets: &Tensor,
    uhat: &Tensor,
    u: &Tensor,
    snr_prime: &Tensor,
    abar0: &Tensor,
    eta: f64,
) -> Result<CtLoss> {
    let cross_entropy = cross_entropy(head_logits_z1, targets)?;
    let kl = kl_prior_tensor(u, abar0)?;
    let denoise = ct_denoise_loss(uhat, u, snr_prime, eta)?;
    let total = ((&cross_entropy + &kl)? + &denoise)?;
    Ok(CtLoss {
        cross_entropy,
        kl,
        denoise,
        total,
    })
}

/// `gamma` and `gamma'` on the grid `k / steps`, checked to be finite with
/// `gamma` non-increasing (alpha-bar non-decreasing).
fn gamma_grid<S: ContinuousSchedule + ?Sized>(
    sched: &S,
    steps: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    check_steps(steps)?;
    let ts = grid(steps);
    let (g, dg) = sched.gamma_table(&ts)?;
    for (index, (&value, &d)) in g.iter().zip(&dg).enumerate() {
        if !value.is_finite() {
            return Err(ScheduleError::NotFinite { index, value }.into());
        }
        if !d.is_finite() {
            return Err(ScheduleError::NotFinite { index, value: d }.into());
        }
        if index > 0 && value > g[index - 1] {
            return Err(ScheduleError::NotIncreasing {
                index,
                prev: sigmoid_f64(-g[index - 1]),
                value: sigmoid_f64(-value),
            }
            .into());
        }
    }
    Ok((ts, g, dg))
}

/// NoProp-CT inference with the eq. 3 update (spec section 8): from
/// `z_0 ~ N(0, I)`, for `k = 1..=steps`,
/// `z_{t_k} = a uhat(z_{t_{k-1}}, x, t_{k-1}) + b z_{t_{k-1}} + sqrt(c) eps`
/// on the grid `t_k = k / steps`, with `a, b, c` from
/// [`coefficients_between`]`(abar(t_{k-1}), abar(t_k))`. Returns `z_1`.
/// The paper uses 1000 steps.
///
/// # Shapes
/// `x`: `[B, ...]` of a float dtype (integer input is
/// [`CoreError::NotFloat`]); returns `[B, d]` in `x`'s dtype.
pub fn sample_ct_eq3<D, S>(
    den: &D,
    sched: &S,
    x: &Tensor,
    steps: usize,
    mode: Inference,
    rng: &mut NoiseRng,
) -> Result<Tensor>
where
    D: ContinuousDenoiser + ?Sized,
    S: ContinuousSchedule + ?Sized,
{
    check_float("sample_ct_eq3: x", x)?;
    let (ts, g, _) = gamma_grid(sched, steps)?;
    let abar: Vec<f64> = g.iter().map(|&g| sigmoid_f64(-g)).collect();
    let b = x.dim(0)?;
    let shape = [b, den.latent_dim()];
    let mut z = rng.randn(&shape, x.dtype(), x.device())?;
    for k in 1..=steps {
        let uhat = den.denoise_at(&z, x, ts[k - 1])?;
        let eps = match mode {
            Inference::Stochastic => Some(rng.randn(&shape, x.dtype(), x.device())?),
            Inference::Deterministic => None,
        };
        // Inference keeps no autograd graph: with a network of `Var`s each
        // step's activations would otherwise stay alive through `z` until
        // the end, memory growing with the step count.
        z = eq3_update(
            coefficients_between(abar[k - 1], abar[k])?,
            &uhat,
            &z,
            eps.as_ref(),
        )?
        .detach();
    }
    Ok(z)
}

/// NoProp-CT inference along the probability-flow ODE, from `z_0 ~ N(0, I)`
/// at `t = 0` to `t = 1`, with `steps` Euler or Heun steps on `t_k = k / steps`.
///
/// # The drift
///
/// Given `y`, the noising process has marginals
/// `q(z_t | y) = N(sqrt(abar(t)) u, (1 - abar(t)) I)`, i.e.
/// `z_t = sqrt(abar) u + sqrt(1 - abar) eps`. Holding `eps` fixed and
/// differentiating in `t` gives a flow that carries each marginal to the next:
///
/// `dz/dt = abar' / (2 sqrt(abar)) u - abar' / (2 sqrt(1 - abar)) eps`,
///
/// and substituting `eps = (z - sqrt(abar) u) / sqrt(1 - abar)`:
///
/// `dz/dt = abar' / (2 (1 - abar)) (u / sqrt(abar) - z)`.
///
/// This is the probability-flow ODE of the variance-preserving SDE with
/// `beta(t) = (log abar)'`, read in NoProp's direction (noise decreasing in
/// `t`): `dz/dt = beta/2 (z + score)` with score `-(z - sqrt(abar) u) / (1 - abar)`
/// simplifies to the same expression. With `abar = sigmoid(-gamma)`,
/// `abar' = -gamma' abar (1 - abar)`, so
///
/// `dz/dt = (-gamma'(t) / 2) (sqrt(abar(t)) uhat - abar(t) z)`,
///
/// which has no division by `1 - abar` or `abar`. `u` is unknown at
/// inference, so the denoiser's `uhat(z, x, t)` stands in: it estimates
/// `E[u | z_t, x]`, which by Tweedie's formula turns the expression into the
/// exact marginal score given `x`.
///
/// With a perfect denoiser (`uhat = u_y`) the ODE is linear and its solution is
/// `z_1 = sqrt(abar(1)) u + sqrt((1 - abar(1)) / (1 - abar(0))) (z_0 - sqrt(abar(0)) u)`,
/// that is `~ sqrt(abar(1)) u_y` up to a small multiple of `z_0`.
///
/// # Shapes
/// `x`: `[B, ...]` of a float dtype (integer input is
/// [`CoreError::NotFloat`]); returns `[B, d]` in `x`'s dtype.
pub fn sample_ct_ode<D, S>(
    den: &D,
    sched: &S,
    x: &Tensor,
    steps: usize,
    solver: OdeSolver,
    rng: &mut NoiseRng,
) -> Result<Tensor>
where
    D: ContinuousDenoiser + ?Sized,
    S: ContinuousSchedule + ?Sized,
{
    check_float("sample_ct_ode: x", x)?;
    let (ts, g, dg) = gamma_grid(sched, steps)?;
    let b = x.dim(0)?;
    let z0 = rng.randn(&[b, den.latent_dim()], x.dtype(), x.device())?;
    integrate(z0, steps, solver, |z, k| {
        let abar = sigmoid_f64(-g[k]);
        let rate = -dg[k] / 2.0;
        let uhat = den.denoise_at(z, x, ts[k])?;
        if uhat.dims() != z.dims() {
            return Err(CoreError::Shape {
                what: "sample_ct_ode: uhat",
                expected: format!("{:?} (the shape of z)", z.dims()),
                found: uhat.dims().to_vec(),
            });
        }
        Ok(((uhat * (rate * abar.sqrt()))? - (z * (rate * abar))?)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::continuous::FixedLinearGamma;

    #[test]
    fn stratified_times_are_a_shifted_grid_with_a_uniform_marginal() {
        let dev = Device::Cpu;
        let b = 8;
        let mut rng = NoiseRng::new(3);
        let mut all = Vec::new();
        for _ in 0..2000 {
            let t: Vec<f64> = sample_t_stratified(b, DType::F64, &dev, &mut rng)
                .unwrap()
                .to_vec1()
                .unwrap();
            // The batch is u + i/B mod 1: consecutive entries differ by 1/B
            // (or 1/B - 1 where the grid wraps), and sorted they are a grid.
            for w in t.windows(2) {
                let step = (w[1] - w[0]).rem_euclid(1.0);
                assert!((step - 1.0 / b as f64).abs() < 1e-12, "{t:?}");
            }
            let mut sorted = t.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            for (k, v) in sorted.iter().enumerate() {
                assert!((0.0..1.0).contains(v));
                assert_eq!(
                    (v * b as f64).floor() as usize,
                    k,
                    "one time per stratum: {sorted:?}"
                );
            }
            // Any one position is U(0, 1) across batches.
            all.push(t[5]);
        }
        // Marginal of t_5: mean 1/2, variance 1/12, and a flat histogram.
        let n = all.len() as f64;
        let mean = all.iter().sum::<f64>() / n;
        let var = all.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 0.5).abs() < 0.03, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.01, "variance {var}");
        let mut hist = [0usize; 4];
        for t in &all {
            hist[(t * 4.0) as usize] += 1;
        }
        assert!(
            hist.iter().all(|&c| (c as f64 - n / 4.0).abs() < 0.1 * n),
            "{hist:?}"
        );
    }

    #[test]
    fn stratified_times_are_deterministic_given_the_rng_and_use_one_draw() {
        let dev = Device::Cpu;
        let a: Vec<f32> = sample_t_stratified(16, DType::F32, &dev, &mut NoiseRng::new(9))
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = sample_t_stratified(16, DType::F32, &dev, &mut NoiseRng::new(9))
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        // One draw per batch: the stream continues exactly one number later.
        let mut r1 = NoiseRng::new(9);
        sample_t_stratified(16, DType::F32, &dev, &mut r1).unwrap();
        let mut r2 = NoiseRng::new(9);
        let _: f64 = rand::Rng::random_range(r2.rng_mut(), 0.0..1.0);
        assert_eq!(
            rand::Rng::random::<u64>(r1.rng_mut()),
            rand::Rng::random::<u64>(r2.rng_mut())
        );
        assert!(sample_t_stratified(4, DType::U32, &dev, &mut NoiseRng::new(0)).is_err());
        assert_eq!(
            sample_t_stratified(0, DType::F32, &dev, &mut NoiseRng::new(0))
                .unwrap()
                .dims(),
            &[0]
        );
    }

    #[test]
    fn per_example_denoise_terms_average_to_the_batch_loss() {
        let dev = Device::Cpu;
        let mut rng = NoiseRng::new(1);
        let u = rng.randn(&[5, 3], DType::F64, &dev).unwrap();
        let uhat = rng.randn(&[5, 3], DType::F64, &dev).unwrap();
        let t = sample_t(5, DType::F64, &dev, &mut rng).unwrap();
        let snr_prime = FixedLinearGamma::default().snr_derivative(&t).unwrap();
        let terms = ct_denoise_terms(&uhat, &u, &snr_prime, 0.7).unwrap();
        assert_eq!(terms.dims(), &[5]);
        let mean: f64 = terms.mean(0).unwrap().to_scalar().unwrap();
        let loss: f64 = ct_denoise_loss(&uhat, &u, &snr_prime, 0.7)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            (mean - loss).abs() <= 1e-12 * loss.abs().max(1.0),
            "{mean} vs {loss}"
        );
        // Each term by hand.
        let (u2, h2, w): (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<f64>) = (
            u.to_vec2().unwrap(),
            uhat.to_vec2().unwrap(),
            snr_prime.to_vec1().unwrap(),
        );
        let got: Vec<f64> = terms.to_vec1().unwrap();
        for i in 0..5 {
            let sq: f64 = (0..3).map(|k| (h2[i][k] - u2[i][k]).powi(2)).sum();
            assert!((got[i] - 0.35 * w[i] * sq).abs() < 1e-12 * got[i].abs().max(1.0));
        }
        assert!(ct_denoise_terms(&uhat, &u, &snr_prime, -1.0).is_err());
        assert!(ct_denoise_terms(&uhat.narrow(0, 0, 4).unwrap(), &u, &snr_prime, 1.0).is_err());
    }

    /// The reason for variance minimisation: with stratified times over a
    /// large batch, the denoising term estimates `eta/2 int SNR'(t) e dt =
    /// eta/2 e (SNR(1) - SNR(0))`, which does not depend on the interior of
    /// the schedule, so its gradient in `w1`, `w2` is ~0; the gradient of
    /// `mean L_i^2` in them is not.
    #[test]
    fn only_the_squared_terms_see_the_interior_of_the_schedule() {
        use crate::continuous::{LearnableSchedule, LearnableScheduleConfig};
        let dev = Device::Cpu;
        let cfg = LearnableScheduleConfig {
            hidden: 4,
            gamma0: -3.0,
            gamma1: 3.0,
        };
        let sched = LearnableSchedule::new(&cfg, DType::F64, &dev, &mut NoiseRng::new(5)).unwrap();
        let b = 4096;
        let t = sample_t_stratified(b, DType::F64, &dev, &mut NoiseRng::new(2)).unwrap();
        // A denoiser whose error does not depend on z or t: ||uhat - u||^2 = 1.
        let u = Tensor::zeros((b, 1), DType::F64, &dev).unwrap();
        let uhat = Tensor::ones((b, 1), DType::F64, &dev).unwrap();
        let terms = ct_denoise_terms(&uhat, &u, &sched.snr_derivative(&t).unwrap(), 1.0).unwrap();
        let plain = terms.mean(0).unwrap().backward().unwrap();
        let squared = terms.sqr().unwrap().mean(0).unwrap().backward().unwrap();
        let norm = |g: &candle_core::backprop::GradStore, name: &str| -> f64 {
            let var = sched.vars().into_iter().find(|(n, _)| n == name).unwrap().1;
            g.get(var.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        for name in ["schedule.w1", "schedule.w2"] {
            let (p, q) = (norm(&plain, name), norm(&squared, name));
            assert!(p < 1e-2 * q, "{name}: plain {p} vs squared {q}");
        }
        // The endpoints do move the plain term (SNR(1) - SNR(0)).
        assert!(norm(&plain, "schedule.gamma0") > 1e-3);
    }
}

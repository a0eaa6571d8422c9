//! Numerical checks of noprop-core against closed forms computed independently in f64.

use candle_core::{DType, Device, Tensor};
use noprop_core::*;
use proptest::prelude::*;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

/// Strictly increasing tables in [0, 1) built from positive increments.
fn schedules() -> impl Strategy<Value = Vec<f64>> {
    (1usize..16, 0.0f64..0.5).prop_flat_map(|(t, start)| {
        prop::collection::vec(0.01f64..1.0, t).prop_map(move |inc| {
            let total: f64 = inc.iter().sum();
            let span = 0.999 - start;
            let mut abar = vec![start];
            let mut acc = start;
            for i in inc {
                acc += span * i / total * 0.999;
                abar.push(acc);
            }
            abar
        })
    })
}

proptest! {
    #[test]
    fn eq3_preserves_q_marginals_in_closed_form(abar in schedules()) {
        let sched = DiscreteSchedule::from_alpha_bar(abar.clone()).unwrap();
        for t in 1..=sched.blocks() {
            let k = sched.coefficients(t).unwrap();
            // Mean factor of u: a * 1 + b * sqrt(abar_{t-1}) must be sqrt(abar_t).
            let mean = k.a + k.b * abar[t - 1].sqrt();
            prop_assert!(close(mean, abar[t].sqrt(), 1e-12), "mean t={t}: {mean} vs {}", abar[t].sqrt());
            // Variance: b^2 (1 - abar_{t-1}) + c must be 1 - abar_t.
            let var = k.b * k.b * (1.0 - abar[t - 1]) + k.c;
            prop_assert!(close(var, 1.0 - abar[t], 1e-12), "var t={t}: {var} vs {}", 1.0 - abar[t]);
            prop_assert!(k.c >= 0.0);
            prop_assert!(sched.snr(t).unwrap() > sched.snr(t - 1).unwrap());
        }
    }

    #[test]
    fn cosine_schedules_are_valid(t in 1usize..200, s in 0.0f64..0.1, m in 0.9f64..0.99999) {
        match DiscreteSchedule::cosine(t, s, m) {
            Ok(sched) => {
                prop_assert_eq!(sched.blocks(), t);
                prop_assert!(sched.alpha_bar(t).unwrap() <= m);
            }
            // Clipping at abar_max can flatten the top of a long schedule; that
            // must be reported, never passed on as a schedule with SNR steps of 0.
            Err(ScheduleError::NotIncreasing { value, .. }) => prop_assert_eq!(value, m),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn kl_is_nonnegative(abar0 in 0.0f64..0.99, scale in 0.0f64..3.0) {
        let u = (Tensor::eye(4, DType::F64, &Device::Cpu).unwrap() * scale).unwrap();
        let kl = kl_prior(&u, abar0).unwrap().to_scalar::<f64>().unwrap();
        prop_assert!(kl >= -1e-12);
    }
}

#[test]
fn eq3_preserves_q_marginals_by_sampling() {
    // Draw z_{t-1} ~ q(z_{t-1}|y), apply eq. 3 with uhat = u_y, and compare the
    // sample mean and variance of z_t with q(z_t|y).
    let sched = DiscreteSchedule::cosine(10, 0.008, 1.0 - 1e-4).unwrap();
    let dev = Device::Cpu;
    let n = 200_000;
    let u_val = 0.7f64;
    let u = Tensor::full(u_val, (n, 1), &dev).unwrap();
    let mut rng = NoiseRng::new(7);
    for t in [1usize, 4, 7, 10] {
        let z_prev = q_sample(&u, sched.alpha_bar(t - 1).unwrap(), &mut rng).unwrap();
        let eps = rng.randn(&[n, 1], DType::F64, &dev).unwrap();
        let z = dt_step(&sched, t, &u, &z_prev, Some(&eps)).unwrap();
        let v: Vec<f64> = z.flatten_all().unwrap().to_vec1().unwrap();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let want_mean = sched.alpha_bar(t).unwrap().sqrt() * u_val;
        let want_var = 1.0 - sched.alpha_bar(t).unwrap();
        // Standard errors: sqrt(var/n) for the mean, var*sqrt(2/n) for the variance; allow 5 of them.
        assert!(
            (mean - want_mean).abs() < 5.0 * (want_var / n as f64).sqrt() + 1e-9,
            "t={t} mean {mean} vs {want_mean}"
        );
        assert!(
            (var - want_var).abs() < 5.0 * want_var * (2.0 / n as f64).sqrt() + 1e-9,
            "t={t} var {var} vs {want_var}"
        );
    }
}

#[test]
fn kl_matches_gaussian_formula() {
    // KL(N(mu, s2 I) || N(0, I)) = 0.5 sum_j (mu_j^2 + s2 - 1 - ln s2), mu = sqrt(abar0) u, s2 = 1 - abar0.
    let dev = Device::Cpu;
    let rows = [[0.5f64, -1.0, 2.0], [0.0, 0.3, 0.1]];
    let u = Tensor::new(&rows, &dev).unwrap();
    let abar0 = 0.2;
    let got = kl_prior(&u, abar0).unwrap().to_scalar::<f64>().unwrap();
    let mut want = 0.0;
    for r in rows {
        for x in r {
            let mu2 = abar0 * x * x;
            let s2 = 1.0 - abar0;
            want += 0.5 * (mu2 + s2 - 1.0 - s2.ln());
        }
    }
    want /= 2.0;
    assert!(close(got, want, 1e-12), "{got} vs {want}");
    // One-hot with abar0 ~ 0 gives KL ~ 0 (the reference's assumption).
    let eye = Tensor::eye(10, DType::F64, &dev).unwrap();
    assert!(
        kl_prior(&eye, 1e-33)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .abs()
            < 1e-12
    );
}

#[test]
fn losses_match_hand_computation() {
    let dev = Device::Cpu;
    let logits = Tensor::new(&[[1.0f64, 2.0, 0.5], [0.0, 0.0, 3.0]], &dev).unwrap();
    let y = Tensor::new(&[1u32, 0], &dev).unwrap();
    let ce = cross_entropy(&logits, &y)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let lse0 = (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln();
    let lse1 = (1.0 + 1.0 + 3f64.exp()).ln();
    let want = ((lse0 - 2.0) + (lse1 - 0.0)) / 2.0;
    assert!(close(ce, want, 1e-12));

    let uhat = Tensor::new(&[[0.2f64, 0.8], [0.5, 0.5]], &dev).unwrap();
    let u = Tensor::new(&[[0.0f64, 1.0], [1.0, 0.0]], &dev).unwrap();
    let w = 1.5;
    let got = denoise_loss(&uhat, &u, w)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    // Row 0: 0.04 + 0.04 = 0.08; row 1: 0.25 + 0.25 = 0.5; mean 0.29.
    assert!(close(got, 1.5 * 0.29, 1e-12));

    let parts = dt_loss(&logits, &y, &uhat, &u, 0.0, w).unwrap();
    let total = parts.total.to_scalar::<f64>().unwrap();
    assert!(close(total, want + 1.5 * 0.29, 1e-12));
    // Shape errors are typed, not panics.
    let bad = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
    assert!(matches!(
        denoise_loss(&bad, &u, 1.0),
        Err(CoreError::Shape { .. })
    ));
}

#[test]
fn losses_are_invariant_to_batch_order() {
    let dev = Device::Cpu;
    let mut rng = NoiseRng::new(3);
    let uhat = rng.randn(&[6, 4], DType::F64, &dev).unwrap();
    let u = rng.randn(&[6, 4], DType::F64, &dev).unwrap();
    let perm = Tensor::new(&[5u32, 2, 0, 4, 1, 3], &dev).unwrap();
    let a = denoise_loss(&uhat, &u, 2.0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let b = denoise_loss(
        &uhat.index_select(&perm, 0).unwrap(),
        &u.index_select(&perm, 0).unwrap(),
        2.0,
    )
    .unwrap()
    .to_scalar::<f64>()
    .unwrap();
    assert!(close(a, b, 1e-12));
}

struct Oracle {
    u: Tensor,
}

impl Denoiser for Oracle {
    fn blocks(&self) -> usize {
        10
    }
    fn latent_dim(&self) -> usize {
        self.u.dim(1).unwrap()
    }
    fn denoise(&self, _t: usize, _z: &Tensor, _x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.u.clone())
    }
}

#[test]
fn sampler_with_perfect_denoiser_reaches_the_label() {
    // With uhat = u_y the deterministic sampler ends at ~sqrt(abar_T) u_y plus a
    // vanishing multiple of z_0, and the stochastic one within sqrt(1 - abar_T).
    let dev = Device::Cpu;
    let u = Tensor::eye(10, DType::F64, &dev).unwrap();
    let sched = DiscreteSchedule::cosine(10, 0.008, 1.0 - 1e-4).unwrap();
    let x = Tensor::zeros((10, 1), DType::F64, &dev).unwrap();
    let oracle = Oracle { u: u.clone() };
    for mode in [Inference::Deterministic, Inference::Stochastic] {
        let z = sample_dt(&oracle, &sched, &x, mode, &mut NoiseRng::new(1)).unwrap();
        let err = (z - &u)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(err < 0.06, "{mode:?}: {err}");
    }
    // Same seed, same draws.
    let a = sample_dt(
        &oracle,
        &sched,
        &x,
        Inference::Stochastic,
        &mut NoiseRng::new(5),
    )
    .unwrap();
    let b = sample_dt(
        &oracle,
        &sched,
        &x,
        Inference::Stochastic,
        &mut NoiseRng::new(5),
    )
    .unwrap();
    assert_eq!(a.to_vec2::<f64>().unwrap(), b.to_vec2::<f64>().unwrap());
}

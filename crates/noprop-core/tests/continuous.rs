//! Continuous-time schedules: monotonicity, exact endpoints, derivatives
//! against finite differences and autograd, checkpointing, and the limit that
//! connects the DT loss weights to the CT ones (eq. 59-60).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use noprop_core::*;
use proptest::prelude::*;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

fn tvec(v: &[f64], dtype: DType) -> Tensor {
    Tensor::new(v, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

/// A learnable schedule whose raw parameters are `scale * N(0, 1)` draws and
/// whose endpoints are `gamma0` and `gamma0 + softplus(gap_raw)`.
fn random_schedule(
    seed: u64,
    hidden: usize,
    scale: f64,
    gamma0: f64,
    gap_raw: f64,
    dtype: DType,
) -> LearnableSchedule {
    let cfg = LearnableScheduleConfig {
        hidden,
        ..Default::default()
    };
    let sched =
        LearnableSchedule::new(&cfg, dtype, &Device::Cpu, &mut NoiseRng::new(seed)).unwrap();
    let mut rng = NoiseRng::new(seed ^ 0xABCD);
    let mut map = BTreeMap::new();
    for name in ["schedule.b1", "schedule.w1", "schedule.w2"] {
        let t = (rng.randn(&[hidden], DType::F64, &Device::Cpu).unwrap() * scale).unwrap();
        map.insert(name.to_string(), t);
    }
    map.insert("schedule.gamma0".into(), tvec(&[gamma0], DType::F64));
    map.insert("schedule.gamma_gap".into(), tvec(&[gap_raw], DType::F64));
    sched.load(&map).unwrap();
    sched
}

fn grid(n: usize) -> Vec<f64> {
    (0..=n).map(|k| k as f64 / n as f64).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn learnable_schedule_is_monotone(
        seed in any::<u64>(),
        hidden in 1usize..24,
        scale in 0.1f64..3.0,
        gamma0 in -12.0f64..2.0,
        gap_raw in -1.0f64..20.0,
    ) {
        let ts = grid(100);
        // Host path, f64: alpha-bar strictly increasing, SNR' >= 0.
        let f64_sched = random_schedule(seed, hidden, scale, gamma0, gap_raw, DType::F64);
        let mut prev = -1.0;
        for &t in &ts {
            let a = f64_sched.alpha_bar_at(t).unwrap();
            prop_assert!(a > prev, "alpha_bar not increasing at t={t}: {a} <= {prev}");
            prop_assert!((0.0..1.0).contains(&a));
            prop_assert!(f64_sched.snr_derivative_at(t).unwrap() >= 0.0);
            prev = a;
        }
        // Tensor paths, f64 and f32: SNR' >= 0 exactly, alpha-bar non-decreasing,
        // and the f64 tensors agree with the host.
        let t = tvec(&ts, DType::F64);
        let abar = to_f64(&f64_sched.alpha_bar(&t).unwrap());
        for (k, &tk) in ts.iter().enumerate() {
            prop_assert!(close(abar[k], f64_sched.alpha_bar_at(tk).unwrap(), 1e-12));
        }
        for dtype in [DType::F32, DType::F64] {
            let sched = random_schedule(seed, hidden, scale, gamma0, gap_raw, dtype);
            let t = tvec(&ts, dtype);
            let sp = to_f64(&sched.snr_derivative(&t).unwrap());
            prop_assert!(sp.iter().all(|&v| v >= 0.0), "SNR' < 0 in {dtype:?}: {sp:?}");
            let dg = to_f64(&sched.gamma_derivative(&t).unwrap());
            prop_assert!(dg.iter().all(|&v| v <= 0.0));
            let a = to_f64(&sched.alpha_bar(&t).unwrap());
            prop_assert!(a.windows(2).all(|w| w[1] >= w[0]), "alpha_bar decreasing in {dtype:?}");
        }
    }

    #[test]
    fn learnable_endpoints_are_exact(
        seed in any::<u64>(),
        hidden in 1usize..24,
        scale in 0.1f64..3.0,
        gamma0 in -12.0f64..2.0,
        gap_raw in -1.0f64..20.0,
    ) {
        let host = random_schedule(seed, hidden, scale, gamma0, gap_raw, DType::F64);
        prop_assert_eq!(host.gamma_at(0.0).unwrap(), host.gamma1().unwrap());
        prop_assert_eq!(host.gamma_at(1.0).unwrap(), host.gamma0().unwrap());
        for dtype in [DType::F32, DType::F64] {
            let sched = random_schedule(seed, hidden, scale, gamma0, gap_raw, dtype);
            let g = to_f64(&sched.gamma(&tvec(&[0.0, 0.3, 1.0, 0.0], dtype)).unwrap());
            let (g0, g1) = sched.gamma_endpoints().unwrap();
            let (g0, g1) = (to_f64(&g0)[0], to_f64(&g1)[0]);
            prop_assert_eq!(g[0], g1);
            prop_assert_eq!(g[3], g1);
            prop_assert_eq!(g[2], g0);
            prop_assert!(g[1] < g1 && g[1] > g0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// `points` computes the whole grid from one `gamma_table` call; every
    /// value must be bit-equal to the matching `*_at` method's.
    #[test]
    fn points_equal_the_per_time_methods(
        seed in any::<u64>(),
        hidden in 1usize..24,
        scale in 0.1f64..3.0,
        gamma0 in -12.0f64..2.0,
        gap_raw in -1.0f64..20.0,
    ) {
        let ts = grid(37);
        let learned = random_schedule(seed, hidden, scale, gamma0, gap_raw, DType::F32);
        let fixed = FixedLinearGamma::new(gamma0, gamma0 + 1.0 + gap_raw.abs()).unwrap();
        let scheds: [&dyn ContinuousSchedule; 2] = [&learned, &fixed];
        for sched in scheds {
            let points = sched.points(&ts).unwrap();
            prop_assert_eq!(points.len(), ts.len());
            for (p, &t) in points.iter().zip(&ts) {
                prop_assert_eq!(p.t, t);
                prop_assert_eq!(p.gamma, sched.gamma_at(t).unwrap());
                prop_assert_eq!(p.gamma_derivative, sched.gamma_derivative_at(t).unwrap());
                prop_assert_eq!(p.alpha_bar, sched.alpha_bar_at(t).unwrap());
                prop_assert_eq!(p.snr, sched.snr_at(t).unwrap());
                prop_assert_eq!(p.snr_derivative, sched.snr_derivative_at(t).unwrap());
            }
        }
    }
}

#[test]
fn fixed_linear_gamma_values() {
    let s = FixedLinearGamma::new(-5.0, 3.0).unwrap();
    let g = to_f64(&s.gamma(&tvec(&[0.0, 0.25, 1.0], DType::F64)).unwrap());
    assert_eq!(g, vec![3.0, 1.0, -5.0]);
    assert_eq!(s.gamma_at(0.25).unwrap(), 1.0);
    assert_eq!(s.gamma_derivative_at(0.7).unwrap(), -8.0);
    // alpha_bar = sigmoid(-gamma), SNR = exp(-gamma), SNR' = 8 exp(-gamma).
    let t = tvec(&[0.25], DType::F64);
    let abar = to_f64(&s.alpha_bar(&t).unwrap())[0];
    assert!(close(abar, 1.0 / (1.0 + 1f64.exp()), 1e-15));
    let om = to_f64(&s.one_minus_alpha_bar(&t).unwrap())[0];
    assert!(close(om, 1.0 - abar, 1e-15));
    assert!(close(to_f64(&s.snr(&t).unwrap())[0], (-1f64).exp(), 1e-15));
    assert!(close(
        to_f64(&s.snr_derivative(&t).unwrap())[0],
        8.0 * (-1f64).exp(),
        1e-15
    ));
    assert!(close(
        s.snr_derivative_at(0.25).unwrap(),
        8.0 * (-1f64).exp(),
        1e-15
    ));
    assert!(close(s.alpha_bar_at(0.25).unwrap(), abar, 1e-15));
    // 1 - alpha_bar stays accurate where subtraction would round to zero in f32.
    let far = FixedLinearGamma::new(-30.0, 7.0).unwrap();
    let om = to_f64(&far.one_minus_alpha_bar(&tvec(&[1.0], DType::F32)).unwrap())[0];
    assert!(close(om, (-30f64).exp(), 1e-5), "{om}");
    assert!(FixedLinearGamma::new(1.0, 1.0).is_err());
    assert!(FixedLinearGamma::new(f64::NAN, 1.0).is_err());
    let d = FixedLinearGamma::default();
    assert_eq!((d.gamma0(), d.gamma1()), (-7.0, 7.0));
}

#[test]
fn gamma_derivative_matches_finite_differences() {
    let h = 1e-5;
    for seed in 0..5u64 {
        let sched = random_schedule(seed, 16, 1.5, -7.0, 14.0, DType::F64);
        let ts: Vec<f64> = (1..20).map(|k| k as f64 / 20.0).collect();
        let analytic = to_f64(&sched.gamma_derivative(&tvec(&ts, DType::F64)).unwrap());
        for (k, &t) in ts.iter().enumerate() {
            let fd = (sched.gamma_at(t + h).unwrap() - sched.gamma_at(t - h).unwrap()) / (2.0 * h);
            let host = sched.gamma_derivative_at(t).unwrap();
            assert!(close(host, fd, 1e-7), "seed {seed} t={t}: {host} vs {fd}");
            assert!(close(analytic[k], host, 1e-12), "seed {seed} t={t}");
            // SNR' by finite differences too.
            let fd_snr = (sched.snr_at(t + h).unwrap() - sched.snr_at(t - h).unwrap()) / (2.0 * h);
            assert!(close(sched.snr_derivative_at(t).unwrap(), fd_snr, 1e-7));
        }
        // Autograd through the tensor gamma with respect to t agrees as well.
        let tv = Var::new(ts.as_slice(), &Device::Cpu).unwrap();
        let g = sched.gamma(tv.as_tensor()).unwrap().sum_all().unwrap();
        let grads = g.backward().unwrap();
        let dt = to_f64(grads.get(tv.as_tensor()).unwrap());
        for k in 0..ts.len() {
            assert!(
                close(dt[k], analytic[k], 1e-10),
                "autograd {} vs {}",
                dt[k],
                analytic[k]
            );
        }
    }
}

#[test]
fn snr_derivative_reaches_schedule_parameters() {
    let sched = LearnableSchedule::new(
        &Default::default(),
        DType::F32,
        &Device::Cpu,
        &mut NoiseRng::new(3),
    )
    .unwrap();
    let t = tvec(&[0.1, 0.5, 0.9], DType::F32);
    let loss = (sched.snr_derivative(&t).unwrap().sum_all().unwrap()
        + sched.alpha_bar(&t).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in sched.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let g = g.flatten_all().unwrap();
        assert!(to_f64(&g).iter().all(|v| v.is_finite()), "{name}");
        assert!(
            to_f64(&g).iter().any(|&v| v != 0.0),
            "{name} has zero gradient"
        );
    }
}

#[test]
fn initial_learnable_schedule_is_near_configured() {
    let cfg = LearnableScheduleConfig::default();
    let sched =
        LearnableSchedule::new(&cfg, DType::F32, &Device::Cpu, &mut NoiseRng::new(0)).unwrap();
    assert_eq!(sched.hidden(), 64);
    assert!(close(sched.gamma0().unwrap(), -7.0, 1e-6));
    assert!(close(sched.gamma1().unwrap(), 7.0, 1e-6));
    // t = 0 is noisy, t = 1 is clean.
    assert!(sched.alpha_bar_at(0.0).unwrap() < 1e-3);
    assert!(sched.alpha_bar_at(1.0).unwrap() > 0.999);
    // The same seed gives the same parameters.
    let again =
        LearnableSchedule::new(&cfg, DType::F32, &Device::Cpu, &mut NoiseRng::new(0)).unwrap();
    assert_eq!(sched.gamma_at(0.37).unwrap(), again.gamma_at(0.37).unwrap());
    let bad = LearnableScheduleConfig {
        hidden: 0,
        ..cfg.clone()
    };
    assert!(matches!(
        LearnableSchedule::new(&bad, DType::F32, &Device::Cpu, &mut NoiseRng::new(0)),
        Err(CoreError::Schedule(ScheduleError::BadParameter {
            name: "hidden",
            ..
        }))
    ));
    let bad = LearnableScheduleConfig { gamma0: 8.0, ..cfg };
    assert!(LearnableSchedule::new(&bad, DType::F32, &Device::Cpu, &mut NoiseRng::new(0)).is_err());
}

#[test]
fn vars_and_load_round_trip() {
    let a = LearnableSchedule::new(
        &Default::default(),
        DType::F32,
        &Device::Cpu,
        &mut NoiseRng::new(1),
    )
    .unwrap();
    let b = LearnableSchedule::new(
        &Default::default(),
        DType::F32,
        &Device::Cpu,
        &mut NoiseRng::new(2),
    )
    .unwrap();
    let names: Vec<String> = a.vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "schedule.b1",
            "schedule.gamma0",
            "schedule.gamma_gap",
            "schedule.w1",
            "schedule.w2"
        ]
    );
    assert_ne!(a.gamma_at(0.5).unwrap(), b.gamma_at(0.5).unwrap());
    let map: BTreeMap<String, Tensor> = a
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect();
    b.load(&map).unwrap();
    assert_eq!(a.gamma_at(0.5).unwrap(), b.gamma_at(0.5).unwrap());

    let mut missing = map.clone();
    missing.remove("schedule.w2");
    assert!(
        matches!(b.load(&missing), Err(CoreError::MissingParameter { name }) if name == "schedule.w2")
    );
    let mut wrong = map.clone();
    wrong.insert(
        "schedule.b1".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        b.load(&wrong),
        Err(CoreError::ParameterShape { .. })
    ));
    // A failed load changes nothing.
    assert_eq!(a.gamma_at(0.5).unwrap(), b.gamma_at(0.5).unwrap());
}

/// eq. 59-60: on the grid t_k = k/T built from a continuous schedule,
/// `T (SNR(t_k) - SNR(t_{k-1})) -> SNR'(t)`, so the DT weights
/// `T eta/2 (SNR(t) - SNR(t-1))` approach the CT weight `eta/2 SNR'(t)`, and
/// the mean over blocks of the DT denoising terms approaches the CT loss.
#[test]
fn dt_weights_converge_to_ct_weight() {
    let eta = 0.7;
    let learnable = random_schedule(11, 8, 1.0, -7.0, 14.0, DType::F64);
    let fixed = FixedLinearGamma::default();
    let schedules: [&dyn ContinuousSchedule; 2] = [&fixed, &learnable];
    for sched in schedules {
        let mut prev_err = f64::INFINITY;
        for t_max in [100usize, 1000, 10000] {
            let abar: Vec<f64> = (0..=t_max)
                .map(|k| sched.alpha_bar_at(k as f64 / t_max as f64).unwrap())
                .collect();
            let dt = DiscreteSchedule::from_alpha_bar(abar).unwrap();
            let mut worst: f64 = 0.0;
            for frac in [0.1, 0.25, 0.5, 0.75, 1.0] {
                let k = (frac * t_max as f64).round() as usize;
                let want = eta / 2.0 * sched.snr_derivative_at(k as f64 / t_max as f64).unwrap();
                let got = dt.dt_weight(k, eta).unwrap();
                worst = worst.max((got - want).abs() / want);
            }
            // The backward difference is first-order accurate.
            assert!(
                worst < 30.0 / t_max as f64,
                "T={t_max}: relative error {worst}"
            );
            assert!(worst < prev_err);
            prev_err = worst;
        }
    }

    // Whole-loss version with an error that depends on t, e(t) = 1 + t^2:
    // (1/T) sum_k DT term of block k  ->  E_t[CT term] = eta/2 int SNR'(t) e(t) dt.
    let sched = &fixed;
    let t_max = 4000;
    let e = |t: f64| 1.0 + t * t;
    let abar: Vec<f64> = (0..=t_max)
        .map(|k| sched.alpha_bar_at(k as f64 / t_max as f64).unwrap())
        .collect();
    let dt = DiscreteSchedule::from_alpha_bar(abar).unwrap();
    let u = tvec(&[0.0, 0.0], DType::F64).reshape((1, 2)).unwrap();
    let mut dt_mean = 0.0;
    for k in 1..=t_max {
        // ||uhat - u||^2 = e(t_k) with uhat = (sqrt(e), 0).
        let uhat = tvec(&[e(k as f64 / t_max as f64).sqrt(), 0.0], DType::F64)
            .reshape((1, 2))
            .unwrap();
        let term = denoise_loss(&uhat, &u, dt.dt_weight(k, eta).unwrap()).unwrap();
        dt_mean += term.to_scalar::<f64>().unwrap() / t_max as f64;
    }
    // The CT loss over a batch of midpoints t_i is the midpoint rule of the integral.
    let n = 4000;
    let ts: Vec<f64> = (0..n).map(|i| (i as f64 + 0.5) / n as f64).collect();
    let t = tvec(&ts, DType::F64);
    let mut rows = Vec::with_capacity(2 * n);
    for &ti in &ts {
        rows.extend([e(ti).sqrt(), 0.0]);
    }
    let uhat = Tensor::from_vec(rows, (n, 2), &Device::Cpu).unwrap();
    let zeros = Tensor::zeros((n, 2), DType::F64, &Device::Cpu).unwrap();
    let ct = ct_denoise_loss(&uhat, &zeros, &sched.snr_derivative(&t).unwrap(), eta)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(close(dt_mean, ct, 2e-3), "DT mean {dt_mean} vs CT {ct}");
}

//! NoProp-CT and NoProp-FM: losses against hand values and finite
//! differences, q-sampling marginals, samplers with perfect networks, the ODE
//! solvers' accuracy, nearest-embedding and radial class probabilities.

use std::cell::Cell;

use candle_core::{DType, Device, Tensor, Var};
use noprop_core::*;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

fn mat(rows: &[&[f64]]) -> Tensor {
    let d = rows[0].len();
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu).unwrap()
}

fn vec1(v: &[f64]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

#[test]
fn ct_loss_matches_hand_computation() {
    let logits = mat(&[&[1.0, 0.0], &[0.0, 2.0]]);
    let targets = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
    let u = mat(&[&[1.0, 0.0], &[0.0, 1.0]]);
    let uhat = mat(&[&[0.5, 0.5], &[0.0, 0.0]]);
    let snr_prime = vec1(&[2.0, 3.0]);
    let abar0 = vec1(&[0.1]);
    let eta = 0.5;
    let l = ct_loss(&logits, &targets, &uhat, &u, &snr_prime, &abar0, eta).unwrap();
    // ||uhat - u||^2 = [0.5, 1.0]; eta/(2B) sum SNR' ||.||^2 = 0.5/4 (2*0.5 + 3*1) = 0.5.
    assert!(close(scalar(&l.denoise), 0.5, 1e-14));
    let ce = 0.5 * ((1.0 + (-1f64).exp()).ln() + (1.0 + (-2f64).exp()).ln());
    assert!(close(scalar(&l.cross_entropy), ce, 1e-14));
    // The tensor KL agrees with the f64 one used by NoProp-DT.
    let kl = scalar(&kl_prior(&u, 0.1).unwrap());
    assert!(close(scalar(&l.kl), kl, 1e-14));
    let by_hand = 0.5 * (0.1 * 1.0 + 2.0 * 0.9 - 2.0 - 2.0 * 0.9f64.ln());
    assert!(close(kl, by_hand, 1e-14));
    assert!(close(scalar(&l.total), ce + kl + 0.5, 1e-14));
    // A scalar abar0 works too; wrong shapes are errors.
    assert!(kl_prior_tensor(&u, &Tensor::new(0.1f64, &Device::Cpu).unwrap()).is_ok());
    assert!(ct_loss(&logits, &targets, &uhat, &u, &vec1(&[1.0]), &abar0, eta).is_err());
    assert!(ct_loss(
        &logits,
        &targets,
        &uhat,
        &u,
        &snr_prime,
        &vec1(&[0.1, 0.2]),
        eta
    )
    .is_err());
}

#[test]
fn ct_loss_is_invariant_to_batch_order() {
    let mut rng = NoiseRng::new(5);
    let cpu = &Device::Cpu;
    let logits = rng.randn(&[6, 3], DType::F64, cpu).unwrap();
    let uhat = rng.randn(&[6, 3], DType::F64, cpu).unwrap();
    let u = rng.randn(&[6, 3], DType::F64, cpu).unwrap();
    let sp = rng.uniform(&[6], 0.0, 5.0, DType::F64, cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 0, 1, 2], cpu).unwrap();
    let abar0 = vec1(&[0.01]);
    let perm = Tensor::new(&[5u32, 3, 0, 1, 4, 2], cpu).unwrap();
    let p = |t: &Tensor| t.index_select(&perm, 0).unwrap();
    let a = ct_loss(&logits, &y, &uhat, &u, &sp, &abar0, 1.0).unwrap();
    let b = ct_loss(&p(&logits), &p(&y), &p(&uhat), &p(&u), &p(&sp), &abar0, 1.0).unwrap();
    assert!(close(scalar(&a.total), scalar(&b.total), 1e-13));
}

/// Finite differences in f64 of the whole CT loss with respect to the
/// schedule's parameters and the prediction, through q-sampling, SNR' and the
/// KL term's alpha-bar(0).
#[test]
fn ct_loss_gradients_match_finite_differences() {
    let cpu = &Device::Cpu;
    let cfg = LearnableScheduleConfig {
        hidden: 6,
        ..Default::default()
    };
    let sched = LearnableSchedule::new(&cfg, DType::F64, cpu, &mut NoiseRng::new(8)).unwrap();
    let mut rng = NoiseRng::new(9);
    let (b, d, m) = (4, 3, 3);
    let u = rng.randn(&[b, d], DType::F64, cpu).unwrap();
    let eps = rng.randn(&[b, d], DType::F64, cpu).unwrap();
    let eps1 = rng.randn(&[b, d], DType::F64, cpu).unwrap();
    let head = rng.randn(&[d, m], DType::F64, cpu).unwrap();
    let t = vec1(&[0.1, 0.4, 0.6, 0.95]);
    let y = Tensor::new(&[0u32, 2, 1, 1], cpu).unwrap();
    let uhat = Var::from_tensor(&rng.randn(&[b, d], DType::F64, cpu).unwrap()).unwrap();
    let eta = 1.3;

    let loss = || -> Tensor {
        let z = q_sample_ct_with(&sched, &u, &t, &eps).unwrap();
        // The "network" mixes z into its prediction so z's gradient path is used.
        let pred = (uhat.as_tensor() + (&z * 0.3).unwrap()).unwrap();
        let z1 = q_sample_ct_with(&sched, &u, &vec1(&[1.0; 4]), &eps1).unwrap();
        let logits = z1.matmul(&head).unwrap();
        let sp = sched.snr_derivative(&t).unwrap();
        let abar0 = sched.alpha_bar(&vec1(&[0.0])).unwrap();
        ct_loss(&logits, &y, &pred, &u, &sp, &abar0, eta)
            .unwrap()
            .total
    };
    let grads = loss().backward().unwrap();
    let mut vars = sched.vars();
    vars.push(("uhat".into(), uhat.clone()));
    let h = 1e-6;
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in 0..base.len().min(4) {
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                var.set(&Tensor::from_vec(p, var.dims(), cpu).unwrap())
                    .unwrap();
                scalar(&loss())
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), cpu).unwrap())
                .unwrap();
            assert!(
                close(g[i], fd, 1e-5),
                "{name}[{i}]: autograd {} vs fd {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn q_sample_ct_has_the_right_marginals() {
    let sched = FixedLinearGamma::default();
    let n = 20000;
    let u = Tensor::ones((n, 1), DType::F64, &Device::Cpu).unwrap();
    let ts = vec![0.3; n];
    let mut rng = NoiseRng::new(4);
    let z = q_sample_ct(
        &sched,
        &u,
        &Tensor::new(ts.as_slice(), &Device::Cpu).unwrap(),
        &mut rng,
    )
    .unwrap();
    let z: Vec<f64> = z.flatten_all().unwrap().to_vec1().unwrap();
    let mean = z.iter().sum::<f64>() / n as f64;
    let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
    let abar = sched.alpha_bar_at(0.3).unwrap();
    assert!(
        (mean - abar.sqrt()).abs() < 0.03,
        "{mean} vs {}",
        abar.sqrt()
    );
    assert!((var - (1.0 - abar)).abs() < 0.05, "{var} vs {}", 1.0 - abar);
    // Exact values at given noise: t = 0 and t = 1 rows.
    let u = mat(&[&[2.0], &[2.0]]);
    let eps = mat(&[&[1.0], &[1.0]]);
    let z = rows(&q_sample_ct_with(&sched, &u, &vec1(&[0.0, 1.0]), &eps).unwrap());
    for (row, t) in z.iter().zip([0.0, 1.0]) {
        let a = sched.alpha_bar_at(t).unwrap();
        assert!(close(row[0], 2.0 * a.sqrt() + (1.0 - a).sqrt(), 1e-14));
    }
    let t = sample_t(1000, DType::F32, &Device::Cpu, &mut rng).unwrap();
    let t: Vec<f32> = t.to_vec1().unwrap();
    assert!(t.iter().all(|&v| (0.0..1.0).contains(&v)));
    assert!((t.iter().sum::<f32>() / 1000.0 - 0.5).abs() < 0.05);
}

/// A denoiser that always returns the true embeddings, and counts its calls.
struct Perfect {
    u: Tensor,
    calls: Cell<usize>,
}

impl ContinuousDenoiser for Perfect {
    fn latent_dim(&self) -> usize {
        self.u.dim(1).unwrap()
    }
    fn denoise(&self, z: &Tensor, _x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        assert_eq!(t.dims(), &[z.dim(0)?]);
        self.calls.set(self.calls.get() + 1);
        Ok(self.u.clone())
    }
}

fn one_hot_setup() -> (Tensor, Tensor, Tensor) {
    let w = Tensor::eye(5, DType::F64, &Device::Cpu).unwrap();
    let labels = Tensor::new(&[3u32, 0, 4, 1, 2, 3], &Device::Cpu).unwrap();
    let u = w.index_select(&labels, 0).unwrap();
    (w, labels, u)
}

#[test]
fn ct_eq3_sampler_with_perfect_denoiser_reaches_the_label() {
    let (w, labels, u) = one_hot_setup();
    let x = Tensor::zeros((6, 1), DType::F64, &Device::Cpu).unwrap();
    let den = Perfect {
        u: u.clone(),
        calls: Cell::new(0),
    };
    let sched = FixedLinearGamma::default();
    let a1 = sched.alpha_bar_at(1.0).unwrap();
    let mut rng = NoiseRng::new(1);
    let z = sample_ct_eq3(&den, &sched, &x, 1000, Inference::Deterministic, &mut rng).unwrap();
    assert_eq!(den.calls.get(), 1000);
    let target = (&u * a1.sqrt()).unwrap();
    let err = (z.clone() - &target)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(scalar(&err) < 1e-2, "deterministic error {}", scalar(&err));
    for mode in [Inference::Deterministic, Inference::Stochastic] {
        let z = sample_ct_eq3(&den, &sched, &x, 1000, mode, &mut rng).unwrap();
        let pred: Vec<u32> = nearest_embedding(&z, &w).unwrap().to_vec1().unwrap();
        assert_eq!(pred, labels.to_vec1::<u32>().unwrap(), "{mode:?}");
    }
    // The learnable schedule works as well, with fewer steps.
    let learn = LearnableSchedule::new(
        &Default::default(),
        DType::F32,
        &Device::Cpu,
        &mut NoiseRng::new(2),
    )
    .unwrap();
    let z = sample_ct_eq3(&den, &learn, &x, 50, Inference::Stochastic, &mut rng).unwrap();
    let pred: Vec<u32> = nearest_embedding(&z, &w).unwrap().to_vec1().unwrap();
    assert_eq!(pred, labels.to_vec1::<u32>().unwrap());
    assert!(sample_ct_eq3(&den, &sched, &x, 0, Inference::Stochastic, &mut rng).is_err());
}

#[test]
fn ct_ode_with_perfect_denoiser_matches_closed_form() {
    let (w, labels, u) = one_hot_setup();
    let x = Tensor::zeros((6, 1), DType::F64, &Device::Cpu).unwrap();
    let den = Perfect {
        u: u.clone(),
        calls: Cell::new(0),
    };
    let learn = LearnableSchedule::new(
        &Default::default(),
        DType::F64,
        &Device::Cpu,
        &mut NoiseRng::new(2),
    )
    .unwrap();
    let fixed = FixedLinearGamma::default();
    let schedules: [&dyn ContinuousSchedule; 2] = [&fixed, &learn];
    for sched in schedules {
        let (a0, a1) = (
            sched.alpha_bar_at(0.0).unwrap(),
            sched.alpha_bar_at(1.0).unwrap(),
        );
        for (solver, steps, tol) in [(OdeSolver::Euler, 1000, 2e-3), (OdeSolver::Heun, 100, 2e-4)] {
            let rng = NoiseRng::new(7);
            // The sampler's first draw is z_0; replay it.
            let z0 = rng
                .clone()
                .randn(&[6, 5], DType::F64, &Device::Cpu)
                .unwrap();
            let z1 = sample_ct_ode(&den, sched, &x, steps, solver, &mut rng.clone()).unwrap();
            // z_1 = sqrt(a1) u + sqrt((1 - a1)/(1 - a0)) (z_0 - sqrt(a0) u).
            let want = ((&u * a1.sqrt()).unwrap()
                + ((&z0 - (&u * a0.sqrt()).unwrap()).unwrap() * ((1.0 - a1) / (1.0 - a0)).sqrt())
                    .unwrap())
            .unwrap();
            let err = scalar(
                &(z1.clone() - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap(),
            );
            assert!(err < tol, "{solver:?}: error {err}");
            let pred: Vec<u32> = nearest_embedding(&z1, &w).unwrap().to_vec1().unwrap();
            assert_eq!(pred, labels.to_vec1::<u32>().unwrap());
        }
    }
}

#[test]
fn fm_helpers_match_hand_values() {
    let z0 = mat(&[&[1.0, -1.0], &[0.0, 2.0]]);
    let z1 = mat(&[&[0.0, 1.0], &[1.0, 0.0]]);
    let t = vec1(&[0.25, 1.0]);
    assert_eq!(
        rows(&fm_target(&z0, &z1).unwrap()),
        vec![vec![-1.0, 2.0], vec![1.0, -2.0]]
    );
    let mut rng = NoiseRng::new(0);
    let zt = fm_interpolate(&z0, &z1, &t, 0.0, &mut rng).unwrap();
    // 0.25 z1 + 0.75 z0 = (0.75, -0.5); t = 1 gives z1 exactly.
    assert_eq!(rows(&zt), vec![vec![0.75, -0.5], vec![1.0, 0.0]]);
    let eps = mat(&[&[1.0, 2.0], &[3.0, 4.0]]);
    let noisy = fm_interpolate_with(&z0, &z1, &t, 0.5, Some(&eps)).unwrap();
    assert_eq!(rows(&noisy), vec![vec![1.25, 0.5], vec![2.5, 2.0]]);
    assert!(fm_interpolate_with(&z0, &z1, &t, -1.0, None).is_err());
    // sigma = 0 draws nothing; sigma > 0 draws.
    let mut fresh = NoiseRng::new(0);
    let before = fresh.clone().randn(&[1], DType::F64, &Device::Cpu).unwrap();
    fm_interpolate(&z0, &z1, &t, 0.0, &mut fresh).unwrap();
    assert_eq!(
        scalar(
            &fresh
                .randn(&[1], DType::F64, &Device::Cpu)
                .unwrap()
                .squeeze(0)
                .unwrap()
        ),
        scalar(&before.squeeze(0).unwrap())
    );

    // Extrapolation: z_t + (1 - t) v; with v = z1 - z0 it lands on z1.
    let v = fm_target(&z0, &z1).unwrap();
    assert_eq!(rows(&fm_extrapolate(&zt, &v, &t).unwrap()), rows(&z1));
    let v2 = mat(&[&[4.0, 0.0], &[1.0, 1.0]]);
    assert_eq!(
        rows(&fm_extrapolate(&zt, &v2, &t).unwrap()),
        vec![vec![3.75, -0.5], vec![1.0, 0.0]]
    );

    // Loss: (1/B) sum ||v - (z1 - z0)||^2 = ((5^2 + 2^2) + (0 + 3^2)) / 2 = 19.
    assert!(close(scalar(&fm_loss(&v2, &z0, &z1).unwrap()), 19.0, 1e-15));
    assert_eq!(scalar(&fm_loss(&v, &z0, &z1).unwrap()), 0.0);
    assert!(fm_loss(&vec1(&[1.0]), &z0, &z1).is_err());
}

/// `v = (u - z) / (1 - t)`: the exact velocity towards `u` along straight paths.
struct StraightTo(Tensor);
impl VelocityField for StraightTo {
    fn latent_dim(&self) -> usize {
        self.0.dim(1).unwrap()
    }
    fn velocity(&self, z: &Tensor, _x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let rest = t.affine(-1.0, 1.0)?.unsqueeze(1)?;
        (&self.0 - z)?.broadcast_div(&rest)
    }
}

/// `v = -z`, so `z(1) = exp(-1) z(0)`: a smooth field to measure solver order.
struct Decay;
impl VelocityField for Decay {
    fn latent_dim(&self) -> usize {
        3
    }
    fn velocity(&self, z: &Tensor, _x: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
        z.neg()
    }
}

#[test]
fn fm_sampler_reaches_the_label_and_solvers_have_their_order() {
    let (w, labels, u) = one_hot_setup();
    let x = Tensor::zeros((6, 1), DType::F64, &Device::Cpu).unwrap();
    // Euler on the straight field lands on u exactly (each step covers 1/(N-k) of the rest).
    let mut rng = NoiseRng::new(3);
    let z = sample_fm(&StraightTo(u.clone()), &x, 100, OdeSolver::Euler, &mut rng).unwrap();
    let err = scalar(&(z.clone() - &u).unwrap().abs().unwrap().max_all().unwrap());
    assert!(err < 1e-12, "{err}");
    let pred: Vec<u32> = nearest_embedding(&z, &w).unwrap().to_vec1().unwrap();
    assert_eq!(pred, labels.to_vec1::<u32>().unwrap());

    // On dz/dt = -z, Euler's error is about exp(-1) h / 2 and Heun's is O(h^2).
    let x = Tensor::zeros((4, 1), DType::F64, &Device::Cpu).unwrap();
    let n = 100;
    let rng = NoiseRng::new(5);
    let z0 = rng
        .clone()
        .randn(&[4, 3], DType::F64, &Device::Cpu)
        .unwrap();
    let want = (&z0 * (-1f64).exp()).unwrap();
    let rel = |z: &Tensor| {
        let e = scalar(&(z - &want).unwrap().sqr().unwrap().sum_all().unwrap()).sqrt();
        e / scalar(&want.sqr().unwrap().sum_all().unwrap()).sqrt()
    };
    let euler = rel(&sample_fm(&Decay, &x, n, OdeSolver::Euler, &mut rng.clone()).unwrap());
    let heun = rel(&sample_fm(&Decay, &x, n, OdeSolver::Heun, &mut rng.clone()).unwrap());
    let h = 1.0 / n as f64;
    assert!(euler > 0.3 * h && euler < h, "Euler relative error {euler}");
    assert!(heun < h * h, "Heun relative error {heun}");
    assert!(sample_fm(&Decay, &x, 0, OdeSolver::Heun, &mut rng.clone()).is_err());
}

#[test]
fn nearest_embedding_hand_case() {
    let w = mat(&[&[0.0, 0.0], &[3.0, 0.0], &[0.0, 3.0], &[10.0, 10.0]]);
    let z = mat(&[
        &[1.0, 1.0],
        &[2.0, 0.5],
        &[0.4, 2.0],
        &[6.0, 6.0],
        &[-5.0, -5.0],
    ]);
    let got: Vec<u32> = nearest_embedding(&z, &w).unwrap().to_vec1().unwrap();
    assert_eq!(got, vec![0, 1, 2, 3, 0]);
    assert!(nearest_embedding(&z, &mat(&[&[1.0, 2.0, 3.0]])).is_err());
    // f32 latents with f64 embeddings are accepted.
    let got: Vec<u32> = nearest_embedding(&z.to_dtype(DType::F32).unwrap(), &w)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, vec![0, 1, 2, 3, 0]);
}

#[test]
fn radial_probabilities_match_hand_computation() {
    let w = mat(&[&[1.0, 0.0], &[0.0, 1.0], &[2.0, 0.0]]);
    let ytilde = mat(&[&[1.0, 0.0], &[0.5, 0.5]]);
    for sigma in [1.0, 0.5] {
        let got = rows(&radial_log_probs(&ytilde, &w, sigma).unwrap());
        // Squared distances by hand: row 0 -> [0, 2, 1]; row 1 -> [0.5, 0.5, 2.5].
        for (row, d2) in got.iter().zip([[0.0, 2.0, 1.0], [0.5, 0.5, 2.5]]) {
            let s: Vec<f64> = d2.iter().map(|d| -d / (2.0 * sigma * sigma)).collect();
            let lse = s.iter().map(|v| v.exp()).sum::<f64>().ln();
            for k in 0..3 {
                assert!(
                    close(row[k], s[k] - lse, 1e-12),
                    "sigma {sigma}: {} vs {}",
                    row[k],
                    s[k] - lse
                );
            }
        }
    }
    assert!(radial_log_probs(&ytilde, &w, 0.0).is_err());
    assert!(ClassProbability::Radial { sigma: -1.0 }.validate().is_err());
    assert!(ClassProbability::default().validate().is_ok());

    // Through the enum: ytilde = softmax(logits) W_embed.
    let logits = mat(&[&[0.3, -1.0, 2.0], &[0.0, 0.0, 0.0]]);
    let p = rows(&log_softmax(&logits).unwrap());
    let soft = rows(&ClassProbability::Softmax.log_probs(&logits, &w).unwrap());
    assert_eq!(soft, p);
    let yt: Vec<Vec<f64>> = p
        .iter()
        .map(|r| {
            let q: Vec<f64> = r.iter().map(|v| v.exp()).collect();
            vec![q[0] + 2.0 * q[2], q[1]]
        })
        .collect();
    let yt = mat(&[&yt[0], &yt[1]]);
    let want = rows(&radial_log_probs(&yt, &w, 1.0).unwrap());
    let got = rows(
        &ClassProbability::Radial { sigma: 1.0 }
            .log_probs(&logits, &w)
            .unwrap(),
    );
    for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!(close(*a, *b, 1e-12));
    }
    // cross_entropy on normalised log-probabilities is the negative log-likelihood.
    let y = Tensor::new(&[2u32, 1], &Device::Cpu).unwrap();
    let lp = ClassProbability::Radial { sigma: 1.0 }
        .log_probs(&logits, &w)
        .unwrap();
    let nll = scalar(&cross_entropy(&lp, &y).unwrap());
    assert!(close(nll, -(got[0][2] + got[1][1]) / 2.0, 1e-12));
}

/// A network whose weight is a `Var`, as a trained model's are: every op on
/// it is recorded for back-propagation.
struct Tracked(Var);
impl ContinuousDenoiser for Tracked {
    fn latent_dim(&self) -> usize {
        self.0.dim(1).unwrap()
    }
    fn denoise(&self, z: &Tensor, _x: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
        z.matmul(self.0.as_tensor())
    }
}
impl VelocityField for Tracked {
    fn latent_dim(&self) -> usize {
        self.0.dim(1).unwrap()
    }
    fn velocity(&self, z: &Tensor, _x: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
        z.matmul(self.0.as_tensor())?.neg()
    }
}

/// The samplers hand back `z` without an autograd graph: were it kept, each
/// of the 1000 steps' activations would stay alive through `z` until the
/// end (a CT evaluation of 1000 images held 7 GB that way).
#[test]
fn samplers_keep_no_autograd_graph() {
    let w = Var::from_tensor(&(Tensor::eye(4, DType::F64, &Device::Cpu).unwrap() * 0.5).unwrap())
        .unwrap();
    let den = Tracked(w);
    let x = Tensor::zeros((3, 2), DType::F64, &Device::Cpu).unwrap();
    // The denoiser itself records its ops.
    let z = Tensor::ones((3, 4), DType::F64, &Device::Cpu).unwrap();
    assert!(ContinuousDenoiser::denoise_at(&den, &z, &x, 0.5)
        .unwrap()
        .track_op());
    let sched = FixedLinearGamma::default();
    let mut rng = NoiseRng::new(5);
    for mode in [Inference::Stochastic, Inference::Deterministic] {
        let z = sample_ct_eq3(&den, &sched, &x, 20, mode, &mut rng).unwrap();
        assert!(!z.track_op(), "eq3 ({mode:?})");
    }
    for solver in [OdeSolver::Euler, OdeSolver::Heun] {
        let z = sample_ct_ode(&den, &sched, &x, 20, solver, &mut rng).unwrap();
        assert!(!z.track_op(), "ct ode ({solver:?})");
        let z = sample_fm(&den, &x, 20, solver, &mut rng).unwrap();
        assert!(!z.track_op(), "fm ({solver:?})");
    }
}

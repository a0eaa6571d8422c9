//! The fidelity levers of issue 11: each config field has the paper's
//! literal reading as its default, round-trips through `config.json` (the validated `RawConfig`), is
//! rejected where it does not apply, and changes what it should (and only
//! that) when set to the other value.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use noprop_core::{
    ct_denoise_terms, denoise_loss, q_sample, q_sample_ct, ContinuousSchedule, LearnableSchedule,
    NoiseRng,
};
use noprop_data::DatasetKind;
use noprop_models::Mode;
use noprop_train::config::{
    CtParams, DtParams, FmParams, HeadInit, RawEmbedding, RawMethod, ScheduleTraining, TimeSampling,
};
use noprop_train::method::{draw_times, Method};
use noprop_train::{Config, Ct, Dt, Fm, RawConfig};

#[macro_use]
mod common;

const B: usize = 8;

fn learned(dim: usize) -> RawEmbedding {
    RawEmbedding::Learned {
        dim,
        init: None,
        lr: None,
        target_grad: true,
    }
}

/// A small config for `raw`: a learned embedding with `d = 12`, a tiny time
/// embedding and schedule, two inference steps.
fn small(mut raw: RawConfig) -> RawConfig {
    raw.model.embedding = learned(12);
    raw.train.batch_size = B;
    match &mut raw.method {
        RawMethod::Ct(CtParams {
            time_dim,
            schedule,
            steps,
            ..
        }) => {
            *time_dim = 8;
            schedule.hidden = 4;
            *steps = 2;
        }
        RawMethod::Fm(FmParams {
            time_dim, steps, ..
        }) => {
            *time_dim = 8;
            *steps = 2;
        }
        RawMethod::Dt(DtParams { blocks, .. }) => *blocks = 2,
        _ => {}
    }
    raw
}

fn set_target_grad(raw: &mut RawConfig, on: bool) {
    match &mut raw.model.embedding {
        RawEmbedding::Learned { target_grad, .. } | RawEmbedding::Prototype { target_grad, .. } => {
            *target_grad = on
        }
        RawEmbedding::OneHot => panic!("one-hot has no target_grad"),
    }
}

/// Synthetic MNIST-shaped images and labels.
fn minibatch(dev: &Device) -> (Tensor, Tensor) {
    let x = NoiseRng::new(77)
        .randn(&[B, 1, 28, 28], DType::F32, dev)
        .unwrap();
    let y = Tensor::from_vec(
        (0..B as u32).map(|i| (i * 3) % 10).collect::<Vec<_>>(),
        B,
        dev,
    )
    .unwrap();
    (x, y)
}

fn grad_of(g: &GradStore, var: &Var) -> Option<Vec<f32>> {
    g.get(var.as_tensor())
        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every named variable of the method's parameter groups.
fn named_vars(m: &dyn Method) -> Vec<(String, Var)> {
    m.param_groups()
        .unwrap()
        .into_iter()
        .flat_map(|g| g.vars)
        .collect()
}

/// One step's gradients from fixed noise and dropout streams.
fn step_grads(m: &dyn Method, lane: usize) -> GradStore {
    let (x, y) = minibatch(&Device::Cpu);
    m.gradients(lane, &x, &y, &mut NoiseRng::new(5), &mut NoiseRng::new(6))
        .unwrap()
        .grads
}

/// One step's gradients (as [`step_grads`]) by variable name.
fn grads(m: &dyn Method, lane: usize) -> BTreeMap<String, Vec<f32>> {
    let g = step_grads(m, lane);
    named_vars(m)
        .into_iter()
        .filter_map(|(name, var)| grad_of(&g, &var).map(|v| (name, v)))
        .collect()
}

#[test]
fn defaults_are_the_literal_reading_and_round_trip() {
    for raw in [
        RawConfig::paper_ct(DatasetKind::Mnist),
        RawConfig::paper_fm(DatasetKind::Mnist),
        RawConfig::paper_dt(DatasetKind::Mnist),
    ] {
        let mut raw = small(raw);
        // A config that never names the new fields.
        let mut json = serde_json::to_value(&raw).unwrap();
        json["model"]["embedding"]
            .as_object_mut()
            .unwrap()
            .remove("target_grad");
        if let Some(m) = json["method"].as_object_mut() {
            m.remove("t_sampling");
            m.remove("schedule_training");
        }
        let cfg = RawConfig::from_json_value(json)
            .unwrap()
            .validate()
            .unwrap();
        assert!(cfg.model.embedding.target_grad());
        let back = cfg.raw().clone();
        match &back.method {
            RawMethod::Ct(CtParams {
                t_sampling,
                schedule_training,
                ..
            }) => {
                assert_eq!(
                    (*t_sampling, *schedule_training),
                    (TimeSampling::Uniform, ScheduleTraining::Gradient)
                );
            }
            RawMethod::Fm(FmParams { t_sampling, .. }) => {
                assert_eq!(*t_sampling, TimeSampling::Uniform)
            }
            _ => {}
        }
        // The validated config writes every field, so config.json names them.
        let written = serde_json::to_value(&back).unwrap();
        assert_eq!(
            written["model"]["embedding"]["target_grad"],
            serde_json::json!(true)
        );
        // (Compared as files: a DT schedule's unused coefficients are NaN.)
        assert_eq!(back.clone().validate().unwrap().raw().clone(), back);

        // The other values round-trip too.
        set_target_grad(&mut raw, false);
        match &mut raw.method {
            RawMethod::Ct(CtParams {
                t_sampling,
                schedule_training,
                ..
            }) => {
                *t_sampling = TimeSampling::Stratified;
                *schedule_training = ScheduleTraining::Variance;
            }
            RawMethod::Fm(FmParams { t_sampling, .. }) => *t_sampling = TimeSampling::Stratified,
            _ => {}
        }
        raw.model.head_init = Some(HeadInit::Embedding);
        let cfg = raw.clone().validate().unwrap();
        assert!(!cfg.model.embedding.target_grad());
        let back = cfg.raw().clone();
        assert_eq!(back.clone().validate().unwrap().raw().clone(), back);
        let text = serde_json::to_string(&back).unwrap();
        assert_eq!(
            RawConfig::from_json_value(serde_json::from_str(&text).unwrap()).unwrap(),
            back
        );
    }
}

#[test]
fn levers_are_rejected_where_they_do_not_apply() {
    let parse = |raw: &RawConfig, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = serde_json::to_value(raw).unwrap();
        edit(&mut v);
        RawConfig::from_json_value(v).and_then(|r| r.validate())
    };
    let dt = small(RawConfig::paper_dt(DatasetKind::Mnist));
    let fm = small(RawConfig::paper_fm(DatasetKind::Mnist));
    let err = parse(&dt, &|v| v["method"]["t_sampling"] = "stratified".into()).unwrap_err();
    assert!(err.to_string().contains("t_sampling"), "{err}");
    let err = parse(&fm, &|v| {
        v["method"]["schedule_training"] = "variance".into()
    })
    .unwrap_err();
    assert!(err.to_string().contains("schedule_training"), "{err}");
    let err = parse(&dt, &|v| v["method"]["t_sampling"] = "sobol".into());
    assert!(err.is_err());
    // The baselines have no denoising target.
    for raw in [
        RawConfig::paper_backprop(DatasetKind::Mnist),
        RawConfig::paper_adjoint(DatasetKind::Mnist),
    ] {
        let mut raw = raw;
        raw.model.embedding = learned(12);
        assert!(raw.clone().validate().is_ok());
        set_target_grad(&mut raw, false);
        let err = raw.validate().unwrap_err();
        assert!(err.to_string().contains("target_grad"), "{err}");
    }
}

/// `head_init = "embedding"` aligns `f_out` for NoProp-DT, CT and FM as it
/// does for the back-propagation baseline: `f_out(u_y)` ranks `y` first.
#[test]
fn head_init_embedding_aligns_the_head_of_every_method() {
    let dev = Device::Cpu;
    let ranks_first = |logits: Tensor| -> bool {
        let pred: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        pred == (0..10).collect::<Vec<u32>>()
    };
    for raw in [
        RawConfig::paper_ct(DatasetKind::Mnist),
        RawConfig::paper_fm(DatasetKind::Mnist),
        RawConfig::paper_dt(DatasetKind::Mnist),
    ] {
        let mut raw = small(raw);
        // The default stays uniform: the head is not aligned.
        let cfg = raw.clone().validate().unwrap();
        assert_eq!(cfg.model.head_init, Some(HeadInit::Uniform));
        raw.model.head_init = Some(HeadInit::Embedding);
        let cfg = raw.validate().unwrap();
        let (aligned, default_head): (Tensor, Tensor) = match cfg.method.kind() {
            "ct" => {
                let m = typed!(Ct, &cfg, &dev, None).unwrap();
                let mut r = cfg.raw().clone();
                r.model.head_init = Some(HeadInit::Uniform);
                let plain = typed!(Ct, &r.validate().unwrap(), &dev, None).unwrap();
                (
                    m.model().classify(m.model().embed()).unwrap(),
                    plain.model().classify(plain.model().embed()).unwrap(),
                )
            }
            "fm" => {
                let m = typed!(Fm, &cfg, &dev, None).unwrap();
                let mut r = cfg.raw().clone();
                r.model.head_init = Some(HeadInit::Uniform);
                let plain = typed!(Fm, &r.validate().unwrap(), &dev, None).unwrap();
                (
                    m.model().classify(m.model().embed()).unwrap(),
                    plain.model().classify(plain.model().embed()).unwrap(),
                )
            }
            _ => {
                let m = typed!(Dt, &cfg, &dev, None).unwrap();
                let mut r = cfg.raw().clone();
                r.model.head_init = Some(HeadInit::Uniform);
                let plain = typed!(Dt, &r.validate().unwrap(), &dev, None).unwrap();
                (
                    m.model().classify(m.model().embed()).unwrap(),
                    plain.model().classify(plain.model().embed()).unwrap(),
                )
            }
        };
        assert!(
            ranks_first(aligned.clone()),
            "{}: {aligned}",
            cfg.method.kind()
        );
        // softmax(f_out(u_y)) gives y probability ~0.9 (the gain ln(9 (m - 1))).
        let p: Vec<Vec<f32>> = candle_nn::ops::softmax(&aligned, D::Minus1)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(
            p.iter()
                .enumerate()
                .all(|(y, row)| (row[y] - 0.9).abs() < 0.05),
            "{p:?}"
        );
        assert!(
            !ranks_first(default_head),
            "{}: a uniform head ranks every class first by chance",
            cfg.method.kind()
        );
    }
}

#[test]
fn stratified_training_times_are_a_shifted_grid() {
    let dev = Device::Cpu;
    let mut t: Vec<f32> = draw_times(TimeSampling::Stratified, B, &dev, &mut NoiseRng::new(1))
        .unwrap()
        .to_vec1()
        .unwrap();
    t.sort_by(|a, b| a.total_cmp(b));
    for (k, v) in t.iter().enumerate() {
        assert_eq!((v * B as f32).floor() as usize, k, "{t:?}");
        if k > 0 {
            assert!((v - t[k - 1] - 1.0 / B as f32).abs() < 1e-5, "{t:?}");
        }
    }
    // The uniform sampler is today's sample_t, draw for draw.
    let a: Vec<f32> = draw_times(TimeSampling::Uniform, B, &dev, &mut NoiseRng::new(1))
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = noprop_core::sample_t(B, DType::F32, &dev, &mut NoiseRng::new(1))
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
}

/// With the same draws, a stratified CT step sees other times than a
/// uniform one, so its loss differs.
#[test]
fn stratified_sampling_changes_the_ct_and_fm_steps() {
    let dev = Device::Cpu;
    for raw in [
        RawConfig::paper_ct(DatasetKind::Mnist),
        RawConfig::paper_fm(DatasetKind::Mnist),
    ] {
        let raw = small(raw);
        let mut strat = raw.clone();
        match &mut strat.method {
            RawMethod::Ct(CtParams { t_sampling, .. })
            | RawMethod::Fm(FmParams { t_sampling, .. }) => *t_sampling = TimeSampling::Stratified,
            _ => unreachable!(),
        }
        let loss = |raw: RawConfig| -> f64 {
            let cfg = raw.validate().unwrap();
            let m: Box<dyn Method> = if cfg.method.kind() == "ct" {
                Box::new(typed!(Ct, &cfg, &dev, None).unwrap())
            } else {
                Box::new(typed!(Fm, &cfg, &dev, None).unwrap())
            };
            let (x, y) = minibatch(&dev);
            m.gradients(0, &x, &y, &mut NoiseRng::new(5), &mut NoiseRng::new(6))
                .unwrap()
                .losses[3]
        };
        assert_ne!(loss(raw.clone()), loss(strat));
        assert_eq!(loss(raw.clone()), loss(raw));
    }
}

/// `target_grad = false` changes only `W_embed`'s gradient, and by exactly
/// the path through the denoising target: for NoProp-DT block `t`,
/// `d/dW [w (1/B) sum_i ||stop(uhat_i) - u_i||^2]`, computed here by hand
/// from the same forward pass.
#[test]
fn target_grad_false_removes_exactly_the_target_path_dt() {
    let dev = Device::Cpu;
    let raw = small(RawConfig::paper_dt(DatasetKind::Mnist));
    let mut off = raw.clone();
    set_target_grad(&mut off, false);
    let (cfg_on, cfg_off) = (raw.validate().unwrap(), off.validate().unwrap());
    let t = 2;
    // Two models of the same initial weights, one per setting.
    let m = typed!(Dt, &cfg_on, &dev, None).unwrap();
    let m_off = typed!(Dt, &cfg_off, &dev, None).unwrap();
    let (g_on, g_off) = (grads(&m, t), grads(&m_off, t));
    for name in g_on.keys().chain(g_off.keys()) {
        if name != "embed" {
            assert_eq!(g_on.get(name), g_off.get(name), "{name}");
        }
    }
    // The same forward pass as Dt::gradients, from the same streams.
    let (x, y) = minibatch(&dev);
    let (mut noise, mut dropout) = (NoiseRng::new(5), NoiseRng::new(6));
    let sched = match &cfg_on.method {
        RawMethod::Dt(p) => p.built_schedule().unwrap(),
        _ => unreachable!(),
    };
    let u = m.model().embed().index_select(&y, 0).unwrap();
    let z_prev = q_sample(&u, sched.alpha_bar(t - 1).unwrap(), &mut noise).unwrap();
    let _z_last = q_sample(&u, sched.alpha_bar(2).unwrap(), &mut noise).unwrap();
    let uhat = m
        .model()
        .denoise_mode(t, &z_prev, &x, &mut Mode::Train(&mut dropout))
        .unwrap();
    let eta = 0.1;
    let target_path = denoise_loss(&uhat.detach(), &u, sched.dt_weight(t, eta).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    let vars = named_vars(&m);
    let embed = &vars.iter().find(|(n, _)| n == "embed").unwrap().1;
    let expected = grad_of(&target_path, embed).unwrap();
    let (on, off) = (g_on["embed"].clone(), g_off["embed"].clone());
    let diff: Vec<f32> = on.iter().zip(&off).map(|(a, b)| a - b).collect();
    let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(scale > 1e-6, "the target path must carry a gradient");
    assert!(
        max_abs_diff(&diff, &expected) < 1e-4 * scale.max(1.0),
        "{diff:?} vs {expected:?}"
    );
    // By hand: -2 w / B (uhat_i - u_i), summed into row y_i.
    let w = sched.dt_weight(t, eta).unwrap() as f32;
    let (uh, uu): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (uhat.to_vec2().unwrap(), u.to_vec2().unwrap());
    let labels: Vec<u32> = y.to_vec1().unwrap();
    let d = uu[0].len();
    let mut hand = vec![0f32; 10 * d];
    for i in 0..B {
        for k in 0..d {
            hand[labels[i] as usize * d + k] += -2.0 * w / B as f32 * (uh[i][k] - uu[i][k]);
        }
    }
    assert!(max_abs_diff(&hand, &expected) < 1e-5 * scale.max(1.0));
}

/// For CT and FM: `target_grad = false` leaves every gradient but
/// `W_embed`'s unchanged and changes `W_embed`'s.
#[test]
fn target_grad_false_changes_only_the_embedding_gradient_ct_fm() {
    let dev = Device::Cpu;
    for raw in [
        RawConfig::paper_ct(DatasetKind::Mnist),
        RawConfig::paper_fm(DatasetKind::Mnist),
    ] {
        let raw = small(raw);
        let mut off = raw.clone();
        set_target_grad(&mut off, false);
        let (cfg_on, cfg_off) = (raw.validate().unwrap(), off.validate().unwrap());
        // Two models of the same initial weights, one per setting.
        let build = |cfg: &Config| -> Box<dyn Method> {
            if cfg.method.kind() == "ct" {
                Box::new(typed!(Ct, cfg, &dev, None).unwrap())
            } else {
                Box::new(typed!(Fm, cfg, &dev, None).unwrap())
            }
        };
        let (g_on, g_off) = (grads(&*build(&cfg_on), 0), grads(&*build(&cfg_off), 0));
        assert_eq!(g_on.len(), g_off.len());
        for (name, a) in &g_on {
            let (a, b) = (a.clone(), g_off[name].clone());
            if name == "embed" {
                assert!(
                    max_abs_diff(&a, &b) > 1e-6,
                    "{}: embed",
                    cfg_on.method.kind()
                );
            } else {
                assert!(
                    max_abs_diff(&a, &b) <= 1e-6 * a.iter().fold(1f32, |m, v| m.max(v.abs())),
                    "{}: {name}",
                    cfg_on.method.kind()
                );
            }
        }
    }
}

/// The interior's gradient under `schedule_training = "variance"`, taken
/// on a graph split at `gamma(t_i)` and `gamma'(t_i)`, is the gradient of
/// `mean_i L_i^2` taken directly through the whole step, the denoiser
/// included.
#[test]
fn variance_gradient_is_that_of_the_mean_squared_terms() {
    let dev = Device::Cpu;
    let mut raw = small(RawConfig::paper_ct(DatasetKind::Mnist));
    if let RawMethod::Ct(CtParams {
        schedule_training, ..
    }) = &mut raw.method
    {
        *schedule_training = ScheduleTraining::Variance;
    }
    let cfg = raw.validate().unwrap();
    let m = typed!(Ct, &cfg, &dev, None).unwrap();
    let got = step_grads(&m, 0);

    // The same step written out on one graph, with the same streams.
    let (x, y) = minibatch(&dev);
    let (mut noise, mut dropout) = (NoiseRng::new(5), NoiseRng::new(6));
    let sched = m.schedule();
    let embed = m.model().embed();
    let u = embed.index_select(&y, 0).unwrap();
    let t = draw_times(TimeSampling::Uniform, B, &dev, &mut noise).unwrap();
    let z = q_sample_ct(sched, &u, &t, &mut noise).unwrap();
    let logits = m
        .model()
        .net()
        .forward(&z, &x, &t, &mut Mode::Train(&mut dropout))
        .unwrap();
    let uhat = candle_nn::ops::softmax(&logits, D::Minus1)
        .unwrap()
        .matmul(embed)
        .unwrap();
    let snr_prime = sched.snr_derivative(&t).unwrap();
    let terms = ct_denoise_terms(&uhat, &u, &snr_prime, 1.0).unwrap();
    let want = terms.sqr().unwrap().mean(0).unwrap().backward().unwrap();
    let mut checked = 0;
    for (name, var) in sched.vars() {
        if !LearnableSchedule::INTERIOR_PARAMETER_NAMES.contains(&name.as_str()) {
            continue;
        }
        let (a, b) = (grad_of(&got, &var).unwrap(), grad_of(&want, &var).unwrap());
        let scale = b.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        assert!(scale > 1e-8, "{name}: the reference gradient is zero");
        assert!(
            max_abs_diff(&a, &b) <= 1e-4 * scale,
            "{name}: {a:?} against {b:?}"
        );
        checked += 1;
    }
    assert_eq!(checked, 3);
}

/// `schedule_training = "variance"` replaces only the gradient of the
/// schedule's interior (`b1`, `w1`, `w2`) with that of `mean_i L_i^2`; the
/// network, head, embedding and the endpoints keep the loss's gradient. A
/// few steps then leave the interior elsewhere than plain training does.
#[test]
fn variance_training_changes_only_the_schedule_interior() {
    let dev = Device::Cpu;
    let raw = small(RawConfig::paper_ct(DatasetKind::Mnist));
    let mut var_raw = raw.clone();
    if let RawMethod::Ct(CtParams {
        schedule_training, ..
    }) = &mut var_raw.method
    {
        *schedule_training = ScheduleTraining::Variance;
    }
    let (cfg_plain, cfg_var) = (raw.validate().unwrap(), var_raw.validate().unwrap());
    // Two models of the same initial weights, one per setting.
    let m = typed!(Ct, &cfg_plain, &dev, None).unwrap();
    let m_var = typed!(Ct, &cfg_var, &dev, None).unwrap();
    let (g_plain, g_var) = (grads(&m, 0), grads(&m_var, 0));
    assert_eq!(g_plain.len(), g_var.len());
    for (name, a) in &g_plain {
        let (a, b) = (a.clone(), g_var[name].clone());
        if LearnableSchedule::INTERIOR_PARAMETER_NAMES.contains(&name.as_str()) {
            assert!(
                max_abs_diff(&a, &b) > 1e-6 * a.iter().fold(1e-12f32, |m, v| m.max(v.abs())),
                "{name} unchanged"
            );
        } else if name.starts_with("schedule.") {
            // The endpoints' gradient is summed in another order (the
            // graph is split at gamma(t_i)), so equal to rounding.
            assert!(
                max_abs_diff(&a, &b) <= 1e-5 * a.iter().fold(1e-12f32, |m, v| m.max(v.abs())),
                "{name}: {a:?} against {b:?}"
            );
        } else {
            assert_eq!(a, b, "{name}");
        }
    }

    // A few steps with each: the interior parameters move in both, to
    // different places; the endpoints' first update is the same.
    let interior = |m: &Ct| -> Vec<Vec<f32>> {
        m.schedule()
            .vars()
            .into_iter()
            .filter(|(n, _)| LearnableSchedule::INTERIOR_PARAMETER_NAMES.contains(&n.as_str()))
            .map(|(_, v)| v.as_tensor().to_vec1().unwrap())
            .collect()
    };
    let run = |cfg: &Config| -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let ct = typed!(Ct, cfg, &dev, None).unwrap();
        let before = interior(&ct);
        let mut trainer = noprop_train::Trainer::new(cfg.clone(), dev.clone(), ct).unwrap();
        let (x, y) = minibatch(&dev);
        let (mut noise, mut dropout) = (NoiseRng::new(5), NoiseRng::new(6));
        for _ in 0..3 {
            let l = trainer
                .train_step(0, &x, &y, &mut noise, &mut dropout)
                .unwrap();
            assert!(l[0].is_finite());
        }
        (before, interior(trainer.method()))
    };
    let (start, plain) = run(&cfg_plain);
    let (start_v, variance) = run(&cfg_var);
    assert_eq!(start, start_v);
    let moved = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0f32, f32::max)
    };
    assert!(
        moved(&start, &variance) > 1e-4,
        "variance training moves the interior"
    );
    assert!(
        moved(&plain, &variance) > 1e-4,
        "and elsewhere than plain training"
    );
}

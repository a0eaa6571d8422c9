//! The back-propagation and adjoint baselines on tiny synthetic data:
//! gradients reach every block, the adjoint method agrees with
//! back-propagation through the same discretised solver, and both resume
//! exactly.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use noprop_core::NoiseRng;
use noprop_data::{Dataset, DatasetKind};
use noprop_models::{Kernels, Mode};
use noprop_train::config::{AdjointParams, BackpropParams, HeadInit, RawEmbedding, RawMethod};
use noprop_train::{
    build_trainer, fit, Adjoint, Backprop, DeviceData, Method, RawConfig, RunData, RunDir, Silent,
    Trainer,
};

/// MNIST-shaped images where the class brightens one band of rows.
fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = NoiseRng::new(seed);
    let mut images = vec![0f32; n * 784];
    rng.fill_normal(&mut images);
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7 + seed as u32) % 10).collect();
    for (i, &y) in labels.iter().enumerate() {
        for r in (y as usize * 2)..(y as usize * 2 + 4) {
            for c in 0..28 {
                images[i * 784 + r * 28 + c] += 3.0;
            }
        }
    }
    Dataset {
        images,
        labels,
        channels: 1,
        height: 28,
        width: 28,
        num_classes: 10,
    }
}

fn batch(ds: &Dataset, dev: &Device) -> (Tensor, Tensor) {
    let n = ds.labels.len();
    (
        Tensor::from_slice(&ds.images, (n, 1, 28, 28), dev).unwrap(),
        Tensor::from_slice(&ds.labels, n, dev).unwrap(),
    )
}

fn small(mut cfg: RawConfig, epochs: usize) -> RawConfig {
    cfg.train.epochs = epochs;
    cfg.train.batch_size = 16;
    cfg.eval.runs = 2;
    cfg.eval.batch_size = 40;
    cfg.eval.train_subset = 16;
    // Eight Euler steps in training and at inference (the adjoint baseline;
    // the back-propagation chain has no steps to set).
    if let RawMethod::Adjoint(AdjointParams {
        train_steps, steps, ..
    }) = &mut cfg.method
    {
        *train_steps = 8;
        *steps = 8;
    }
    cfg.checkpoint.keep_last = 0;
    cfg
}

/// Sets `T` of a back-propagation config.
fn set_blocks(cfg: &mut RawConfig, t: usize) {
    match &mut cfg.method {
        RawMethod::Backprop(BackpropParams { blocks, .. }) => *blocks = t,
        other => panic!("not backprop: {other:?}"),
    }
}

/// A back-propagation trainer for `raw`.
fn backprop_trainer(raw: RawConfig, dev: &Device, train: Option<&Dataset>) -> Trainer<Backprop> {
    let cfg = raw.validate().unwrap();
    let RawMethod::Backprop(p) = &cfg.method else {
        panic!("not backprop")
    };
    let method = Backprop::new(p, &cfg.setup(), dev, train).unwrap();
    Trainer::new(cfg, dev.clone(), method).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    num / b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
        .max(1e-30)
}

#[test]
fn backprop_updates_every_block_and_alpha() {
    let dev = Device::Cpu;
    let mut cfg = small(RawConfig::paper_backprop(DatasetKind::Mnist), 1);
    set_blocks(&mut cfg, 3);
    let mut t = backprop_trainer(cfg, &dev, None);
    // Copies: the optimizer updates the variables in place.
    let before: BTreeMap<String, Tensor> = t
        .named_tensors()
        .into_iter()
        .map(|(k, v)| (k, v.copy().unwrap()))
        .collect();
    let (x, y) = batch(&synthetic(8, 3), &dev);
    let l = t
        .train_step(0, &x, &y, &mut NoiseRng::new(0), &mut NoiseRng::new(1))
        .unwrap();
    assert!(l[0].is_finite() && l[0] > 0.0);
    let after = t.named_tensors();
    for name in [
        "blocks.1.img.conv1.weight",
        "blocks.2.img.fc.weight",
        "blocks.3.label.fc1.weight",
        "head.weight",
        "alpha.w",
    ] {
        let key = after
            .keys()
            .find(|k| k.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {:?}", after.keys().collect::<Vec<_>>()));
        let diff = rel_err(&after[key], &before[key]);
        assert!(diff > 0.0, "{key} did not change");
    }
    let alphas = t.method().alphas().unwrap();
    assert_eq!(alphas.len(), 3);
    assert!(
        alphas.iter().all(|a| (a - 0.5).abs() < 0.01 && *a != 0.5),
        "{alphas:?}"
    );
}

/// With `head_init = "embedding"` (the back-prop default) `f_out(u_y)` ranks
/// `y` first for every embedding, one-hot, learned and prototype (whose rows
/// are near-parallel images); `uniform` keeps the Linear initialisation.
#[test]
fn backprop_head_starts_aligned_with_the_embedding() {
    let dev = Device::Cpu;
    let train = synthetic(40, 5);
    for embedding in [
        RawEmbedding::OneHot,
        RawEmbedding::Learned {
            dim: 20,
            init: None,
            lr: None,
            target_grad: true,
        },
        RawEmbedding::Prototype {
            init: None,
            lr: None,
            target_grad: true,
        },
    ] {
        let mut cfg = small(RawConfig::paper_backprop(DatasetKind::Mnist), 1);
        set_blocks(&mut cfg, 1);
        cfg.model.embedding = embedding.clone();
        assert_eq!(
            cfg.clone().validate().unwrap().model.head_init,
            Some(HeadInit::Embedding)
        );
        let t = backprop_trainer(cfg.clone(), &dev, Some(&train));
        let u = t.method().model().embed().clone();
        let logits: Vec<Vec<f32>> = t.method().model().classify(&u).unwrap().to_vec2().unwrap();
        for (y, row) in logits.iter().enumerate() {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(best, y, "{embedding:?}: f_out(u_{y}) = {row:?}");
            // Gain ln(9 (m - 1)): softmax gives y probability 0.9 at u_y.
            let p_y = row[y].exp() / row.iter().map(|v| v.exp()).sum::<f32>();
            assert!(
                (p_y - 0.9).abs() < 0.02,
                "{embedding:?}: p(y | u_{y}) = {p_y}, logits {row:?}"
            );
        }
        let bias: Vec<f32> = t.named_tensors()["head.bias"].to_vec1().unwrap();
        assert!(bias.iter().all(|&b| b == 0.0));

        cfg.model.head_init = Some(HeadInit::Uniform);
        let t = backprop_trainer(cfg, &dev, Some(&train));
        let bias: Vec<f32> = t.named_tensors()["head.bias"].to_vec1().unwrap();
        assert!(bias.iter().any(|&b| b != 0.0), "uniform init draws a bias");
    }
    assert_eq!(
        RawConfig::paper_dt(DatasetKind::Mnist)
            .validate()
            .unwrap()
            .model
            .head_init,
        Some(HeadInit::Uniform)
    );
}

#[test]
fn adjoint_gradients_match_backprop_through_the_solver() {
    let dev = Device::Cpu;
    let (x, y) = batch(&synthetic(4, 7), &dev);
    let mut errs = Vec::new();
    for steps in [10, 40] {
        let mut cfg = small(RawConfig::paper_adjoint(DatasetKind::Mnist), 1);
        if let RawMethod::Adjoint(AdjointParams { train_steps, .. }) = &mut cfg.method {
            *train_steps = steps;
        }
        cfg.model.kernels = Kernels::Stock;
        cfg.train.weight_decay = 0.0;
        let cfg = cfg.validate().unwrap();
        let RawMethod::Adjoint(p) = &cfg.method else {
            panic!("not adjoint")
        };
        let t = Adjoint::new(p, &cfg.setup(), &dev, None).unwrap();
        let step = t
            .gradients(0, &x, &y, &mut NoiseRng::new(11), &mut NoiseRng::new(12))
            .unwrap();
        let (loss_adj, adj) = (step.losses[0], step.grads);

        // Reference: the same Euler solve kept as one autograd graph.
        let m = t.model();
        let mut noise = NoiseRng::new(11);
        let mut drop = NoiseRng::new(12);
        let fx = m
            .net()
            .image_features(&x, &mut Mode::Train(&mut drop))
            .unwrap();
        let mut z = noise.randn(&[4, 10], DType::F32, &dev).unwrap();
        let h = 1.0 / steps as f64;
        for k in 0..steps {
            let tt = Tensor::full((k as f64 * h) as f32, 4, &dev).unwrap();
            let v = m
                .net()
                .logits_from_features(&z, &tt, &fx, &mut Mode::Eval)
                .unwrap()
                .matmul(m.embed())
                .unwrap();
            z = (&z + (v * h).unwrap()).unwrap();
        }
        let logp = noprop_core::log_softmax(&m.classify(&z).unwrap()).unwrap();
        let ce = noprop_core::cross_entropy(&logp, &y).unwrap();
        assert!(
            (ce.to_scalar::<f32>().unwrap() as f64 - loss_adj).abs() < 1e-5,
            "the forward solves differ"
        );
        let reference = ce.backward().unwrap();

        let mut worst: f64 = 0.0;
        let vars: BTreeMap<String, candle_core::Var> = m
            .net_vars()
            .data()
            .lock()
            .unwrap()
            .iter()
            .chain(m.head_vars().data().lock().unwrap().iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, var) in &vars {
            let g_ref = reference
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no reference gradient for {name}"));
            let g_adj = adj
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no adjoint gradient for {name}"));
            worst = worst.max(rel_err(g_adj, g_ref));
        }
        errs.push(worst);
    }
    eprintln!("relative gradient errors at 10 and 40 steps: {errs:?}");
    // The adjoint solve reconstructs z backward in time: first-order agreement,
    // four times the steps giving about a quarter of the gap.
    assert!(
        errs[1] < 0.05 && errs[1] < errs[0] / 2.5,
        "relative gradient errors at 10 and 40 steps: {errs:?}"
    );
}

#[test]
fn baselines_learn_and_resume_exactly() {
    let dev = Device::Cpu;
    let data = RunData {
        train: DeviceData::new(&synthetic(160, 1), DType::F32, &dev).unwrap(),
        test: DeviceData::new(&synthetic(40, 2), DType::F32, &dev).unwrap(),
        train_subset: None,
    };
    let mut bp = small(RawConfig::paper_backprop(DatasetKind::Mnist), 2);
    set_blocks(&mut bp, 2);
    // A larger step than the paper's so that a few steps are past chance.
    bp.train.lr = 3e-3;
    let mut adj = small(RawConfig::paper_adjoint(DatasetKind::Mnist), 2);
    adj.train.lr = 3e-3;
    for cfg in [bp, adj] {
        let method = cfg.clone().validate().unwrap().method.kind();
        let tmp = tempfile::tempdir().unwrap();
        let mut a = build_trainer(cfg.clone().validate().unwrap(), dev.clone(), None).unwrap();
        let chance = a.evaluate(&data.test, None, 0).unwrap().test_acc;
        let report_a = fit(&mut a, &data, None, &mut Silent).unwrap().unwrap();

        let mut one = cfg.clone();
        one.train.epochs = 1;
        let run = RunDir::create_with(
            &tmp.path().join("b"),
            &one.clone().validate().unwrap(),
            &serde_json::json!({}),
        )
        .unwrap();
        let mut b = build_trainer(one.validate().unwrap(), dev.clone(), None).unwrap();
        fit(&mut b, &data, Some(&run), &mut Silent).unwrap();
        let mut c = build_trainer(cfg.clone().validate().unwrap(), dev.clone(), None).unwrap();
        run.restore_latest(&mut c).unwrap();
        let report_c = fit(&mut c, &data, Some(&run), &mut Silent)
            .unwrap()
            .unwrap();
        for (k, v) in a.named_tensors() {
            assert_eq!(
                rel_err(&c.named_tensors()[&k], &v),
                0.0,
                "{method:?}: {k} differs after resume"
            );
        }
        assert_eq!(report_a.test_acc_runs, report_c.test_acc_runs, "{method:?}");
        assert!(
            report_a.test_acc > chance + 20.0,
            "{method:?}: {chance} -> {}",
            report_a.test_acc
        );
        let metrics = std::fs::read_to_string(run.path().join("metrics.jsonl")).unwrap();
        let epoch: serde_json::Value = serde_json::from_str(
            metrics
                .lines()
                .rev()
                .find(|l| l.contains("\"epoch\":") && l.contains("\"event\":\"epoch\""))
                .unwrap(),
        )
        .unwrap();
        if cfg!(target_os = "linux") {
            assert!(
                epoch["train_peak_rss_bytes"].as_u64().unwrap() > 1 << 20,
                "{epoch}"
            );
        }
    }
}

#[test]
fn backprop_gradients_are_the_same_with_fast_and_stock_kernels() {
    // The chain sends gradients through every block's label path into z,
    // which NoProp-DT never needs: check the custom ops' input gradients here.
    let dev = Device::Cpu;
    let (x, y) = batch(&synthetic(6, 9), &dev);
    let mut grads = Vec::new();
    for kernels in [Kernels::Fast, Kernels::Stock] {
        let mut cfg = small(RawConfig::paper_backprop(DatasetKind::Mnist), 1);
        set_blocks(&mut cfg, 3);
        cfg.model.dropout = 0.0;
        cfg.model.kernels = kernels;
        let t = backprop_trainer(cfg, &dev, None);
        let step = t
            .method()
            .gradients(0, &x, &y, &mut NoiseRng::new(4), &mut NoiseRng::new(5))
            .unwrap();
        let (loss, g) = (step.losses[0], step.grads);
        let named: BTreeMap<String, Tensor> = t
            .named_tensors()
            .into_iter()
            .filter_map(|(k, v)| g.get(&v).map(|g| (k, g.clone())))
            .collect();
        grads.push((loss, named));
    }
    assert!(
        (grads[0].0 - grads[1].0).abs() < 1e-5,
        "losses {} and {}",
        grads[0].0,
        grads[1].0
    );
    assert_eq!(
        grads[0].1.keys().collect::<Vec<_>>(),
        grads[1].1.keys().collect::<Vec<_>>()
    );
    assert!(
        grads[0].1.contains_key("blocks.1.img.conv1.weight") && grads[0].1.contains_key("alpha.w")
    );
    let norm = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    let mut bad = Vec::new();
    for (name, g) in &grads[0].1 {
        let e = rel_err(g, &grads[1].1[name]);
        // A bias followed by BatchNorm has a zero gradient up to rounding.
        if e > 1e-3 && norm(&grads[1].1[name]) > 1e-6 {
            bad.push(format!(
                "{name}: relative difference {e:.3e}, norms {:.3e} vs {:.3e}",
                norm(g),
                norm(&grads[1].1[name])
            ));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

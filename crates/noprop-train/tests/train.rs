//! Trainer invariants on tiny synthetic data: gradient isolation between
//! blocks, checkpoint round trips, and resume equals an uninterrupted run.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use noprop_core::{dt_loss, q_sample, NoiseRng, Stream};
use noprop_data::{Dataset, DatasetKind};
use noprop_models::Mode;
use noprop_train::config::{
    BackpropParams, CtParams, DtParams, FmParams, RawEmbedding, RawMethod, TrainOrder,
};
use noprop_train::{
    checkpoint, fit, Collective, DeviceData, Dt, RawConfig, RunData, RunDir, Silent, Trainer,
};

#[macro_use]
mod common;

/// A synthetic MNIST-shaped set where the class sets the brightness of one
/// image row band, so a few steps are enough to learn something.
fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = NoiseRng::new(seed);
    let mut images = vec![0f32; n * 28 * 28];
    rng.fill_normal(&mut images);
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7 + seed as u32) % 10).collect();
    for (i, &y) in labels.iter().enumerate() {
        let img = &mut images[i * 784..(i + 1) * 784];
        for r in (y as usize * 2)..(y as usize * 2 + 4) {
            for c in 0..28 {
                img[r * 28 + c] += 3.0;
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

fn tiny_config(epochs: usize) -> RawConfig {
    let mut cfg = RawConfig::paper_dt(DatasetKind::Mnist);
    set_blocks(&mut cfg, 3);
    cfg.train.epochs = epochs;
    cfg.train.batch_size = 16;
    cfg.eval.runs = 2;
    cfg.eval.batch_size = 40;
    cfg.eval.train_subset = 16;
    cfg.checkpoint.keep_last = 0;
    cfg
}

/// Sets `T` of a NoProp-DT or back-propagation config.
fn set_blocks(cfg: &mut RawConfig, t: usize) {
    match &mut cfg.method {
        RawMethod::Dt(DtParams { blocks, .. })
        | RawMethod::Backprop(BackpropParams { blocks, .. }) => *blocks = t,
        other => panic!("no blocks in {other:?}"),
    }
}

/// A NoProp-DT trainer for `raw`.
fn dt_trainer(raw: RawConfig, dev: &Device) -> Trainer<Dt> {
    let cfg = raw.validate().unwrap();
    let method = typed!(Dt, &cfg, dev, None).unwrap();
    Trainer::new(cfg, dev.clone(), method).unwrap()
}

/// A new run folder for `raw` with empty process metadata.
fn run_dir(path: &std::path::Path, raw: &RawConfig) -> RunDir {
    RunDir::create_with(
        path,
        &raw.clone().validate().unwrap(),
        &serde_json::json!({}),
    )
    .unwrap()
}

fn data(dev: &Device) -> RunData {
    let train = DeviceData::new(&synthetic(48, 1), DType::F32, dev).unwrap();
    let test = DeviceData::new(&synthetic(40, 2), DType::F32, dev).unwrap();
    let subset = train.head(16).unwrap();
    RunData {
        train,
        test,
        train_subset: Some(subset),
    }
}

#[test]
fn gradients_never_cross_blocks() {
    let dev = Device::Cpu;
    let trainer = dt_trainer(tiny_config(1), &dev);
    let model = trainer.method().model();
    let sched = match &trainer.config().method {
        RawMethod::Dt(p) => p.built_schedule().unwrap(),
        other => panic!("not a DT config: {other:?}"),
    };
    let ds = synthetic(8, 3);
    let x = Tensor::from_slice(&ds.images, (8, 1, 28, 28), &dev).unwrap();
    let y = Tensor::from_slice(&ds.labels, 8, &dev).unwrap();
    let mut rng = NoiseRng::new(0);
    for t in 1..=3 {
        let u = model.embed().index_select(&y, 0).unwrap();
        let z = q_sample(&u, sched.alpha_bar(t - 1).unwrap(), &mut rng).unwrap();
        let zt = q_sample(&u, sched.alpha_bar(3).unwrap(), &mut rng).unwrap();
        let mut drop = NoiseRng::new(1);
        let uhat = model
            .denoise_mode(t, &z, &x, &mut Mode::Train(&mut drop))
            .unwrap();
        let loss = dt_loss(
            &model.classify(&zt).unwrap(),
            &y,
            &uhat,
            &u,
            sched.alpha_bar(0).unwrap(),
            sched.dt_weight(t, 0.1).unwrap(),
        )
        .unwrap();
        let grads = loss.total.backward().unwrap();
        for j in 1..=3 {
            let data = model.block_vars(j).data().lock().unwrap();
            let with_grad = data
                .values()
                .filter(|v| grads.get(v.as_tensor()).is_some())
                .count();
            if j == t {
                // Every parameter of block t is reached (BatchNorm buffers are not parameters).
                assert_eq!(
                    with_grad,
                    data.len() - 2 * 6,
                    "block {t} should have gradients"
                );
            } else {
                assert_eq!(with_grad, 0, "block {t}'s loss reached block {j}");
            }
        }
        let head = model.head_vars().data().lock().unwrap();
        assert!(head.values().all(|v| grads.get(v.as_tensor()).is_some()));
    }
}

#[test]
fn parameter_names_and_count() {
    let mut cfg = RawConfig::paper_dt(DatasetKind::Mnist);
    set_blocks(&mut cfg, 2);
    let trainer = dt_trainer(cfg, &Device::Cpu);
    let names = trainer.method().model().named_tensors();
    assert_eq!(names["blocks.1.img.conv1.weight"].dims(), &[32, 1, 3, 3]);
    assert_eq!(names["blocks.2.img.fc.weight"].dims(), &[256, 6272]);
    assert_eq!(names["blocks.2.fuse.out.weight"].dims(), &[10, 128]);
    assert_eq!(names["blocks.1.label.bn1.running_var"].dims(), &[256]);
    assert_eq!(names["head.weight"].dims(), &[10, 10]);
    assert_eq!(names["embed"].dims(), &[10, 10]);
    // Figure 6's block for MNIST with d = 10: about 2.0 M parameters.
    let count = trainer.method().model().block_parameter_count();
    assert!((1_900_000..2_100_000).contains(&count), "{count}");
}

#[test]
fn same_seed_same_parameters() {
    let a = dt_trainer(tiny_config(1), &Device::Cpu);
    let b = dt_trainer(tiny_config(1), &Device::Cpu);
    let mut c = tiny_config(1);
    c.train.seed = 9;
    let c = dt_trainer(c, &Device::Cpu);
    let key = "blocks.2.label.fc1.weight";
    let get = |t: &Trainer<Dt>| {
        t.method().model().named_tensors()[key]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(get(&a), get(&b));
    assert_ne!(get(&a), get(&c));
}

fn assert_same_tensors(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, ta) in a {
        let va = ta
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let vb = b[k]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(va, vb, "tensor {k} differs");
    }
}

#[test]
fn resume_ends_where_an_uninterrupted_run_would() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let tmp = tempfile::tempdir().unwrap();

    let cfg = tiny_config(2);
    let run_a = run_dir(&tmp.path().join("a"), &cfg);
    let mut a = dt_trainer(cfg.clone(), &dev);
    let report_a = fit(&mut a, &d, Some(&run_a), &mut Silent).unwrap().unwrap();

    // The same run, stopped after epoch 1 and resumed from its checkpoint.
    let run_b = run_dir(&tmp.path().join("b"), &tiny_config(1));
    let mut b = dt_trainer(tiny_config(1), &dev);
    fit(&mut b, &d, Some(&run_b), &mut Silent).unwrap();
    let mut c = dt_trainer(cfg, &dev);
    assert_eq!(run_b.restore_latest(&mut c).unwrap(), 1);
    let report_c = fit(&mut c, &d, Some(&run_b), &mut Silent).unwrap().unwrap();

    assert_same_tensors(
        &a.method().model().named_tensors(),
        &c.method().model().named_tensors(),
    );
    assert_eq!(report_a.test_acc_runs, report_c.test_acc_runs);
    assert_eq!(run_b.checkpoint_epochs().unwrap(), vec![1, 2]);
    let epochs: Vec<u64> = run_b
        .metrics()
        .unwrap()
        .iter()
        .filter(|v| v["event"] == "epoch")
        .map(|v| v["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, vec![1, 2]);
}

#[test]
fn checkpoint_round_trip_with_metadata() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let tmp = tempfile::tempdir().unwrap();
    let run = run_dir(&tmp.path().join("r"), &tiny_config(1));
    let mut a = dt_trainer(tiny_config(1), &dev);
    fit(&mut a, &d, Some(&run), &mut Silent).unwrap();
    let path = run.latest_model().unwrap().unwrap();
    let (tensors, meta) = checkpoint::load_safetensors(&path, &dev).unwrap();
    assert_eq!(meta["method"], "dt");
    assert_eq!(meta["epoch"], "1");
    let record = checkpoint::ModelRecord::from_metadata(&path, &meta).unwrap();
    assert_eq!(record.config.method.kind(), "dt");
    assert_eq!(record.epoch, 1);
    // The written config has every default resolved.
    assert_eq!(
        record.config,
        tiny_config(1).validate().unwrap().raw().clone()
    );
    assert_same_tensors(&tensors, &a.method().model().named_tensors());
    let b = noprop_train::load_for_eval(&path, &dev).unwrap();
    assert_same_tensors(&b.named_tensors(), &a.method().model().named_tensors());
    assert_eq!(b.epochs_done(), 1);
    // A file that is not safetensors gives a typed error, not a panic.
    let bad = tmp.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    assert!(matches!(
        checkpoint::load_safetensors(&bad, &dev),
        Err(noprop_train::TrainError::Checkpoint { .. })
    ));
}

#[test]
fn training_learns_the_synthetic_task() {
    let dev = Device::Cpu;
    let train = DeviceData::new(&synthetic(320, 5), DType::F32, &dev).unwrap();
    let test = DeviceData::new(&synthetic(100, 6), DType::F32, &dev).unwrap();
    let d = RunData {
        train,
        test,
        train_subset: None,
    };
    let mut cfg = tiny_config(3);
    // A larger step than the paper's, so that the head (a Linear on z_T,
    // trained from scratch) is past chance within the few steps a test affords.
    cfg.train.lr = 5e-3;
    let mut t = dt_trainer(cfg, &dev);
    let before = t.evaluate(&d.test, None, 0).unwrap().test_acc;
    let after = fit(&mut t, &d, None, &mut Silent).unwrap().unwrap();
    assert!(
        after.test_acc > 60.0 && after.test_acc > before + 30.0,
        "before {before}, after {:?}",
        after
    );
}

#[test]
fn invalid_configs_are_rejected() {
    use noprop_train::config::EmbeddingInit;
    // The field an error names: "invalid config: <field> must ..." or "<field>: ...".
    let field = |c: RawConfig| {
        c.validate().err().map(|e| {
            let msg = e.to_string();
            let rest = msg.trim_start_matches("invalid config: ");
            rest.split([' ', ':'])
                .next()
                .unwrap_or_default()
                .to_string()
        })
    };
    let mut c = tiny_config(1);
    set_blocks(&mut c, 0);
    assert_eq!(field(c).as_deref(), Some("method.blocks"));
    let mut c = tiny_config(1);
    c.train.lr = -1e-3;
    assert_eq!(field(c).as_deref(), Some("train.lr"));
    let json = serde_json::to_value(tiny_config(1)).unwrap();
    assert!(serde_json::from_value::<RawConfig>(json.clone()).is_ok());
    // Unknown kernels are rejected when the file is read.
    let mut bad = json.clone();
    bad["model"]["kernels"] = serde_json::json!("gpu");
    assert!(
        serde_json::from_value::<RawConfig>(bad).is_err(),
        "kernels = \"gpu\""
    );
    let mut c = tiny_config(1);
    match &mut c.method {
        RawMethod::Dt(DtParams { schedule, .. }) => {
            *schedule = noprop_core::ScheduleSpec::Explicit {
                alpha_bar: vec![0.0, 0.5, 0.4, 0.9],
            }
        }
        other => panic!("not DT: {other:?}"),
    }
    assert_eq!(field(c).as_deref(), Some("method.schedule"));
    let mut c = tiny_config(1);
    c.model.embedding = RawEmbedding::Learned {
        dim: 20,
        init: Some(EmbeddingInit::Prototype),
        lr: None,
        target_grad: true,
    };
    assert_eq!(
        field(c.clone()).as_deref(),
        Some("model.embedding.init"),
        "prototype needs d = C*H*W"
    );
    c.model.embedding = RawEmbedding::Learned {
        dim: 784,
        init: Some(EmbeddingInit::Prototype),
        lr: None,
        target_grad: true,
    };
    assert!(c.validate().is_ok());
    let mut c = tiny_config(1);
    c.model.embedding = RawEmbedding::Learned {
        dim: 5,
        init: Some(EmbeddingInit::Orthogonal),
        lr: None,
        target_grad: true,
    };
    assert_eq!(
        field(c).as_deref(),
        Some("model.embedding.init"),
        "orthogonal needs d >= m"
    );
    let mut c = tiny_config(1);
    c.model.embedding = RawEmbedding::Learned {
        dim: 20,
        init: None,
        lr: Some(1e-4),
        target_grad: true,
    };
    assert!(c.clone().validate().is_ok());
    c.model.embedding = RawEmbedding::Learned {
        dim: 20,
        init: None,
        lr: Some(-1e-4),
        target_grad: true,
    };
    assert_eq!(field(c).as_deref(), Some("model.embedding.lr"));
    // alpha_init is the back-propagation baseline's.
    let mut c = tiny_config(1);
    c.method = RawMethod::Backprop(BackpropParams {
        blocks: 3,
        alpha_init: 1.0,
    });
    assert_eq!(field(c).as_deref(), Some("method.alpha_init"));
    let mut bad = json.clone();
    bad["train"]["learning_rate"] = serde_json::json!(0.1);
    assert!(serde_json::from_value::<RawConfig>(bad).is_err());
    // One-hot is fixed: it has no init or lr to give, so either is an error.
    let mut bad = json.clone();
    bad["model"]["embedding"] = serde_json::json!({"kind": "one-hot", "init": "normal"});
    assert!(
        serde_json::from_value::<RawConfig>(bad).is_err(),
        "one-hot is fixed: init"
    );
    let mut bad = json.clone();
    bad["model"]["embedding"] = serde_json::json!({"kind": "one-hot", "lr": 1e-4});
    assert!(
        serde_json::from_value::<RawConfig>(bad).is_err(),
        "one-hot is fixed: lr"
    );
}

#[test]
fn continuous_methods_checkpoint_and_resume_exactly() {
    let dev = Device::Cpu;
    let d = data(&dev);
    for (name, paper) in [
        ("ct", RawConfig::paper_ct(DatasetKind::Mnist)),
        ("fm", RawConfig::paper_fm(DatasetKind::Mnist)),
    ] {
        let mut cfg = paper;
        cfg.train.epochs = 2;
        cfg.train.batch_size = 16;
        cfg.eval.runs = 2;
        match &mut cfg.method {
            RawMethod::Ct(CtParams { steps, .. }) | RawMethod::Fm(FmParams { steps, .. }) => {
                *steps = 5
            }
            other => panic!("not continuous: {other:?}"),
        }
        cfg.eval.batch_size = 40;
        cfg.checkpoint.keep_last = 0;
        let tmp = tempfile::tempdir().unwrap();
        let run_a = run_dir(&tmp.path().join("a"), &cfg);
        let mut a = noprop_train::build_trainer(cfg.clone().validate().unwrap(), dev.clone(), None)
            .unwrap();
        let report_a = fit(&mut a, &d, Some(&run_a), &mut Silent).unwrap().unwrap();
        let names = a.named_tensors();
        assert!(
            names.contains_key("net.img.conv1.weight") && names.contains_key("net.time.fc.weight")
        );
        assert_eq!(names.contains_key("schedule.w1"), name == "ct");

        let mut one = cfg.clone();
        one.train.epochs = 1;
        let run_b = run_dir(&tmp.path().join("b"), &one);
        let mut b =
            noprop_train::build_trainer(one.validate().unwrap(), dev.clone(), None).unwrap();
        fit(&mut b, &d, Some(&run_b), &mut Silent).unwrap();
        let mut c = noprop_train::build_trainer(cfg.clone().validate().unwrap(), dev.clone(), None)
            .unwrap();
        run_b.restore_latest(&mut c).unwrap();
        let report_c = fit(&mut c, &d, Some(&run_b), &mut Silent).unwrap().unwrap();
        assert_same_tensors(&a.named_tensors(), &c.named_tensors());
        assert_eq!(report_a.test_acc_runs, report_c.test_acc_runs, "{name}");
        let e = noprop_train::load_for_eval(&run_b.latest_model().unwrap().unwrap(), &dev).unwrap();
        assert_same_tensors(&e.named_tensors(), &a.named_tensors());
    }
}

fn fused_config(epochs: usize) -> RawConfig {
    let mut cfg = tiny_config(epochs);
    match &mut cfg.method {
        RawMethod::Dt(DtParams { order, .. }) => *order = TrainOrder::Fused,
        other => panic!("not DT: {other:?}"),
    }
    cfg
}

/// A fused epoch is, on each minibatch, the T sequential steps of
/// Algorithm 1, each block drawing from its own streams (which carry over
/// from one minibatch to the next): the same updates, bit for bit, for the
/// blocks and the head, and the same losses.
#[test]
fn fused_epoch_is_each_blocks_sequential_step_on_each_minibatch() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let mut fused = dt_trainer(fused_config(1), &dev);
    let mut seq = dt_trainer(tiny_config(1), &dev);
    let fused_passes = fused.train_epoch(&d.train, &mut Silent).unwrap();
    assert_eq!(
        fused_passes.iter().map(|p| p.block).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // The same epoch by hand: the fused pass's minibatch order (epoch 1,
    // pass key 0) and each block's (epoch 1, block) noise and dropout streams.
    let cfg = seq.config().clone();
    let seed = cfg.train.seed;
    let streams = |t: u64| {
        (
            NoiseRng::derived(seed, &[Stream::Noise.id(), 1, t]),
            NoiseRng::derived(seed, &[Stream::Dropout.id(), 1, t]),
        )
    };
    let mut rngs: Vec<_> = (1..=3).map(streams).collect();
    let batcher = noprop_data::Batcher::new(
        d.train.len(),
        cfg.train.batch_size,
        noprop_core::sub_seed(seed, &[Stream::Shuffle.id()]),
        noprop_data::pass_stream(1, 0),
    )
    .unwrap()
    .min_batch_len(2);
    let mut sums = [[0.0f64; 4]; 3];
    let mut count = 0;
    for idx in batcher.batches() {
        let (x, y) = d.train.batch(idx).unwrap();
        for t in 1..=3 {
            let (noise, drop) = &mut rngs[t - 1];
            let l = seq.train_step(t, &x, &y, noise, drop).unwrap();
            for (s, v) in sums[t - 1].iter_mut().zip(l) {
                *s += v;
            }
        }
        count += 1;
    }
    assert_eq!(count, 3);
    for (t, p) in (1..=3).zip(&fused_passes) {
        let n = count as f64;
        let s = sums[t - 1];
        assert_eq!(
            [p.loss, p.ce, p.kl, p.denoise],
            [s[0] / n, s[1] / n, s[2] / n, s[3] / n],
            "block {t}: losses"
        );
        assert_eq!(p.batches, count);
    }
    assert_same_tensors(
        &fused.method().model().named_tensors(),
        &seq.method().model().named_tensors(),
    );
    assert_eq!(
        fused.checkpoint().optimizer_record.steps,
        seq.checkpoint().optimizer_record.steps
    );
}

/// Both orders give every block one update per minibatch and the shared
/// head one per block and minibatch.
#[test]
fn both_orders_update_each_parameter_equally_often() {
    let dev = Device::Cpu;
    let d = data(&dev);
    for (cfg, head_steps) in [(fused_config(1), 9), (tiny_config(1), 9)] {
        let mut t = dt_trainer(cfg, &dev);
        let passes = t.train_epoch(&d.train, &mut Silent).unwrap();
        assert_eq!(
            passes.iter().map(|p| p.block).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(passes.iter().all(|p| p.batches == 3 && p.loss.is_finite()));
        let steps: Vec<u64> = t.checkpoint().optimizer_record.steps;
        assert_eq!(steps, vec![head_steps, 3, 3, 3]);
    }
}

#[test]
fn fused_order_resumes_exactly() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let tmp = tempfile::tempdir().unwrap();
    let run_a = run_dir(&tmp.path().join("a"), &fused_config(2));
    let mut a = dt_trainer(fused_config(2), &dev);
    let report_a = fit(&mut a, &d, Some(&run_a), &mut Silent).unwrap().unwrap();

    let run_b = run_dir(&tmp.path().join("b"), &fused_config(1));
    let mut b = dt_trainer(fused_config(1), &dev);
    fit(&mut b, &d, Some(&run_b), &mut Silent).unwrap();
    let mut c = dt_trainer(fused_config(2), &dev);
    assert_eq!(run_b.restore_latest(&mut c).unwrap(), 1);
    let report_c = fit(&mut c, &d, Some(&run_b), &mut Silent).unwrap().unwrap();

    assert_same_tensors(
        &a.method().model().named_tensors(),
        &c.method().model().named_tensors(),
    );
    assert_eq!(report_a.test_acc_runs, report_c.test_acc_runs);
    // One pass line per block and epoch, as in the sequential order.
    let passes = run_a
        .metrics()
        .unwrap()
        .iter()
        .filter(|v| v["event"] == "pass")
        .count();
    assert_eq!(passes, 2 * 3);
}

/// The fused order learns the synthetic task as the sequential order does.
#[test]
fn fused_training_learns_the_synthetic_task() {
    let dev = Device::Cpu;
    let train = DeviceData::new(&synthetic(320, 5), DType::F32, &dev).unwrap();
    let test = DeviceData::new(&synthetic(100, 6), DType::F32, &dev).unwrap();
    let d = RunData {
        train,
        test,
        train_subset: None,
    };
    let mut cfg = fused_config(3);
    cfg.train.lr = 5e-3;
    let mut t = dt_trainer(cfg, &dev);
    let before = t.evaluate(&d.test, None, 0).unwrap().test_acc;
    let after = fit(&mut t, &d, None, &mut Silent).unwrap().unwrap();
    assert!(
        after.test_acc > 60.0 && after.test_acc > before + 30.0,
        "before {before}, after {:?}",
        after
    );
}

/// `model.embedding.lr = 0` keeps a learned embedding at its initialisation
/// under every method while the networks train; without it the embedding moves.
#[test]
fn embedding_lr_zero_freezes_a_learned_embedding() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let paper = |raw: RawConfig| raw.method;
    let methods = [
        ("dt", tiny_config(1).method),
        // eta as in the DT config the other settings come from.
        (
            "ct",
            match paper(RawConfig::paper_ct(DatasetKind::Mnist)) {
                RawMethod::Ct(CtParams {
                    time_dim,
                    time_scale,
                    schedule,
                    sampler,
                    steps,
                    t_sampling,
                    schedule_training,
                    ..
                }) => RawMethod::Ct(CtParams {
                    eta: 0.1,
                    time_dim,
                    time_scale,
                    schedule,
                    sampler,
                    steps,
                    t_sampling,
                    schedule_training,
                }),
                other => panic!("{other:?}"),
            },
        ),
        // Euler steps at inference.
        ("fm", paper(RawConfig::paper_fm(DatasetKind::Mnist))),
        (
            "backprop",
            RawMethod::Backprop(BackpropParams {
                blocks: 3,
                alpha_init: 0.5,
            }),
        ),
    ];
    for (method, settings) in methods {
        for frozen in [true, false] {
            let mut c = tiny_config(1);
            c.method = settings.clone();
            c.model.embedding = RawEmbedding::Learned {
                dim: 12,
                init: None,
                lr: frozen.then_some(0.0),
                target_grad: true,
            };
            let mut trainer =
                noprop_train::build_trainer(c.validate().unwrap(), dev.clone(), None).unwrap();
            // Copies: the optimizer updates the parameters in place.
            let values = |t: &Trainer| -> BTreeMap<String, Vec<f32>> {
                t.named_tensors()
                    .into_iter()
                    .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                    .collect()
            };
            let before = values(&trainer);
            trainer.train_epoch(&d.train, &mut Silent).unwrap();
            let after = values(&trainer);
            assert_eq!(
                before["embed"] == after["embed"],
                frozen,
                "{method}, frozen {frozen}"
            );
            let moved = before
                .keys()
                .filter(|k| k.as_str() != "embed" && before[*k] != after[*k])
                .count();
            assert!(moved > 0, "{method}: the networks train");
        }
    }
}

/// A checkpoint whose schedule table is not its config's (too long,
/// decreasing, above 1, NaN, or on a method without one) is refused when
/// read, so `eval` and `inspect` see the same schedule.
#[test]
fn a_schedule_table_that_disagrees_with_the_config_is_refused() {
    let trainer = dt_trainer(tiny_config(1), &Device::Cpu);
    let record = trainer.record();
    let meta = record.to_metadata().unwrap();
    let path = std::path::Path::new("m.safetensors");
    assert_eq!(
        checkpoint::ModelRecord::from_metadata(path, &meta).unwrap(),
        record
    );
    let good: Vec<f64> = serde_json::from_str(&meta["schedule"]).unwrap();
    let mut longer = good.clone();
    longer.push(0.5);
    let mut decreasing = good.clone();
    decreasing.reverse();
    for bad in [
        serde_json::to_string(&longer).unwrap(),
        serde_json::to_string(&decreasing).unwrap(),
        serde_json::to_string(&vec![1.5; good.len()]).unwrap(),
        "[null, 0.5, 0.9, 0.99]".to_string(),
    ] {
        let mut m = meta.clone();
        m.insert("schedule".into(), bad.clone());
        let e = checkpoint::ModelRecord::from_metadata(path, &m)
            .expect_err(&bad)
            .to_string();
        assert!(e.contains("schedule") && !e.contains('\n'), "{bad}: {e}");
    }
    let mut m = meta.clone();
    m.remove("schedule");
    assert!(checkpoint::ModelRecord::from_metadata(path, &m).is_err());
    // An epoch no run can reach is refused too.
    let mut m = meta.clone();
    m.insert("epoch".into(), u64::MAX.to_string());
    let e = checkpoint::ModelRecord::from_metadata(path, &m)
        .unwrap_err()
        .to_string();
    assert!(e.contains("epoch") && !e.contains('\n'), "{e}");
}

/// Honest checkpoints read back for every depth: the schedule table, written
/// as the shortest decimals, parses to exactly the config's values (a
/// parser within a unit in the last place refused T = 10, the paper's).
#[test]
fn every_schedule_table_reads_back_exactly() {
    use noprop_train::config::{DtParams, RawMethod};
    let path = std::path::Path::new("m.safetensors");
    for blocks in [1, 2, 3, 5, 8, 10, 15, 16, 20, 30, 50, 100] {
        let mut raw = RawConfig::paper_dt(DatasetKind::Mnist);
        raw.method = RawMethod::Dt(DtParams {
            blocks,
            ..Default::default()
        });
        let cfg = raw.validate().unwrap();
        let record = checkpoint::ModelRecord {
            epoch: 1,
            train_seconds: 1.0,
            config: cfg.raw().clone(),
            schedule: cfg.method.params().alpha_bars(),
            normalization: (vec![0.1307], vec![0.3081]),
            seed_streams: BTreeMap::new(),
        };
        let meta = record.to_metadata().unwrap();
        let back = checkpoint::ModelRecord::from_metadata(path, &meta)
            .unwrap_or_else(|e| panic!("T = {blocks}: {e}"));
        assert_eq!(back, record, "T = {blocks}");
    }
}

/// `raw` trained by `k` workers on threads into a new run folder at `dir`
/// (resumed when `resume`); returns worker 0's model tensors.
fn train_on_workers(
    raw: &RawConfig,
    k: usize,
    run: &RunDir,
    resume: bool,
    d: &RunData,
) -> Result<BTreeMap<String, Tensor>, String> {
    let comms = noprop_train::ThreadCollective::group(k);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut t = dt_trainer(raw.clone(), &Device::Cpu);
                    let mine = (c.rank() == 0).then_some(run);
                    if let (Some(run), true) = (mine, resume) {
                        run.restore_latest(&mut t).map_err(|e| e.to_string())?;
                    }
                    noprop_train::run::fit_parallel(&mut t, d, mine, &mut Silent, &c)
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(t.method().model().named_tensors())
                })
            })
            .collect();
        let mut out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        out.swap_remove(0)
    })
}

/// Each pass's losses and each evaluation's accuracies, as logged.
fn logged(run: &RunDir) -> Vec<serde_json::Value> {
    run.metrics()
        .unwrap()
        .into_iter()
        .filter_map(|v| match v["event"].as_str() {
            Some("pass") => Some(serde_json::json!([
                v["epoch"],
                v["block"],
                v["loss"],
                v["ce"],
                v["kl"],
                v["denoise"]
            ])),
            Some("eval") => Some(serde_json::json!([v["test_acc_runs"], v["train_acc"]])),
            _ => None,
        })
        .collect()
}

#[test]
fn any_number_of_workers_trains_exactly_the_single_worker_run() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let tmp = tempfile::tempdir().unwrap();
    let learned = RawEmbedding::Learned {
        dim: 20,
        init: None,
        lr: None,
        target_grad: true,
    };
    for (order, embedding) in [
        (TrainOrder::Sequential, RawEmbedding::OneHot),
        (TrainOrder::Fused, RawEmbedding::OneHot),
        (TrainOrder::Synchronous, learned),
    ] {
        let mut cfg = tiny_config_blocks(2, 10, order);
        cfg.model.embedding = embedding.clone();
        let base = tmp.path().join(format!("{order:?}"));
        let run = run_dir(&base.join("one"), &cfg);
        let mut one = dt_trainer(cfg.clone(), &dev);
        fit(&mut one, &d, Some(&run), &mut Silent).unwrap();
        let want = one.method().model().named_tensors();
        let want_log = logged(&run);
        let ks: &[usize] = match order {
            TrainOrder::Sequential | TrainOrder::Synchronous => &[1, 2, 3, 5, 10],
            TrainOrder::Fused => &[3],
        };
        for &k in ks {
            let run = run_dir(&base.join(format!("k{k}")), &cfg);
            let got = train_on_workers(&cfg, k, &run, false, &d).unwrap();
            assert_same_tensors(&want, &got);
            assert_eq!(want_log, logged(&run), "{order:?}, {k} workers");
        }
        // Two workers, then resumed with three: still the same run.
        let mut first = tiny_config_blocks(1, 10, order);
        first.model.embedding = embedding;
        let run = run_dir(&base.join("resumed"), &first);
        train_on_workers(&first, 2, &run, false, &d).unwrap();
        let got = train_on_workers(&cfg, 3, &run, true, &d).unwrap();
        assert_same_tensors(&want, &got);
    }
}

fn tiny_config_blocks(epochs: usize, blocks: usize, order: TrainOrder) -> RawConfig {
    let mut cfg = tiny_config(epochs);
    set_blocks(&mut cfg, blocks);
    if let RawMethod::Dt(p) = &mut cfg.method {
        p.order = order;
    }
    cfg
}

#[test]
fn a_split_that_cannot_hold_is_refused_and_a_failed_worker_is_named() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let tmp = tempfile::tempdir().unwrap();
    // More workers than blocks.
    let cfg = tiny_config(1);
    let run = run_dir(&tmp.path().join("many"), &cfg);
    let e = train_on_workers(&cfg, 4, &run, false, &d).unwrap_err();
    assert!(e.contains("4 workers for 3 blocks"), "{e}");
    // A learned embedding learns from every block.
    let mut cfg = tiny_config(1);
    cfg.model.embedding = RawEmbedding::Learned {
        dim: 20,
        init: None,
        lr: None,
        target_grad: true,
    };
    let run = run_dir(&tmp.path().join("learned"), &cfg);
    let e = train_on_workers(&cfg, 2, &run, false, &d).unwrap_err();
    assert!(e.contains("learned or prototype embedding"), "{e}");
    assert_eq!(run.checkpoint_epochs().unwrap(), Vec::<usize>::new());
}

//! Trainer invariants on tiny synthetic data: gradient isolation between
//! blocks, checkpoint round trips, and resume equals an uninterrupted run.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use noprop_core::{dt_loss, q_sample, NoiseRng};
use noprop_data::{Dataset, DatasetKind};
use noprop_models::Mode;
use noprop_train::{checkpoint, fit, Config, DeviceData, DtTrainer, RunData, RunDir, Silent, Trainer};

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
    Dataset { images, labels, channels: 1, height: 28, width: 28, num_classes: 10 }
}

fn tiny_config(epochs: usize) -> Config {
    let mut cfg = Config::paper_dt(DatasetKind::Mnist);
    cfg.model.blocks = 3;
    cfg.train.epochs = epochs;
    cfg.train.batch_size = 16;
    cfg.eval.runs = 2;
    cfg.eval.batch_size = 40;
    cfg.eval.train_subset = 16;
    cfg.checkpoint.keep_last = 0;
    cfg
}

fn data(dev: &Device) -> RunData {
    let train = DeviceData::new(&synthetic(48, 1), DType::F32, dev).unwrap();
    let test = DeviceData::new(&synthetic(40, 2), DType::F32, dev).unwrap();
    let subset = train.head(16).unwrap();
    RunData { train, test, train_subset: Some(subset) }
}

#[test]
fn gradients_never_cross_blocks() {
    let dev = Device::Cpu;
    let trainer = DtTrainer::new(tiny_config(1).validate().unwrap(), dev.clone()).unwrap();
    let model = trainer.model();
    let sched = trainer.config().schedule().clone();
    let ds = synthetic(8, 3);
    let x = Tensor::from_slice(&ds.images, (8, 1, 28, 28), &dev).unwrap();
    let y = Tensor::from_slice(&ds.labels, 8, &dev).unwrap();
    let mut rng = NoiseRng::new(0);
    for t in 1..=3 {
        let u = model.embed().index_select(&y, 0).unwrap();
        let z = q_sample(&u, sched.alpha_bar(t - 1), &mut rng).unwrap();
        let zt = q_sample(&u, sched.alpha_bar(3), &mut rng).unwrap();
        let mut drop = NoiseRng::new(1);
        let uhat = model.denoise_mode(t, &z, &x, &mut Mode::Train(&mut drop)).unwrap();
        let loss = dt_loss(&model.classify(&zt).unwrap(), &y, &uhat, &u, sched.alpha_bar(0), sched.dt_weight(t, 0.1)).unwrap();
        let grads = loss.total.backward().unwrap();
        for j in 1..=3 {
            let data = model.block_vars(j).data().lock().unwrap();
            let with_grad = data.values().filter(|v| grads.get(v.as_tensor()).is_some()).count();
            if j == t {
                // Every parameter of block t is reached (BatchNorm buffers are not parameters).
                assert_eq!(with_grad, data.len() - 2 * 6, "block {t} should have gradients");
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
    let mut cfg = Config::paper_dt(DatasetKind::Mnist);
    cfg.model.blocks = 2;
    let trainer = DtTrainer::new(cfg.validate().unwrap(), Device::Cpu).unwrap();
    let names = trainer.model().named_tensors();
    assert_eq!(names["blocks.1.img.conv1.weight"].dims(), &[32, 1, 3, 3]);
    assert_eq!(names["blocks.2.img.fc.weight"].dims(), &[256, 6272]);
    assert_eq!(names["blocks.2.fuse.out.weight"].dims(), &[10, 128]);
    assert_eq!(names["blocks.1.label.bn1.running_var"].dims(), &[256]);
    assert_eq!(names["head.weight"].dims(), &[10, 10]);
    assert_eq!(names["embed"].dims(), &[10, 10]);
    // Figure 6's block for MNIST with d = 10: about 2.0 M parameters.
    let count = trainer.model().block_parameter_count();
    assert!((1_900_000..2_100_000).contains(&count), "{count}");
}

#[test]
fn same_seed_same_parameters() {
    let a = DtTrainer::new(tiny_config(1).validate().unwrap(), Device::Cpu).unwrap();
    let b = DtTrainer::new(tiny_config(1).validate().unwrap(), Device::Cpu).unwrap();
    let mut c = tiny_config(1);
    c.train.seed = 9;
    let c = DtTrainer::new(c.validate().unwrap(), Device::Cpu).unwrap();
    let key = "blocks.2.label.fc1.weight";
    let get = |t: &DtTrainer| t.model().named_tensors()[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(get(&a), get(&b));
    assert_ne!(get(&a), get(&c));
}

fn assert_same_tensors(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, ta) in a {
        let va = ta.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let vb = b[k].flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(va, vb, "tensor {k} differs");
    }
}

#[test]
fn resume_ends_where_an_uninterrupted_run_would() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let tmp = tempfile::tempdir().unwrap();

    let cfg = tiny_config(2);
    let run_a = RunDir::create(&tmp.path().join("a"), &cfg, serde_json::json!({})).unwrap();
    let mut a = DtTrainer::new(cfg.clone().validate().unwrap(), dev.clone()).unwrap();
    let report_a = fit(&mut a, &d, Some(&run_a), &mut Silent).unwrap().unwrap();

    // The same run, stopped after epoch 1 and resumed from its checkpoint.
    let run_b = RunDir::create(&tmp.path().join("b"), &tiny_config(1), serde_json::json!({})).unwrap();
    let mut b = DtTrainer::new(tiny_config(1).validate().unwrap(), dev.clone()).unwrap();
    fit(&mut b, &d, Some(&run_b), &mut Silent).unwrap();
    let mut c = DtTrainer::new(cfg.validate().unwrap(), dev.clone()).unwrap();
    assert_eq!(run_b.restore_latest(&mut c).unwrap(), 1);
    let report_c = fit(&mut c, &d, Some(&run_b), &mut Silent).unwrap().unwrap();

    assert_same_tensors(&a.model().named_tensors(), &c.model().named_tensors());
    assert_eq!(report_a.test_acc_runs, report_c.test_acc_runs);
    assert_eq!(run_b.checkpoint_epochs().unwrap(), vec![1, 2]);
    let epochs: Vec<u64> = run_b.metrics().unwrap().iter().filter(|v| v["event"] == "epoch").map(|v| v["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, vec![1, 2]);
}

#[test]
fn checkpoint_round_trip_with_metadata() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(&tmp.path().join("r"), &tiny_config(1), serde_json::json!({})).unwrap();
    let mut a = DtTrainer::new(tiny_config(1).validate().unwrap(), dev.clone()).unwrap();
    fit(&mut a, &d, Some(&run), &mut Silent).unwrap();
    let path = run.latest_model().unwrap().unwrap();
    let (tensors, meta) = checkpoint::load_safetensors(&path, &dev).unwrap();
    assert_eq!(meta["method"], "dt");
    assert_eq!(meta["epoch"], "1");
    let cfg: Config = serde_json::from_str(&meta["config"]).unwrap();
    assert_eq!(cfg, tiny_config(1));
    assert_same_tensors(&tensors, &a.model().named_tensors());
    let b = noprop_train::load_for_eval(&path, &dev).unwrap();
    assert_same_tensors(&b.named_tensors(), &a.model().named_tensors());
    assert_eq!(b.epochs_done(), 1);
    // A file that is not safetensors gives a typed error, not a panic.
    let bad = tmp.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    assert!(matches!(checkpoint::load_safetensors(&bad, &dev), Err(noprop_train::TrainError::Checkpoint { .. })));
}

#[test]
fn training_learns_the_synthetic_task() {
    let dev = Device::Cpu;
    let train = DeviceData::new(&synthetic(320, 5), DType::F32, &dev).unwrap();
    let test = DeviceData::new(&synthetic(100, 6), DType::F32, &dev).unwrap();
    let d = RunData { train, test, train_subset: None };
    let mut cfg = tiny_config(3);
    // A larger step than the paper's, so that the head (a Linear on z_T,
    // trained from scratch) is past chance within the few steps a test affords.
    cfg.train.lr = 5e-3;
    let mut t = DtTrainer::new(cfg.validate().unwrap(), dev).unwrap();
    let before = t.evaluate(&d.test, None, 0).unwrap().test_acc;
    let after = fit(&mut t, &d, None, &mut Silent).unwrap().unwrap();
    assert!(after.test_acc > 60.0 && after.test_acc > before + 30.0, "before {before}, after {:?}", after);
}

#[test]
fn invalid_configs_are_rejected() {
    use noprop_train::TrainError::InvalidConfig;
    let mut c = tiny_config(1);
    c.model.blocks = 0;
    assert!(matches!(c.validate(), Err(InvalidConfig { field: "model.blocks", .. })));
    let mut c = tiny_config(1);
    c.train.lr = -1e-3;
    assert!(matches!(c.validate(), Err(InvalidConfig { field: "train.lr", .. })));
    let mut c = tiny_config(1);
    c.model.kernels = "gpu".into();
    assert!(matches!(c.validate(), Err(InvalidConfig { field: "model.kernels", .. })));
    let mut c = tiny_config(1);
    c.schedule = noprop_core::ScheduleSpec::Explicit { alpha_bar: vec![0.0, 0.5, 0.4, 0.9] };
    assert!(matches!(c.validate(), Err(InvalidConfig { field: "schedule", .. })));
    use noprop_train::config::{Embedding, EmbeddingInit};
    let mut c = tiny_config(1);
    c.model.embedding_init = Some(EmbeddingInit::Normal);
    assert!(matches!(c.validate(), Err(InvalidConfig { field: "model.embedding_init", .. })), "one-hot is fixed");
    let mut c = tiny_config(1);
    c.model.embedding = Embedding::Learned;
    c.model.embedding_init = Some(EmbeddingInit::Prototype);
    assert!(matches!(c.clone().validate(), Err(InvalidConfig { field: "model.embedding_init", .. })), "prototype needs d = C*H*W");
    c.model.embedding_dim = 784;
    assert!(c.validate().is_ok());
    let mut c = tiny_config(1);
    c.model.embedding = Embedding::Learned;
    c.model.embedding_dim = 5;
    c.model.embedding_init = Some(EmbeddingInit::Orthogonal);
    assert!(matches!(c.validate(), Err(InvalidConfig { field: "model.embedding_init", .. })), "orthogonal needs d >= m");
    let mut c = tiny_config(1);
    c.train.embedding_lr = Some(1e-4);
    assert!(matches!(c.clone().validate(), Err(InvalidConfig { field: "train.embedding_lr", .. })), "one-hot is fixed");
    c.model.embedding = Embedding::Learned;
    assert!(c.clone().validate().is_ok());
    c.train.embedding_lr = Some(-1e-4);
    assert!(matches!(c.validate(), Err(InvalidConfig { field: "train.embedding_lr", .. })));
    let mut c = tiny_config(1);
    c.model.alpha_init = 1.0;
    assert!(matches!(c.validate(), Err(InvalidConfig { field: "model.alpha_init", .. })));
    let json = serde_json::to_value(tiny_config(1)).unwrap();
    let mut bad = json.clone();
    bad["train"]["learning_rate"] = serde_json::json!(0.1);
    assert!(serde_json::from_value::<Config>(bad).is_err());
}

#[test]
fn continuous_methods_checkpoint_and_resume_exactly() {
    use noprop_train::config::Method;
    let dev = Device::Cpu;
    let d = data(&dev);
    for method in [Method::Ct, Method::Fm] {
        let mut cfg = Config::paper_continuous(DatasetKind::Mnist, method);
        cfg.train.epochs = 2;
        cfg.train.batch_size = 16;
        cfg.eval.runs = 2;
        cfg.eval.steps = 5;
        cfg.eval.batch_size = 40;
        cfg.checkpoint.keep_last = 0;
        let tmp = tempfile::tempdir().unwrap();
        let run_a = RunDir::create(&tmp.path().join("a"), &cfg, serde_json::json!({})).unwrap();
        let mut a = noprop_train::build_trainer(cfg.clone().validate().unwrap(), dev.clone(), None).unwrap();
        let report_a = fit(a.as_mut(), &d, Some(&run_a), &mut Silent).unwrap().unwrap();
        let names = a.named_tensors();
        assert!(names.contains_key("net.img.conv1.weight") && names.contains_key("net.time.fc.weight"));
        assert_eq!(names.contains_key("schedule.w1"), method == Method::Ct);

        let mut one = cfg.clone();
        one.train.epochs = 1;
        let run_b = RunDir::create(&tmp.path().join("b"), &one, serde_json::json!({})).unwrap();
        let mut b = noprop_train::build_trainer(one.validate().unwrap(), dev.clone(), None).unwrap();
        fit(b.as_mut(), &d, Some(&run_b), &mut Silent).unwrap();
        let mut c = noprop_train::build_trainer(cfg.clone().validate().unwrap(), dev.clone(), None).unwrap();
        run_b.restore_latest(c.as_mut()).unwrap();
        let report_c = fit(c.as_mut(), &d, Some(&run_b), &mut Silent).unwrap().unwrap();
        assert_same_tensors(&a.named_tensors(), &c.named_tensors());
        assert_eq!(report_a.test_acc_runs, report_c.test_acc_runs, "{method:?}");
        let e = noprop_train::load_for_eval(&run_b.latest_model().unwrap().unwrap(), &dev).unwrap();
        assert_same_tensors(&e.named_tensors(), &a.named_tensors());
    }
}

fn fused_config(epochs: usize) -> Config {
    let mut cfg = tiny_config(epochs);
    cfg.train.order = noprop_train::config::TrainOrder::Fused;
    cfg
}

/// A fused step is the T sequential steps of Algorithm 1 on one minibatch,
/// each block drawing from its own streams: the same updates, bit for bit,
/// for the blocks and the head.
#[test]
fn fused_step_is_each_blocks_sequential_step_on_one_minibatch() {
    let dev = Device::Cpu;
    let ds = synthetic(16, 4);
    let x = Tensor::from_slice(&ds.images, (16, 1, 28, 28), &dev).unwrap();
    let y = Tensor::from_slice(&ds.labels, 16, &dev).unwrap();
    let streams = |t: u64| (NoiseRng::new(100 + t), NoiseRng::new(200 + t));
    let mut fused = DtTrainer::new(fused_config(1).validate().unwrap(), dev.clone()).unwrap();
    let mut seq = DtTrainer::new(tiny_config(1).validate().unwrap(), dev.clone()).unwrap();
    let mut rngs: Vec<_> = (1..=3).map(streams).collect();
    let fused_losses = fused.fused_step(&x, &y, &mut rngs).unwrap();
    for t in 1..=3 {
        let (mut noise, mut drop) = streams(t as u64);
        let l = seq.train_step(t, &x, &y, &mut noise, &mut drop).unwrap();
        assert_eq!(l, fused_losses[t - 1], "block {t}: losses");
    }
    assert_same_tensors(&fused.model().named_tensors(), &seq.model().named_tensors());
    // And the streams moved on exactly as far.
    let (mut noise, _) = streams(2);
    let u = Tensor::zeros((16, 10), DType::F32, &dev).unwrap();
    for _ in 0..2 {
        q_sample(&u, 0.5, &mut noise).unwrap();
    }
    let next = |r: &mut NoiseRng| q_sample(&u, 0.5, r).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(next(&mut rngs[1].0), next(&mut noise));
}

/// Both orders give every block one update per minibatch and the shared
/// head one per block and minibatch.
#[test]
fn both_orders_update_each_parameter_equally_often() {
    let dev = Device::Cpu;
    let d = data(&dev);
    for (cfg, head_steps) in [(fused_config(1), 9), (tiny_config(1), 9)] {
        let mut t = DtTrainer::new(cfg.validate().unwrap(), dev.clone()).unwrap();
        let passes = t.train_epoch(&d.train, &mut Silent).unwrap();
        assert_eq!(passes.iter().map(|p| p.block).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(passes.iter().all(|p| p.batches == 3 && p.loss.is_finite()));
        let (_, meta) = t.optimizer_checkpoint();
        let steps: Vec<u64> = serde_json::from_str(&meta["steps"]).unwrap();
        assert_eq!(steps, vec![head_steps, 3, 3, 3]);
    }
}

#[test]
fn fused_order_resumes_exactly() {
    let dev = Device::Cpu;
    let d = data(&dev);
    let tmp = tempfile::tempdir().unwrap();
    let run_a = RunDir::create(&tmp.path().join("a"), &fused_config(2), serde_json::json!({})).unwrap();
    let mut a = DtTrainer::new(fused_config(2).validate().unwrap(), dev.clone()).unwrap();
    let report_a = fit(&mut a, &d, Some(&run_a), &mut Silent).unwrap().unwrap();

    let run_b = RunDir::create(&tmp.path().join("b"), &fused_config(1), serde_json::json!({})).unwrap();
    let mut b = DtTrainer::new(fused_config(1).validate().unwrap(), dev.clone()).unwrap();
    fit(&mut b, &d, Some(&run_b), &mut Silent).unwrap();
    let mut c = DtTrainer::new(fused_config(2).validate().unwrap(), dev.clone()).unwrap();
    assert_eq!(run_b.restore_latest(&mut c).unwrap(), 1);
    let report_c = fit(&mut c, &d, Some(&run_b), &mut Silent).unwrap().unwrap();

    assert_same_tensors(&a.model().named_tensors(), &c.model().named_tensors());
    assert_eq!(report_a.test_acc_runs, report_c.test_acc_runs);
    // One pass line per block and epoch, as in the sequential order.
    let passes = run_a.metrics().unwrap().iter().filter(|v| v["event"] == "pass").count();
    assert_eq!(passes, 2 * 3);
}

/// The fused order learns the synthetic task as the sequential order does.
#[test]
fn fused_training_learns_the_synthetic_task() {
    let dev = Device::Cpu;
    let train = DeviceData::new(&synthetic(320, 5), DType::F32, &dev).unwrap();
    let test = DeviceData::new(&synthetic(100, 6), DType::F32, &dev).unwrap();
    let d = RunData { train, test, train_subset: None };
    let mut cfg = fused_config(3);
    cfg.train.lr = 5e-3;
    let mut t = DtTrainer::new(cfg.validate().unwrap(), dev).unwrap();
    let before = t.evaluate(&d.test, None, 0).unwrap().test_acc;
    let after = fit(&mut t, &d, None, &mut Silent).unwrap().unwrap();
    assert!(after.test_acc > 60.0 && after.test_acc > before + 30.0, "before {before}, after {:?}", after);
}

/// `train.embedding_lr = 0` keeps a learned embedding at its initialisation
/// under every method while the networks train; without it the embedding moves.
#[test]
fn embedding_lr_zero_freezes_a_learned_embedding() {
    use noprop_train::config::{Embedding, Method, Sampler};
    let dev = Device::Cpu;
    let d = data(&dev);
    for method in [Method::Dt, Method::Ct, Method::Fm, Method::Backprop] {
        for frozen in [true, false] {
            let mut c = tiny_config(1);
            c.model.method = method;
            c.model.embedding = Embedding::Learned;
            c.model.embedding_dim = 12;
            if method == Method::Fm {
                c.eval.sampler = Sampler::Euler;
            }
            c.train.embedding_lr = frozen.then_some(0.0);
            let mut trainer = noprop_train::build_trainer(c.validate().unwrap(), dev.clone(), None).unwrap();
            // Copies: the optimizer updates the parameters in place.
            let values = |t: &dyn Trainer| -> BTreeMap<String, Vec<f32>> {
                t.named_tensors().into_iter().map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
            };
            let before = values(trainer.as_ref());
            trainer.train_epoch(&d.train, &mut Silent).unwrap();
            let after = values(trainer.as_ref());
            assert_eq!(before["embed"] == after["embed"], frozen, "{method:?}, frozen {frozen}");
            let moved = before.keys().filter(|k| k.as_str() != "embed" && before[*k] != after[*k]).count();
            assert!(moved > 0, "{method:?}: the networks train");
        }
    }
}

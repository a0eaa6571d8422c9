//! The run folder as a journal: non-finite state is never saved, a second
//! process cannot take a folder in use, a kill in the commit window loses
//! no epoch event, pruning removes only what noprop wrote, a killed
//! creation can be started again, and checkpoints that are not what noprop
//! writes are refused.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use noprop_core::NoiseRng;
use noprop_data::{Dataset, DatasetKind};
use noprop_train::config::{DtParams, RawMethod};
use noprop_train::{
    build_trainer, checkpoint, fit, DeviceData, RawConfig, RunData, RunDir, RunMeta, Silent,
    TrainError, Trainer,
};

fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = NoiseRng::new(seed);
    let mut images = vec![0f32; n * 28 * 28];
    rng.fill_normal(&mut images);
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7 + seed as u32) % 10).collect();
    Dataset {
        images,
        labels,
        channels: 1,
        height: 28,
        width: 28,
        num_classes: 10,
    }
}

fn config(epochs: usize) -> RawConfig {
    let mut c = RawConfig::paper_dt(DatasetKind::Mnist);
    if let RawMethod::Dt(DtParams { blocks, .. }) = &mut c.method {
        *blocks = 2;
    }
    c.train.epochs = epochs;
    c.train.batch_size = 16;
    c.eval.runs = 1;
    c.eval.batch_size = 40;
    c.eval.train_subset = 0;
    c.checkpoint.keep_last = 0;
    c
}

fn data() -> RunData {
    let dev = Device::Cpu;
    RunData {
        train: DeviceData::new(&synthetic(32, 1), DType::F32, &dev).unwrap(),
        test: DeviceData::new(&synthetic(16, 2), DType::F32, &dev).unwrap(),
        train_subset: None,
    }
}

fn trainer(epochs: usize) -> Trainer {
    build_trainer(config(epochs).validate().unwrap(), Device::Cpu, None).unwrap()
}

fn new_run(root: &Path, t: &Trainer) -> RunDir {
    RunDir::create(root, t, &RunMeta::new(t, 1, vec!["test".into()])).unwrap()
}

#[test]
fn non_finite_state_stops_training_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let d = data();
    let mut t = trainer(1);
    let run = new_run(&root, &t);
    fit(&mut t, &d, Some(&run), &mut Silent).unwrap();
    // A BatchNorm statistic overflows while every loss stays finite.
    let mut tensors = t.named_tensors();
    let name = "blocks.2.fuse.bn1.running_var";
    let v = tensors[name].clone();
    tensors.insert(
        name.into(),
        Tensor::full(f32::INFINITY, v.dims(), &Device::Cpu).unwrap(),
    );
    let mut t2 = build_trainer(config(2).validate().unwrap(), Device::Cpu, None).unwrap();
    let resumed = RunDir::open(&root).unwrap();
    drop(run);
    let resumed_lock = RunDir::resume(resumed.path()).unwrap();
    resumed_lock.restore_latest(&mut t2).unwrap();
    let record =
        checkpoint::ModelRecord::from_metadata(Path::new("x"), &t2.record().to_metadata().unwrap())
            .unwrap();
    t2.load_weights(&tensors, &record).unwrap();
    let err = fit(&mut t2, &d, Some(&resumed_lock), &mut Silent).unwrap_err();
    match &err {
        TrainError::NonFiniteState {
            epoch: 2, tensor, ..
        } => assert_eq!(tensor, name),
        other => panic!("expected NonFiniteState, got {other}"),
    }
    assert!(err.to_string().contains(name), "{err}");
    assert_eq!(
        resumed_lock.checkpoint_epochs().unwrap(),
        vec![1],
        "no checkpoint of the bad epoch"
    );
    // The good checkpoint still loads.
    noprop_train::load_for_eval(&resumed_lock.latest_model().unwrap().unwrap(), &Device::Cpu)
        .unwrap();
}

#[test]
fn a_second_process_cannot_take_a_folder_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let t = trainer(1);
    let run = new_run(&root, &t);
    // Another open file description conflicts like another process would.
    match RunDir::resume(&root) {
        Err(TrainError::RunLocked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        other => panic!(
            "expected RunLocked, got {:?}",
            other.map(|r| r.path().to_path_buf())
        ),
    }
    assert!(matches!(
        RunDir::create(&root, &t, &RunMeta::new(&t, 1, vec![])),
        Err(TrainError::RunLocked { .. })
    ));
    // Reading is allowed while it trains.
    RunDir::open(&root).unwrap();
    drop(run);
    RunDir::resume(&root).unwrap();
}

#[test]
fn a_killed_creation_can_be_started_again_but_a_run_cannot_be_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    // What a creation killed before config.json leaves behind.
    std::fs::create_dir_all(root.join("checkpoints")).unwrap();
    std::fs::write(root.join("meta.json"), "{}").unwrap();
    std::fs::write(root.join("metrics.jsonl"), "").unwrap();
    let t = trainer(1);
    let run = new_run(&root, &t);
    drop(run);
    assert!(matches!(
        RunDir::create(&root, &t, &RunMeta::new(&t, 1, vec![])),
        Err(TrainError::RunExists { .. })
    ));
    // A folder with a user's file is not taken either.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    assert!(matches!(
        RunDir::create(&other, &t, &RunMeta::new(&t, 1, vec![])),
        Err(TrainError::RunExists { .. })
    ));
    assert_eq!(
        std::fs::read_to_string(other.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn resume_restores_the_events_of_an_epoch_committed_just_before_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data();
    // A run whose metrics are cut as a kill between epoch 2's commit and
    // its events would leave them: epoch 1 whole, epoch 2 only in the checkpoint.
    let killed = tmp.path().join("killed");
    let mut b = trainer(2);
    let run_b = new_run(&killed, &b);
    fit(&mut b, &d, Some(&run_b), &mut Silent).unwrap();
    let text = std::fs::read_to_string(run_b.metrics_path()).unwrap();
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("\"event\":\"epoch\""))
            .count(),
        2
    );
    let cut: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("\"epoch\":2"))
        .collect();
    std::fs::write(
        run_b.metrics_path(),
        cut.join("\n") + "\n{\"event\":\"pass\",\"epo",
    )
    .unwrap();
    run_b.reconcile_metrics(2).unwrap();
    assert_eq!(
        std::fs::read_to_string(run_b.metrics_path()).unwrap(),
        text,
        "every event exactly once, in order"
    );
    // Events of an epoch after the last checkpoint are dropped.
    run_b.reconcile_metrics(1).unwrap();
    let epochs: Vec<u64> = run_b
        .metrics()
        .unwrap()
        .iter()
        .filter_map(|v| v["epoch"].as_u64())
        .collect();
    assert!(epochs.iter().all(|&e| e == 1));
}

#[test]
fn pruning_removes_only_what_noprop_wrote_and_names_are_checked_against_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let d = data();
    let mut c = config(1);
    c.checkpoint.keep_last = 1;
    let mut t = build_trainer(c.validate().unwrap(), Device::Cpu, None).unwrap();
    let run = new_run(&root, &t);
    fit(&mut t, &d, Some(&run), &mut Silent).unwrap();
    std::fs::write(root.join("checkpoints/epoch-0001/mine.txt"), "keep me").unwrap();
    drop(run);
    // Extend to 2 epochs: epoch 1's checkpoint is pruned, the user's file stays.
    let mut c = config(2);
    c.checkpoint.keep_last = 1;
    let mut t = build_trainer(c.validate().unwrap(), Device::Cpu, None).unwrap();
    let run = RunDir::resume(&root).unwrap();
    assert_eq!(run.restore_latest(&mut t).unwrap(), 1);
    fit(&mut t, &d, Some(&run), &mut Silent).unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("checkpoints/epoch-0001/mine.txt")).unwrap(),
        "keep me"
    );
    assert!(!root
        .join("checkpoints/epoch-0001/model.safetensors")
        .exists());
    assert_eq!(run.checkpoint_epochs().unwrap(), vec![2]);
    // A checkpoint folder renamed by hand is refused, not trusted.
    std::fs::rename(
        root.join("checkpoints/epoch-0002"),
        root.join("checkpoints/epoch-0007"),
    )
    .unwrap();
    let mut t = build_trainer(config(9).validate().unwrap(), Device::Cpu, None).unwrap();
    let err = run.restore_latest(&mut t).unwrap_err().to_string();
    assert!(err.contains("epoch 2") && err.contains("epoch 7"), "{err}");
}

#[test]
fn non_finite_and_integer_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = trainer(1);
    let meta = t.record().to_metadata().unwrap();
    // All NaN.
    let nan: std::collections::BTreeMap<String, Tensor> = t
        .named_tensors()
        .into_iter()
        .map(|(k, v)| (k, Tensor::full(f32::NAN, v.dims(), &Device::Cpu).unwrap()))
        .collect();
    let path = tmp.path().join("nan.safetensors");
    checkpoint::save_safetensors(&path, &nan, meta.clone()).unwrap();
    let err = noprop_train::load_for_eval(&path, &Device::Cpu)
        .err()
        .expect("a NaN checkpoint must be refused")
        .to_string();
    assert!(err.contains("non-finite"), "{err}");
    // An integer tensor where F32 belongs.
    let mut ints = t.named_tensors();
    let head = ints["head.bias"].dims().to_vec();
    ints.insert(
        "head.bias".into(),
        Tensor::zeros(head, DType::I64, &Device::Cpu).unwrap(),
    );
    let path = tmp.path().join("int.safetensors");
    checkpoint::save_safetensors(&path, &ints, meta).unwrap();
    let err = noprop_train::load_for_eval(&path, &Device::Cpu)
        .err()
        .expect("an integer tensor must be refused")
        .to_string();
    assert!(err.contains("head.bias") && err.contains("F32"), "{err}");
}

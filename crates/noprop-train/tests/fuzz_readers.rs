//! Property tests over the config and checkpoint readers: arbitrary bytes
//! and mutations of valid files (truncation, bit flips, forged sizes and
//! numbers) give typed errors, never a panic, and nothing is allocated for
//! a size before it is checked.
//!
//! `cargo test -p noprop-train --test fuzz_readers` runs a few seconds;
//! `NOPROP_FUZZ_CASES=20000` runs longer.

use std::collections::BTreeMap;

use candle_core::Device;
use noprop_data::DatasetKind;
use noprop_train::{build_trainer, checkpoint, RawConfig};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("NOPROP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Every shipped kind of config, as JSON.
fn valid_configs() -> Vec<serde_json::Value> {
    let ds = DatasetKind::Mnist;
    [
        RawConfig::paper_dt(ds),
        RawConfig::paper_ct(ds),
        RawConfig::paper_fm(ds),
        RawConfig::paper_backprop(ds),
        RawConfig::paper_adjoint(ds),
    ]
    .iter()
    .map(|c| serde_json::to_value(c).unwrap())
    .collect()
}

/// Every leaf of a JSON value, as a path of keys.
fn leaves(v: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                path.push(k.clone());
                leaves(x, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

fn set(v: &mut serde_json::Value, path: &[String], new: serde_json::Value) {
    let mut cur = v;
    for k in path {
        cur = &mut cur[k.as_str()];
    }
    *cur = new;
}

fn hostile_number() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        any::<u64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)),
        Just(serde_json::Value::from(1u64 << 40)),
        Just(serde_json::Value::from(u64::MAX)),
        Just(serde_json::Value::from(0)),
        Just(serde_json::Value::from("x")),
        Just(serde_json::Value::Null),
    ]
}

/// A count: mostly in `lo..=hi`, sometimes 0, 1 or far too large.
fn count(lo: u64, hi: u64) -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        16 => (lo..=hi).prop_map(serde_json::Value::from),
        1 => Just(serde_json::Value::from(0)),
        1 => Just(serde_json::Value::from(1)),
        1 => Just(serde_json::Value::from(u64::MAX)),
    ]
}

/// A real number: mostly in `lo..hi`, sometimes negative, zero or huge.
fn real(lo: f64, hi: f64) -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        16 => (lo..hi).prop_map(serde_json::Value::from),
        1 => Just(serde_json::Value::from(-1.0)),
        1 => Just(serde_json::Value::from(0.0)),
        1 => Just(serde_json::Value::from(1e300)),
    ]
}

/// A config built field by field, every method and embedding, values
/// mostly plausible and sometimes out of range, sometimes with a key that
/// does not belong: it reaches `validate` and exercises its rules.
fn structured_config() -> impl Strategy<Value = serde_json::Value> {
    let method = prop_oneof![
        (count(1, 12), real(0.0, 2.0), prop::bool::ANY).prop_map(|(b, eta, fused)| serde_json::json!({
            "kind": "dt", "blocks": b, "eta": eta, "order": if fused { "fused" } else { "sequential" }})),
        (real(0.0, 2.0), count(2, 128), count(1, 2000), prop::sample::select(vec!["eq3", "euler", "heun"]))
            .prop_map(|(eta, td, steps, sampler)| serde_json::json!({
                "kind": "ct", "eta": eta, "time_dim": td, "steps": steps, "sampler": sampler})),
        (real(0.0, 1.0), count(2, 128), count(1, 2000)).prop_map(|(sigma, td, steps)| serde_json::json!({
            "kind": "fm", "sigma": sigma, "time_dim": td, "steps": steps})),
        (count(1, 12), real(-1.0, 1.0)).prop_map(|(b, a)| serde_json::json!({
            "kind": "backprop", "blocks": b, "alpha_init": a})),
        (count(1, 100), count(1, 100)).prop_map(|(t, s)| serde_json::json!({
            "kind": "adjoint", "train_steps": t, "steps": s})),
    ];
    let embedding = prop_oneof![
        Just(serde_json::json!({"kind": "one-hot"})),
        (
            count(1, 4096),
            prop::option::of(real(0.0, 1e-2)),
            prop::bool::ANY
        )
            .prop_map(|(dim, lr, tg)| {
                let mut e = serde_json::json!({"kind": "learned", "dim": dim, "target_grad": tg});
                if let Some(lr) = lr {
                    e["lr"] = lr;
                }
                e
            }),
        Just(serde_json::json!({"kind": "prototype"})),
    ];
    let dataset = prop::sample::select(vec!["mnist", "cifar10", "cifar100"]);
    let stray = prop::option::weighted(
        0.1,
        prop::sample::select(vec!["data", "model", "method", "train", "eval"]),
    );
    (
        method,
        embedding,
        dataset,
        real(0.0, 0.9),
        count(2, 512),
        real(1e-5, 1e-1),
        count(1, 1000),
        count(1, 2000),
        stray,
    )
        .prop_map(
            |(method, embedding, dataset, dropout, batch, lr, runs, eval_batch, stray)| {
                let mut v = serde_json::json!({
                    "data": {"dataset": dataset},
                    "model": {"embedding": embedding, "dropout": dropout},
                    "method": method,
                    "train": {"epochs": 1, "batch_size": batch, "lr": lr, "weight_decay": 1e-3},
                    "eval": {"runs": runs, "batch_size": eval_batch},
                });
                if let Some(section) = stray {
                    v[section]["not_a_field"] = serde_json::json!(1);
                }
                v
            },
        )
}

/// Structured configs reach `validate` (most parse), both outcomes occur,
/// every refusal is one line, and what validates stays within the limits
/// and reads back from its own `config.json` form as the same config.
#[test]
fn structured_configs_reach_validation_and_round_trip() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = structured_config();
    let (mut parsed, mut valid, n) = (0, 0, 4 * cases() as usize);
    for _ in 0..n {
        let v = strategy.new_tree(&mut runner).unwrap().current();
        let raw = match RawConfig::from_json_value(v) {
            Ok(raw) => raw,
            Err(e) => {
                assert!(!e.to_string().contains('\n'), "{e}");
                continue;
            }
        };
        parsed += 1;
        match raw.validate() {
            Ok(cfg) => {
                valid += 1;
                assert!(cfg.parameters() <= noprop_train::config::limits::PARAMETERS);
                let json = serde_json::to_value(cfg.raw()).unwrap();
                let again = RawConfig::from_json_value(json)
                    .unwrap()
                    .validate()
                    .unwrap();
                assert_eq!(again, cfg);
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
        }
    }
    assert!(
        parsed * 4 >= n * 3,
        "only {parsed} of {n} structured configs parsed"
    );
    assert!(
        valid * 5 >= n && valid < n,
        "{valid} of {n} validated: both outcomes must occur"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_config_reader(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            if let Ok(raw) = RawConfig::from_json_value(v) {
                let _ = raw.validate();
            }
        }
    }

    #[test]
    fn a_hostile_value_in_any_field_is_an_error_or_a_model_within_limits(which in 0usize..5, leaf in any::<prop::sample::Index>(), value in hostile_number()) {
        let mut v = valid_configs().swap_remove(which);
        let mut paths = vec![];
        leaves(&v, &mut vec![], &mut paths);
        let path = leaf.get(&paths).clone();
        set(&mut v, &path, value);
        if let Ok(raw) = RawConfig::from_json_value(v) {
            if let Ok(cfg) = raw.validate() {
                // Whatever validates builds a model within the parameter budget.
                prop_assert!(cfg.parameters() <= noprop_train::config::limits::PARAMETERS);
            }
        }
    }
}

/// A small valid checkpoint file.
fn checkpoint_bytes() -> Vec<u8> {
    let mut raw = RawConfig::paper_fm(DatasetKind::Mnist);
    raw.train.epochs = 1;
    let trainer = build_trainer(raw.validate().unwrap(), Device::Cpu, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.safetensors");
    // A few tensors keep the cases fast; the metadata is the real one.
    let tensors: BTreeMap<_, _> = trainer
        .named_tensors()
        .into_iter()
        .filter(|(k, _)| k.starts_with("head") || k == "embed")
        .collect();
    checkpoint::save_safetensors(&path, &tensors, trainer.record().to_metadata().unwrap()).unwrap();
    std::fs::read(&path).unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    HeaderLen(u64),
    Splice(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<u64>().prop_map(Mutation::HeaderLen),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Splice(i, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn mutated_checkpoints_are_errors_or_valid_never_panics(ms in proptest::collection::vec(mutation(), 1..4)) {
        let mut bytes = checkpoint_bytes();
        for m in ms {
            match m {
                Mutation::Truncate(n) => bytes.truncate(n % (bytes.len() + 1)),
                Mutation::Flip(i, b) if !bytes.is_empty() => { let i = i % bytes.len(); bytes[i] ^= b }
                Mutation::HeaderLen(n) if bytes.len() >= 8 => bytes[..8].copy_from_slice(&n.to_le_bytes()),
                Mutation::Splice(i, b) if !bytes.is_empty() => {
                    let i = i % bytes.len();
                    let end = (i + b.len()).min(bytes.len());
                    bytes[i..end].copy_from_slice(&b[..end - i]);
                }
                _ => {}
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok((_, meta)) = checkpoint::load_safetensors(&path, &Device::Cpu) {
            if let Ok(record) = checkpoint::ModelRecord::from_metadata(&path, &meta) {
                let _ = record.config.validate();
            }
        }
    }
}

/// The parameter count the budget uses is the real one, within the
/// BatchNorm statistics it also counts.
#[test]
fn the_parameter_budget_counts_the_real_model() {
    let mut proto_fm = RawConfig::paper_fm(DatasetKind::Mnist);
    proto_fm.model.embedding = noprop_train::config::RawEmbedding::Prototype {
        init: None,
        lr: None,
        target_grad: true,
    };
    let mut proto_dt = RawConfig::paper_dt(DatasetKind::Cifar10);
    proto_dt.model.embedding = noprop_train::config::RawEmbedding::Prototype {
        init: None,
        lr: None,
        target_grad: true,
    };
    for raw in [
        RawConfig::paper_dt(DatasetKind::Mnist),
        RawConfig::paper_ct(DatasetKind::Cifar10),
        RawConfig::paper_backprop(DatasetKind::Cifar100),
        RawConfig::paper_adjoint(DatasetKind::Mnist),
        proto_fm,
        proto_dt,
    ] {
        let cfg = raw.validate().unwrap();
        let counted = cfg.parameters();
        let trainer = build_trainer(cfg, Device::Cpu, None).unwrap();
        let real: usize = trainer
            .named_tensors()
            .values()
            .map(|t| t.elem_count())
            .sum();
        assert_eq!(
            counted,
            real as u128,
            "{:?}",
            trainer.config().method.kind()
        );
    }
}

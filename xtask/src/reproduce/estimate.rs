//! `--plan`'s time estimates: each run's remaining wall time from a short
//! `noprop bench` of its model on this machine.
//!
//! The arithmetic follows the trainer (noprop-train's `Trainer::train_epoch`,
//! `run::fit` and `Trainer::evaluate`): an epoch is the method's passes over
//! the minibatches of the (possibly limited) training set, NoProp-DT's `T`
//! one-block steps per minibatch and one step of the one network for every
//! other method; an evaluation after every `eval.every` epochs and after the
//! last runs the stochastic (and deterministic) inference runs on the test
//! images and one run on the train subset. Data loading and checkpoint
//! writes are left out.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use toml::{Table, Value};

use super::rows::{Dataset, PaperMethod};

/// Timed training steps of the plan's benchmark, after `BENCH_WARMUP` untimed ones.
pub const BENCH_STEPS: usize = 5;
const BENCH_WARMUP: usize = 2;
/// The most images in the benchmark's timed NoProp-DT inference on the
/// CPU, where T = 10 block passes make the time per image hardly depend on
/// the batch. Elsewhere it runs the evaluation's own batch size: on a GPU,
/// and for the continuous-time methods, whose 1000 small steps each carry a
/// fixed cost (at 200 images a CT image cost 6 times what it costs in a
/// batch of 1000 on this machine).
const CPU_INFER_BATCH: usize = 200;

/// Training and test images of a whole data set.
fn sizes(ds: Dataset) -> (usize, usize) {
    use noprop_data::Split;
    (ds.examples(Split::Train), ds.examples(Split::Test))
}

/// The key of [`Bench::dt_shared_fraction`] in `noprop bench --json`.
const DT_SHARED_FRACTION: &str = "dt_shared_fraction";

/// What `noprop bench --json` measured for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Bench {
    /// Seconds of one training step (one block for NoProp-DT), the median.
    pub step_seconds: f64,
    /// Seconds per image of one stochastic inference run through all steps.
    pub infer_seconds: f64,
    /// Worker threads it ran with.
    pub threads: Option<u64>,
    /// The share of a NoProp-DT inference run's time that stacked runs
    /// share (bench.rs, `dt_shared_fraction`); only NoProp-DT benches
    /// report it, and noprop binaries older than the field do not.
    pub dt_shared_fraction: Option<f64>,
}

impl Bench {
    /// Reads the JSON summary that `noprop bench --json` prints as its last line.
    pub fn from_json(stdout: &str) -> Result<Self> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .context("noprop bench printed nothing on stdout")?;
        let v: serde_json::Value =
            serde_json::from_str(line).context("noprop bench's last line is not JSON")?;
        let positive = |key: &str| {
            v[key]
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .with_context(|| format!("noprop bench's JSON has no positive {key}"))
        };
        Ok(Self {
            // `step_ms` is every method's (one block's for NoProp-DT); older
            // binaries print `block_step_ms` only.
            step_seconds: positive("step_ms").or_else(|_| positive("block_step_ms"))? / 1000.0,
            infer_seconds: 1.0 / positive("infer_images_per_s")?,
            threads: v["threads"].as_u64(),
            dt_shared_fraction: v[DT_SHARED_FRACTION]
                .as_f64()
                .filter(|s| (0.0..=1.0).contains(s)),
        })
    }
}

/// A run's remaining wall time, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Estimate {
    pub train: f64,
    pub eval: f64,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.train + self.eval
    }
}

impl std::ops::AddAssign for Estimate {
    fn add_assign(&mut self, o: Self) {
        self.train += o.train;
        self.eval += o.eval;
    }
}

fn get<'a>(t: &'a Table, section: &str, key: &str) -> Option<&'a Value> {
    t.get(section).and_then(|s| s.get(key))
}

/// A non-negative integer setting, `default` when absent.
fn count(t: &Table, section: &str, key: &str, default: usize) -> Result<usize> {
    match get(t, section, key) {
        None => Ok(default),
        Some(v) => v
            .as_integer()
            .and_then(|x| usize::try_from(x).ok())
            .with_context(|| format!("{section}.{key} is not a non-negative integer")),
    }
}

fn flag(t: &Table, section: &str, key: &str, default: bool) -> Result<bool> {
    match get(t, section, key) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .with_context(|| format!("{section}.{key} is not true or false")),
    }
}

/// The method a config trains (`method.kind`).
fn method(t: &Table) -> Result<PaperMethod> {
    let kind = get(t, "method", "kind")
        .and_then(Value::as_str)
        .context("the config has no method.kind")?;
    PaperMethod::ALL
        .into_iter()
        .find(|m| m.name() == kind)
        .with_context(|| {
            format!("method.kind {kind:?} is not one of dt, ct, fm, backprop, adjoint")
        })
}

/// Minibatches of a training pass over `n` images: the trainer's batcher
/// drops a last batch of fewer than 2 (BatchNorm needs two).
pub fn batches_per_pass(n: usize, batch: usize) -> usize {
    n / batch + usize::from(n % batch >= 2)
}

/// The wall time left to a run of `config` on `ds` after `epochs_done`
/// epochs, from the benchmark of its model: training steps at
/// `bench.step_seconds`, and inference at `bench.infer_seconds` per image
/// and run, NoProp-DT's stacked runs sharing `bench.dt_shared_fraction` of
/// a run.
pub fn estimate(
    config: &Table,
    ds: Dataset,
    bench: &Bench,
    epochs_done: usize,
) -> Result<Estimate> {
    let method = method(config)?;
    let epochs = count(config, "train", "epochs", 0)?;
    let batch = count(config, "train", "batch_size", 0)?;
    if batch == 0 {
        bail!("the config has no train.batch_size");
    }
    let (full_train, full_test) = sizes(ds);
    let n_train = count(config, "data", "train_limit", full_train)?.min(full_train);
    let n_test = count(config, "data", "test_limit", full_test)?.min(full_test);
    let runs = count(config, "eval", "runs", 5)?;
    let deterministic = flag(config, "eval", "deterministic", true)?;
    let subset = count(config, "eval", "train_subset", 10_000)?.min(n_train);
    let every = count(config, "eval", "every", 1)?.max(1);

    // Steps per minibatch: NoProp-DT trains each of its T blocks on every
    // minibatch (sequential: T passes; fused: one pass of T lanes); every
    // other method steps one network.
    let lanes = match method {
        PaperMethod::Dt => count(config, "method", "blocks", 0)?,
        PaperMethod::Ct | PaperMethod::Fm | PaperMethod::Backprop | PaperMethod::Adjoint => 1,
    };
    let left = epochs.saturating_sub(epochs_done);
    let train = (left * lanes * batches_per_pass(n_train, batch)) as f64 * bench.step_seconds;

    // Test runs stacked into one pass, and runs made on their own: the
    // deterministic run where the sampler has noise (dt.rs, ct.rs
    // `deterministic_run`).
    let (stacked, separate) = match method {
        PaperMethod::Dt => (runs + usize::from(deterministic), 0),
        PaperMethod::Ct => {
            let eq3 = get(config, "method", "sampler")
                .and_then(Value::as_str)
                .is_none_or(|s| s == "eq3");
            (runs, usize::from(deterministic && eq3))
        }
        PaperMethod::Fm | PaperMethod::Backprop | PaperMethod::Adjoint => (runs, 0),
    };
    let shared = match method {
        PaperMethod::Dt => bench.dt_shared_fraction.with_context(|| {
            format!(
                "noprop bench's JSON has no {DT_SHARED_FRACTION} between 0 and 1 \
                 (from a noprop built before it reported one?)"
            )
        })?,
        PaperMethod::Ct | PaperMethod::Fm | PaperMethod::Backprop | PaperMethod::Adjoint => 0.0,
    };
    let runs_cost = |k: usize| {
        if k == 0 {
            0.0
        } else {
            shared + k as f64 * (1.0 - shared)
        }
    };
    let one_eval = bench.infer_seconds
        * (n_test as f64 * (runs_cost(stacked) + separate as f64) + subset as f64);
    let evals = (epochs_done + 1..=epochs)
        .filter(|e| e % every == 0 || *e == epochs)
        .count();
    Ok(Estimate {
        train,
        eval: evals as f64 * one_eval,
    })
}

/// The `noprop bench` options that time a run of `config` on `device`: its
/// minibatch size, and an inference batch of the evaluation's size
/// ([`CPU_INFER_BATCH`] at most for NoProp-DT on the CPU).
pub fn bench_args(config: &Table, device: &str, threads: Option<usize>) -> Result<Vec<String>> {
    let batch = count(config, "train", "batch_size", 0)?;
    if batch == 0 {
        bail!("the config has no train.batch_size");
    }
    let eval_batch = count(config, "eval", "batch_size", 1000)?.max(1);
    let dt = get(config, "method", "kind").and_then(Value::as_str) == Some("dt");
    let infer = if device == "cpu" && dt {
        eval_batch.min(CPU_INFER_BATCH)
    } else {
        eval_batch
    };
    let mut args: Vec<String> = [
        "--steps",
        &BENCH_STEPS.to_string(),
        "--warmup",
        &BENCH_WARMUP.to_string(),
        "--op-reps",
        "0",
        "--fused-steps",
        "0",
        "--batch",
        &batch.to_string(),
        "--infer-batch",
        &infer.to_string(),
        "--device",
        device,
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(t) = threads {
        args.extend(["--threads".into(), t.to_string()]);
    }
    Ok(args)
}

/// What decides a benchmark's figures: the config without the settings
/// that change neither a training step nor an inference run (seed, epochs,
/// data limits, evaluation counts, the embedding's initialisation, class
/// probabilities, checkpoints), and the bench options. Runs with equal keys
/// share one benchmark: a row's seeds, its Figure 4 and 5 variants.
pub fn cost_key(config: &Table, args: &[String]) -> String {
    let mut t = config.clone();
    let mut drop = |section: &str, keys: &[&str]| {
        if let Some(s) = t.get_mut(section).and_then(Value::as_table_mut) {
            for k in keys {
                s.remove(*k);
            }
        }
    };
    drop("train", &["seed", "epochs"]);
    drop("data", &["dir", "train_limit", "test_limit"]);
    drop(
        "eval",
        &[
            "runs",
            "deterministic",
            "train_subset",
            "every",
            "batch_size",
        ],
    );
    // The radial probabilities cost O(B m d) once per step, next to the
    // block's convolutions.
    drop("model", &["class_probability"]);
    t.remove("checkpoint");
    if let Some(e) = t
        .get_mut("model")
        .and_then(|m| m.get_mut("embedding"))
        .and_then(Value::as_table_mut)
    {
        e.remove("init");
    }
    format!(
        "{}\n{}",
        toml::to_string(&t).unwrap_or_default(),
        args.join(" ")
    )
}

/// A failed `noprop bench` in one line: its exit and the last line it wrote
/// on stderr (noprop's own `error: ...`).
pub fn bench_failure(status: &str, stderr: &str) -> String {
    let last = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message");
    format!(
        "noprop bench failed ({status}): {}",
        last.strip_prefix("error: ").unwrap_or(last)
    )
}

/// Runs `noprop bench` on a config file; the error is one line.
pub fn run_bench(noprop: &Path, config: &Path, args: &[String]) -> Result<Bench, String> {
    let out = Command::new(noprop)
        .arg("bench")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", noprop.display()))?;
    if !out.status.success() {
        let status = out
            .status
            .code()
            .map_or_else(|| out.status.to_string(), |c| format!("exit {c}"));
        return Err(bench_failure(
            &status,
            &String::from_utf8_lossy(&out.stderr),
        ));
    }
    Bench::from_json(&String::from_utf8_lossy(&out.stdout)).map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Table {
        toml::from_str(text).unwrap()
    }

    /// `configs/mnist-dt-onehot.toml` as far as the estimate reads it.
    const MNIST_DT: &str = "[data]\ndataset = \"mnist\"\n[model]\nembedding = { kind = \"one-hot\" }\n\
        [method]\nkind = \"dt\"\nblocks = 10\neta = 0.1\n[train]\nepochs = 100\nbatch_size = 128\nseed = 0\n\
        [eval]\nruns = 5\ndeterministic = true\nbatch_size = 1000\ntrain_subset = 10000\nevery = 1\n";

    /// A bench's figures: `step` seconds per training step, `infer` seconds
    /// per image and run, and NoProp-DT's stacked runs sharing 0.985 of a
    /// run (about MNIST one-hot's share).
    fn bench(step: f64, infer: f64) -> Bench {
        Bench {
            step_seconds: step,
            infer_seconds: infer,
            threads: Some(2),
            dt_shared_fraction: Some(0.985),
        }
    }

    /// Sets `section.key`, adding it if absent (indexing only replaces).
    fn set(t: &mut Table, section: &str, key: &str, v: Value) {
        t[section].as_table_mut().unwrap().insert(key.into(), v);
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn last_short_batch_is_dropped() {
        // 60000 = 468 x 128 + 96.
        assert_eq!(batches_per_pass(60_000, 128), 469);
        assert_eq!(batches_per_pass(2048, 128), 16);
        assert_eq!(batches_per_pass(257, 128), 2);
        assert_eq!(batches_per_pass(258, 128), 3);
        assert_eq!(batches_per_pass(1, 128), 0);
    }

    #[test]
    fn dt_full_run() {
        let t = config(MNIST_DT);
        let b = Bench::from_json(
            "{\"step_ms\":100.0,\"infer_images_per_s\":500.0,\"dt_shared_fraction\":0.985}",
        )
        .unwrap();
        let e = estimate(&t, Dataset::Mnist, &b, 0).unwrap();
        // 100 epochs x 10 blocks x 469 minibatches x 0.1 s.
        assert!(close(e.train, 46_900.0), "{}", e.train);
        // 100 evaluations: 10000 test images with 5 + 1 stacked runs, and
        // 10000 train images with one.
        let s = 0.985;
        let once = 0.002 * (10_000.0 * (s + 6.0 * (1.0 - s)) + 10_000.0);
        assert!(close(e.eval, 100.0 * once), "{} {}", e.eval, 100.0 * once);
        assert!(close(e.total(), e.train + e.eval));
    }

    #[test]
    fn resumed_and_finished_runs() {
        let t = config(MNIST_DT);
        let b = bench(0.1, 0.002);
        let full = estimate(&t, Dataset::Mnist, &b, 0).unwrap();
        let rest = estimate(&t, Dataset::Mnist, &b, 40).unwrap();
        assert!(close(rest.train, 0.6 * full.train));
        assert!(close(rest.eval, 0.6 * full.eval));
        assert_eq!(
            estimate(&t, Dataset::Mnist, &b, 100).unwrap(),
            Estimate::default()
        );
    }

    #[test]
    fn evaluations_every_n_and_after_the_last() {
        let mut t = config(MNIST_DT);
        t["train"]["epochs"] = Value::Integer(10);
        t["eval"]["every"] = Value::Integer(3);
        t["eval"]["train_subset"] = Value::Integer(0);
        t["eval"]["deterministic"] = Value::Boolean(false);
        t["eval"]["runs"] = Value::Integer(1);
        let b = bench(0.0, 1.0);
        // After epochs 3, 6, 9 and 10, one run over 10000 test images.
        let e = estimate(&t, Dataset::Mnist, &b, 0).unwrap();
        assert!(close(e.eval, 4.0 * 10_000.0), "{}", e.eval);
        // Resumed after epoch 6: 9 and 10.
        let e = estimate(&t, Dataset::Mnist, &b, 6).unwrap();
        assert!(close(e.eval, 2.0 * 10_000.0), "{}", e.eval);
    }

    #[test]
    fn quick_limits_and_fused_order() {
        let mut t = config(MNIST_DT);
        t["train"]["epochs"] = Value::Integer(2);
        set(&mut t, "method", "order", Value::String("fused".into()));
        set(&mut t, "data", "train_limit", Value::Integer(2048));
        set(&mut t, "data", "test_limit", Value::Integer(1000));
        t["eval"]["train_subset"] = Value::Integer(1000);
        let e = estimate(&t, Dataset::Mnist, &bench(0.1, 0.0), 0).unwrap();
        // Either order: 2 epochs x 10 blocks x 16 one-block steps.
        assert!(close(e.train, 2.0 * 10.0 * 16.0 * 0.1), "{}", e.train);
        // A train subset larger than the limited training set is clipped.
        t["eval"]["train_subset"] = Value::Integer(10_000);
        t["eval"]["runs"] = Value::Integer(0);
        t["eval"]["deterministic"] = Value::Boolean(false);
        let e = estimate(&t, Dataset::Mnist, &bench(0.0, 1.0), 0).unwrap();
        assert!(close(e.eval, 2.0 * 2048.0), "{}", e.eval);
    }

    #[test]
    fn continuous_methods_step_one_network() {
        let ct = config(
            "[method]\nkind = \"ct\"\neta = 1.0\nsteps = 1000\n[train]\nepochs = 1\nbatch_size = 128\n\
             [eval]\nruns = 5\ntrain_subset = 0\n",
        );
        // Only NoProp-DT benches report a shared fraction.
        let b = Bench {
            dt_shared_fraction: None,
            ..bench(0.5, 1.0)
        };
        let e = estimate(&ct, Dataset::Cifar10, &b, 0).unwrap();
        // 50000 / 128 = 390 full batches and one of 80.
        assert!(close(e.train, 391.0 * 0.5), "{}", e.train);
        // eq. 3: 5 stochastic runs and a separate deterministic one, no sharing.
        assert!(close(e.eval, 10_000.0 * 6.0), "{}", e.eval);
        let mut flow = ct.clone();
        set(&mut flow, "method", "sampler", Value::String("heun".into()));
        let e = estimate(&flow, Dataset::Cifar10, &b, 0).unwrap();
        assert!(close(e.eval, 10_000.0 * 5.0), "{}", e.eval);
        let mut fm = ct.clone();
        fm["method"]["kind"] = Value::String("fm".into());
        let e = estimate(&fm, Dataset::Cifar10, &b, 0).unwrap();
        assert!(close(e.eval, 10_000.0 * 5.0), "{}", e.eval);
        let mut bp = ct;
        bp["method"]["kind"] = Value::String("backprop".into());
        let e = estimate(&bp, Dataset::Cifar10, &b, 0).unwrap();
        assert!(close(e.train, 391.0 * 0.5), "{}", e.train);
    }

    #[test]
    fn unreadable_configs_are_errors() {
        let mut t = config(MNIST_DT);
        t["train"].as_table_mut().unwrap().remove("batch_size");
        let err = estimate(&t, Dataset::Mnist, &bench(1.0, 1.0), 0).unwrap_err();
        assert!(err.to_string().contains("train.batch_size"), "{err}");
        let mut t = config(MNIST_DT);
        t["method"]["kind"] = Value::String("sgd".into());
        assert!(estimate(&t, Dataset::Mnist, &bench(1.0, 1.0), 0).is_err());
    }

    #[test]
    fn bench_json() {
        let out =
            "{\"block_step_ms\":233.34,\"infer_images_per_s\":200.0,\"threads\":2,\"blocks\":10}\n";
        let b = Bench::from_json(out).unwrap();
        assert!(close(b.step_seconds, 0.23334));
        assert!(close(b.infer_seconds, 0.005));
        assert_eq!(b.threads, Some(2));
        // A binary older than dt_shared_fraction: no estimate for NoProp-DT,
        // and a one-line error naming the field.
        assert_eq!(b.dt_shared_fraction, None);
        let err = estimate(&config(MNIST_DT), Dataset::Mnist, &b, 0).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("dt_shared_fraction") && !msg.contains('\n'),
            "{msg}"
        );
        let with = |s: &str| {
            let out = format!(
                "{{\"step_ms\":1.0,\"infer_images_per_s\":1.0,\"dt_shared_fraction\":{s}}}"
            );
            Bench::from_json(&out).unwrap().dt_shared_fraction
        };
        assert_eq!(with("0.985"), Some(0.985));
        assert_eq!(with("1.5"), None);
        assert_eq!(with("\"0.9\""), None);
        assert!(Bench::from_json("").is_err());
        assert!(Bench::from_json("op  fwd ms\n").is_err());
        assert!(Bench::from_json("{\"block_step_ms\":1.0}").is_err());
        assert!(Bench::from_json("{\"block_step_ms\":0,\"infer_images_per_s\":1}").is_err());
        // Every method's bench prints step_ms.
        let ct = "{\"method\":\"ct\",\"step_ms\":250.0,\"infer_images_per_s\":25.0,\"infer_steps\":1000}";
        let b = Bench::from_json(ct).unwrap();
        assert!(close(b.step_seconds, 0.25));
        assert!(close(b.infer_seconds, 0.04));
    }

    #[test]
    fn bench_failure_is_one_line() {
        let msg = bench_failure(
            "exit 1",
            "warming up\nerror: noprop bench times NoProp-DT blocks; the config trains ct\n\n",
        );
        assert_eq!(
            msg,
            "noprop bench failed (exit 1): noprop bench times NoProp-DT blocks; the config trains ct"
        );
        assert!(!bench_failure("signal: 9", "").contains('\n'));
    }

    #[test]
    fn bench_options() {
        let t = config(MNIST_DT);
        let a = bench_args(&t, "cpu", Some(2)).unwrap().join(" ");
        assert!(
            a.contains("--batch 128 --infer-batch 200 --device cpu --json"),
            "{a}"
        );
        assert!(a.ends_with("--threads 2"), "{a}");
        let a = bench_args(&t, "cuda", None).unwrap().join(" ");
        assert!(a.contains("--infer-batch 1000 --device cuda"), "{a}");
        // Continuous-time methods time inference at the evaluation's batch.
        let mut t = config(MNIST_DT);
        t["method"]["kind"] = Value::String("ct".into());
        let a = bench_args(&t, "cpu", None).unwrap().join(" ");
        assert!(a.contains("--infer-batch 1000 --device cpu"), "{a}");
    }

    #[test]
    fn seeds_and_variants_share_a_benchmark() {
        let args = vec!["--batch".to_string(), "128".into()];
        let base = config(MNIST_DT);
        let mut other_seed = base.clone();
        other_seed["train"]["seed"] = Value::Integer(2);
        other_seed["train"]["epochs"] = Value::Integer(2);
        other_seed["eval"]["every"] = Value::Integer(2);
        let mut radial = base.clone();
        radial["model"].as_table_mut().unwrap().insert(
            "class_probability".into(),
            Value::Table(config("kind = \"radial\"\nsigma = 1.0\n")),
        );
        let key = cost_key(&base, &args);
        assert_eq!(cost_key(&other_seed, &args), key);
        assert_eq!(cost_key(&radial, &args), key);
        let proto = |init: &str| {
            let mut t = base.clone();
            t["model"]["embedding"] = Value::Table(config(&format!(
                "kind = \"prototype\"\ninit = \"{init}\"\n"
            )));
            cost_key(&t, &args)
        };
        assert_eq!(proto("normal"), proto("orthogonal"));
        assert_ne!(proto("normal"), key);
        let mut t3 = base.clone();
        t3["method"]["blocks"] = Value::Integer(3);
        assert_ne!(cost_key(&t3, &args), key);
        assert_ne!(cost_key(&base, &["--batch".into(), "64".into()]), key);
    }
}

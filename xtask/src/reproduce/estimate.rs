//! `--plan`'s time estimates: each run's remaining wall time from a short
//! `noprop bench` of its config on this machine. The benchmark reports the
//! seconds of one epoch and of one evaluation of that config
//! (`epoch_s`, `eval_s`: noprop's bench counts them as the trainer runs
//! them); this module only multiplies them by the epochs and evaluations
//! left.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use toml::{Table, Value};

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

/// What `noprop bench --json` measured for one config.
#[derive(Debug, Clone, PartialEq)]
pub struct Bench {
    /// Seconds of one training epoch of the config.
    pub epoch_seconds: f64,
    /// Seconds of one evaluation of the config.
    pub eval_seconds: f64,
    /// Worker threads it ran with.
    pub threads: Option<u64>,
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
        let seconds = |key: &str| {
            v[key]
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .with_context(|| {
                    format!("noprop bench's JSON has no {key} (from a noprop built before it reported one?)")
                })
        };
        Ok(Self {
            epoch_seconds: seconds("epoch_s")?,
            eval_seconds: seconds("eval_s")?,
            threads: v["threads"].as_u64(),
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

/// The wall time left to a run of `config` after `epochs_done` epochs: its
/// epochs left at the benchmark's `epoch_s`, and its evaluations left
/// (every `eval.every` epochs and after the last) at `eval_s`.
pub fn estimate(config: &Table, bench: &Bench, epochs_done: usize) -> Result<Estimate> {
    let epochs = count(config, "train", "epochs", 0)?;
    let every = count(config, "eval", "every", 1)?.max(1);
    let evals = (epochs_done + 1..=epochs)
        .filter(|e| e % every == 0 || *e == epochs)
        .count();
    Ok(Estimate {
        train: epochs.saturating_sub(epochs_done) as f64 * bench.epoch_seconds,
        eval: evals as f64 * bench.eval_seconds,
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
/// that change neither an epoch's nor an evaluation's cost (seed, epochs,
/// how often it evaluates, the embedding's initialisation, class
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
    drop("data", &["dir"]);
    drop("eval", &["every"]);
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

    fn bench(epoch: f64, eval: f64) -> Bench {
        Bench {
            epoch_seconds: epoch,
            eval_seconds: eval,
            threads: Some(2),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn full_resumed_and_finished_runs() {
        let t = config(MNIST_DT);
        let full = estimate(&t, &bench(469.0, 30.0), 0).unwrap();
        assert!(close(full.train, 100.0 * 469.0) && close(full.eval, 100.0 * 30.0));
        assert!(close(full.total(), full.train + full.eval));
        let rest = estimate(&t, &bench(469.0, 30.0), 40).unwrap();
        assert!(close(rest.train, 0.6 * full.train) && close(rest.eval, 0.6 * full.eval));
        assert_eq!(
            estimate(&t, &bench(469.0, 30.0), 100).unwrap(),
            Estimate::default()
        );
    }

    #[test]
    fn evaluations_every_n_and_after_the_last() {
        let mut t = config(MNIST_DT);
        t["train"]["epochs"] = Value::Integer(10);
        t["eval"]["every"] = Value::Integer(3);
        // After epochs 3, 6, 9 and 10.
        assert!(close(estimate(&t, &bench(0.0, 1.0), 0).unwrap().eval, 4.0));
        // Resumed after epoch 6: 9 and 10.
        assert!(close(estimate(&t, &bench(0.0, 1.0), 6).unwrap().eval, 2.0));
    }

    #[test]
    fn unreadable_configs_are_errors() {
        let mut t = config(MNIST_DT);
        t["train"]["epochs"] = Value::String("many".into());
        let err = estimate(&t, &bench(1.0, 1.0), 0).unwrap_err();
        assert!(err.to_string().contains("train.epochs"), "{err}");
    }

    #[test]
    fn bench_json() {
        let out = "{\"epoch_s\":469.5,\"eval_s\":30.25,\"threads\":2,\"blocks\":10}\n";
        let b = Bench::from_json(out).unwrap();
        assert_eq!(
            b,
            Bench {
                epoch_seconds: 469.5,
                eval_seconds: 30.25,
                threads: Some(2)
            }
        );
        // A binary older than the fields: a one-line error naming the field.
        let err = Bench::from_json("{\"step_ms\":1.0,\"infer_images_per_s\":1.0}").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("epoch_s") && !msg.contains('\n'), "{msg}");
        assert!(Bench::from_json("").is_err());
        assert!(Bench::from_json("op  fwd ms\n").is_err());
        assert!(Bench::from_json("{\"epoch_s\":-1,\"eval_s\":1}").is_err());
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

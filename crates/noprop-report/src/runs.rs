//! Reading run folders written by `noprop train`: whether a run is finished,
//! what its `metrics.jsonl` says, and whether it was made with the config
//! that the reproduction would use now.

use serde_json::Value as Json;
use toml::Value as Toml;

/// One `eval` event of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct Eval {
    pub epoch: usize,
    /// Mean test accuracy over the stochastic runs, in percent.
    pub test_acc: f64,
    /// The accuracy of each stochastic run.
    pub test_acc_runs: Vec<f64>,
    pub test_acc_deterministic: Option<f64>,
    pub train_acc: Option<f64>,
    /// Cumulative training seconds up to this epoch (evaluation excluded).
    pub train_seconds: Option<f64>,
}

/// What a run's `metrics.jsonl` holds, up to its last finished epoch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    /// The last epoch with an `epoch` event (0 if none).
    pub epochs_done: usize,
    /// Evaluations of finished epochs, in order.
    pub evals: Vec<Eval>,
    /// Cumulative training seconds at the last finished epoch.
    pub train_seconds: Option<f64>,
    /// The largest `train_peak_rss_bytes` over the finished epochs, if reported.
    pub peak_rss_bytes: Option<u64>,
    /// `train_peak_rss_bytes` of epoch 1, trained before any evaluation ran
    /// in the process (later epochs also count memory that the evaluation
    /// left resident).
    pub first_epoch_rss_bytes: Option<u64>,
    /// The largest `train_peak_device_bytes` (GPU memory in use, CUDA only)
    /// over the finished epochs, if reported; `null` on the CPU is `None`.
    pub peak_device_bytes: Option<u64>,
    /// `train_peak_device_bytes` of epoch 1 (see `first_epoch_rss_bytes`).
    pub first_epoch_device_bytes: Option<u64>,
}

impl Summary {
    /// The evaluation of the last finished epoch, if there was one then.
    pub fn final_eval(&self) -> Option<&Eval> {
        self.evals.last().filter(|e| e.epoch == self.epochs_done)
    }

    /// The latest evaluation of a finished epoch, if any: for an unfinished
    /// run, the latest figure there is.
    pub fn latest_eval(&self) -> Option<&Eval> {
        self.evals.last()
    }
}

pub(super) fn as_usize(v: &Json) -> Option<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok())
}

/// Reads `metrics.jsonl` text. Lines that are not JSON (a line torn by a
/// killed run) are skipped, and events of an epoch that never got its
/// `epoch` line (work after the last checkpoint) are left out, as a resume
/// drops them.
pub fn summarise(metrics: &str) -> Summary {
    let events: Vec<Json> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut s = Summary::default();
    for v in events.iter().filter(|v| v["event"] == "epoch") {
        if let Some(e) = as_usize(&v["epoch"]) {
            if e >= s.epochs_done {
                s.epochs_done = e;
                s.train_seconds = v["train_seconds"].as_f64();
            }
        }
        let first = as_usize(&v["epoch"]) == Some(1);
        for (key, peak, first_epoch) in [
            (
                "train_peak_rss_bytes",
                &mut s.peak_rss_bytes,
                &mut s.first_epoch_rss_bytes,
            ),
            (
                "train_peak_device_bytes",
                &mut s.peak_device_bytes,
                &mut s.first_epoch_device_bytes,
            ),
        ] {
            if let Some(b) = v.get(key).and_then(Json::as_u64) {
                *peak = Some(peak.map_or(b, |p| p.max(b)));
                if first {
                    *first_epoch = Some(b);
                }
            }
        }
    }
    for v in events.iter().filter(|v| v["event"] == "eval") {
        let (Some(epoch), Some(test_acc)) = (as_usize(&v["epoch"]), v["test_acc"].as_f64()) else {
            continue;
        };
        if epoch == 0 || epoch > s.epochs_done {
            continue;
        }
        let runs = v["test_acc_runs"]
            .as_array()
            .map(|a| a.iter().filter_map(Json::as_f64).collect())
            .unwrap_or_default();
        // A resumed run's metrics hold each epoch once; keep the last if not.
        s.evals.retain(|e: &Eval| e.epoch != epoch);
        s.evals.push(Eval {
            epoch,
            test_acc,
            test_acc_runs: runs,
            test_acc_deterministic: v["test_acc_deterministic"].as_f64(),
            train_acc: v["train_acc"].as_f64(),
            train_seconds: v["train_seconds"].as_f64(),
        });
    }
    s.evals.sort_by_key(|e| e.epoch);
    s
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No run folder (or one with no config in it yet).
    New,
    /// Started; `epochs_done` epochs are checkpointed.
    Partial { epochs_done: usize },
    /// At least the target number of epochs are done.
    Finished { epochs_done: usize },
}

/// The state of a run folder whose `config.json` exists, from its metrics
/// text and the number of epochs the reproduction asks for.
pub fn state(metrics: &str, target_epochs: usize) -> State {
    let done = summarise(metrics).epochs_done;
    if done >= target_epochs {
        State::Finished { epochs_done: done }
    } else {
        State::Partial { epochs_done: done }
    }
}

fn same_number(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// The keys (dotted paths) whose value in the generated TOML config differs
/// from the run's `config.json`. Keys the run's config does not have are
/// not compared (`config.json` drops some defaults), and neither is
/// `train.epochs`, which a resume may change.
pub fn config_differences(wanted: &toml::Table, run: &Json) -> Vec<String> {
    fn walk(prefix: &str, t: &toml::Table, run: &Json, out: &mut Vec<String>) {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            let Some(r) = run.get(k) else { continue };
            let same = match v {
                Toml::Table(sub) => {
                    walk(&path, sub, r, out);
                    continue;
                }
                Toml::String(s) => r.as_str() == Some(s),
                Toml::Integer(i) => r.as_f64().is_some_and(|x| same_number(x, *i as f64)),
                Toml::Float(f) => r.as_f64().is_some_and(|x| same_number(x, *f)),
                Toml::Boolean(b) => r.as_bool() == Some(*b),
                Toml::Array(_) | Toml::Datetime(_) => {
                    serde_json::to_value(v).ok().as_ref() == Some(r)
                }
            };
            if !same && path != "train.epochs" {
                out.push(format!("{path} = {v} here, {r} in the run"));
            }
        }
    }
    let mut out = vec![];
    walk("", wanted, run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_EPOCHS: &str = r#"{"event":"pass","epoch":1,"block":1,"loss":2.3,"seconds":1.0}
{"epoch":1,"event":"eval","seconds":4.2,"test_acc":90.0,"test_acc_deterministic":91.0,"test_acc_runs":[89.0,91.0],"test_acc_se":1.0,"train_acc":92.0,"train_seconds":3.0}
{"checkpoint":"checkpoints/epoch-0001","epoch":1,"epoch_seconds":3.0,"event":"epoch","train_seconds":3.0,"train_peak_rss_bytes":1000}
{"event":"pass","epoch":2,"block":1,"loss":2.1,"seconds":1.0}
{"epoch":2,"event":"eval","seconds":4.2,"test_acc":95.0,"test_acc_deterministic":null,"test_acc_runs":[94.0,96.0],"test_acc_se":1.0,"train_acc":null,"train_seconds":6.5}
{"checkpoint":"checkpoints/epoch-0002","epoch":2,"epoch_seconds":3.5,"event":"epoch","train_seconds":6.5,"train_peak_rss_bytes":3000}
"#;

    #[test]
    fn finished_run() {
        assert_eq!(state(TWO_EPOCHS, 2), State::Finished { epochs_done: 2 });
        assert_eq!(state(TWO_EPOCHS, 1), State::Finished { epochs_done: 2 });
        let s = summarise(TWO_EPOCHS);
        assert_eq!(s.evals.len(), 2);
        assert_eq!(s.peak_rss_bytes, Some(3000));
        assert_eq!(s.first_epoch_rss_bytes, Some(1000));
        assert_eq!(s.train_seconds, Some(6.5));
        let last = s.final_eval().unwrap();
        assert_eq!((last.epoch, last.test_acc, last.train_acc), (2, 95.0, None));
        assert_eq!(last.test_acc_runs, [94.0, 96.0]);
        assert_eq!(s.evals[0].test_acc_deterministic, Some(91.0));
    }

    #[test]
    fn run_asked_for_more_epochs_is_partial() {
        assert_eq!(state(TWO_EPOCHS, 5), State::Partial { epochs_done: 2 });
    }

    #[test]
    fn interrupted_mid_epoch_counts_only_checkpointed_epochs() {
        // Killed after epoch 2's eval line was half written, before its epoch line.
        let cut = TWO_EPOCHS.find(r#"{"epoch":2,"event":"eval""#).unwrap() + 30;
        let text = &TWO_EPOCHS[..cut];
        assert_eq!(state(text, 2), State::Partial { epochs_done: 1 });
        let s = summarise(text);
        assert_eq!(s.evals.len(), 1);
        assert_eq!(s.peak_rss_bytes, Some(1000));
        // Killed after the eval line but before the epoch line: the eval is not counted.
        let cut = TWO_EPOCHS
            .find(r#"{"checkpoint":"checkpoints/epoch-0002""#)
            .unwrap();
        let s = summarise(&TWO_EPOCHS[..cut]);
        assert_eq!((s.epochs_done, s.evals.len()), (1, 1));
        assert_eq!(s.final_eval().unwrap().epoch, 1);
    }

    #[test]
    fn empty_metrics_is_partial_at_zero() {
        assert_eq!(state("", 3), State::Partial { epochs_done: 0 });
        assert_eq!(summarise("").final_eval(), None);
    }

    #[test]
    fn missing_rss_field_is_none() {
        let text = TWO_EPOCHS
            .replace(r#","train_peak_rss_bytes":1000"#, "")
            .replace(r#","train_peak_rss_bytes":3000"#, "");
        assert_eq!(summarise(&text).peak_rss_bytes, None);
        assert_eq!(summarise(&text).first_epoch_rss_bytes, None);
    }

    #[test]
    fn device_memory_is_read_beside_rss() {
        // Written on CUDA: the largest over epochs and epoch 1's, as for RSS.
        let text = TWO_EPOCHS
            .replace(
                r#""train_peak_rss_bytes":1000"#,
                r#""train_peak_rss_bytes":1000,"train_peak_device_bytes":700"#,
            )
            .replace(
                r#""train_peak_rss_bytes":3000"#,
                r#""train_peak_rss_bytes":3000,"train_peak_device_bytes":900"#,
            );
        let s = summarise(&text);
        assert_eq!(s.peak_device_bytes, Some(900));
        assert_eq!(s.first_epoch_device_bytes, Some(700));
        assert_eq!(
            (s.peak_rss_bytes, s.first_epoch_rss_bytes),
            (Some(3000), Some(1000))
        );
        // Runs made before the field existed have no device figure either.
        assert_eq!(summarise(TWO_EPOCHS).peak_device_bytes, None);
    }

    #[test]
    fn null_device_memory_is_none() {
        // Written on the CPU: the field is there, as null.
        let text = TWO_EPOCHS.replace(
            r#","train_peak_rss_bytes":"#,
            r#","train_peak_device_bytes":null,"train_peak_rss_bytes":"#,
        );
        assert!(text.contains("null,\"train_peak_rss_bytes\":3000"));
        let s = summarise(&text);
        assert_eq!(
            (s.peak_device_bytes, s.first_epoch_device_bytes),
            (None, None)
        );
        assert_eq!(s.peak_rss_bytes, Some(3000));
    }

    #[test]
    fn latest_eval_of_an_unfinished_run() {
        // Asked for 5 epochs, 3 done, epoch 3 not evaluated: epoch 2's is the latest.
        let text =
            format!("{TWO_EPOCHS}{{\"epoch\":3,\"event\":\"epoch\",\"train_seconds\":9.0}}\n");
        assert_eq!(state(&text, 5), State::Partial { epochs_done: 3 });
        let s = summarise(&text);
        assert_eq!(s.final_eval(), None);
        assert_eq!(
            s.latest_eval().map(|e| (e.epoch, e.test_acc)),
            Some((2, 95.0))
        );
        assert_eq!(summarise("").latest_eval(), None);
    }

    #[test]
    fn eval_every_n_epochs_has_no_final_eval_in_between() {
        let text = TWO_EPOCHS
            .lines()
            .filter(|l| !l.contains(r#""epoch":2,"event":"eval""#))
            .collect::<Vec<_>>()
            .join("\n");
        let s = summarise(&text);
        assert_eq!(s.epochs_done, 2);
        assert_eq!(s.final_eval(), None);
    }

    #[test]
    fn config_comparison() {
        let wanted: toml::Table = toml::from_str(
            "[data]\ndataset = \"mnist\"\ntrain_limit = 2560\n[train]\nepochs = 2\nlr = 1e-3\nseed = 0\n\
             [model]\nextra = true\n[model.class_probability]\nkind = \"radial\"\nsigma = 1.0\n",
        )
        .unwrap();
        let run: Json = serde_json::json!({
            "data": {"dataset": "mnist", "train_limit": 2560},
            "train": {"epochs": 100, "lr": 0.001, "seed": 0},
            "model": {"class_probability": {"kind": "radial", "sigma": 1.0}}
        });
        assert!(
            config_differences(&wanted, &run).is_empty(),
            "{:?}",
            config_differences(&wanted, &run)
        );
        let run: Json = serde_json::json!({
            "data": {"dataset": "mnist", "train_limit": 0},
            "train": {"epochs": 2, "lr": 0.001, "seed": 1},
            "model": {"class_probability": {"kind": "softmax"}}
        });
        let d = config_differences(&wanted, &run);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("data.train_limit"));
    }
}

//! `cargo xtask curve`: one run folder's learning curve, as a CSV table
//! and an SVG figure beside the paper's Table 1 figure, for long runs
//! whose record goes under `docs/` while checkpoints stay out of the
//! repository.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::plot::{LinePlot, Series};
use super::rows::{Dataset, Embedding, Method, Row};
use super::runs::{summarise, Eval};
use super::table::{mean_se, paper_epochs, paper_test};

pub const HELP: &str = "\
curve RUN_DIR [--out DIR] [--title TEXT]
        one run folder's learning curve: curve.csv (per finished epoch: the
        training losses averaged over the epoch's passes, seconds, and the
        accuracies where the epoch was evaluated) and curve.svg (test
        accuracy against epoch, with the paper's Table 1 figure where the
        run is a Table 1 configuration). --out DIR writes there instead of
        into the run folder and copies metrics.jsonl and config.json beside
        (never checkpoints).";

/// One finished epoch of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPoint {
    pub epoch: usize,
    /// Passes over the data in the epoch (DT: one per block).
    pub passes: usize,
    /// `[loss, ce, kl, denoise]`, each the mean over the epoch's passes.
    pub losses: [Option<f64>; 4],
    pub epoch_seconds: Option<f64>,
    /// Cumulative training seconds (evaluation excluded).
    pub train_seconds: Option<f64>,
    pub eval: Option<Eval>,
}

const LOSS_KEYS: [&str; 4] = ["loss", "ce", "kl", "denoise"];

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (n, sum) = xs.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    (n > 0).then(|| sum / n as f64)
}

/// The finished epochs of `metrics.jsonl` text, in order. A pass repeated
/// for the same epoch and block (an epoch cut short, then trained again
/// after `--resume`) counts once, its last record.
pub fn epochs(metrics: &str) -> Vec<EpochPoint> {
    let events: Vec<Json> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let summary = summarise(metrics);
    let as_usize = |v: &Json| v.as_u64().and_then(|x| usize::try_from(x).ok());
    let mut out: Vec<EpochPoint> = Vec::new();
    for v in events.iter().filter(|v| v["event"] == "epoch") {
        let Some(epoch) = as_usize(&v["epoch"]) else {
            continue;
        };
        if epoch == 0 || epoch > summary.epochs_done {
            continue;
        }
        let mut passes: Vec<(Option<usize>, &Json)> = Vec::new();
        for p in events
            .iter()
            .filter(|p| p["event"] == "pass" && as_usize(&p["epoch"]) == Some(epoch))
        {
            let block = as_usize(&p["block"]);
            passes.retain(|(b, _)| *b != block);
            passes.push((block, p));
        }
        let losses = LOSS_KEYS.map(|k| mean(passes.iter().filter_map(|(_, p)| p[k].as_f64())));
        out.retain(|e| e.epoch != epoch);
        out.push(EpochPoint {
            epoch,
            passes: passes.len(),
            losses,
            epoch_seconds: v["epoch_seconds"].as_f64(),
            train_seconds: v["train_seconds"].as_f64(),
            eval: summary.evals.iter().find(|e| e.epoch == epoch).cloned(),
        });
    }
    out.sort_by_key(|e| e.epoch);
    out
}

fn cell(v: Option<f64>) -> String {
    v.map(|x| format!("{x}")).unwrap_or_default()
}

/// The curve as CSV, one line per finished epoch; accuracy cells are empty
/// where the epoch was not evaluated, `test_acc_se` also where it had one
/// stochastic run.
pub fn csv(points: &[EpochPoint]) -> String {
    let mut s = String::from(
        "epoch,passes,loss,ce,kl,denoise,epoch_seconds,train_seconds,\
         test_acc,test_acc_se,test_acc_deterministic,train_acc\n",
    );
    for p in points {
        let e = p.eval.as_ref();
        let se = e
            .and_then(|e| mean_se(&e.test_acc_runs))
            .and_then(|(_, se)| se);
        let cells: Vec<String> = [p.epoch.to_string(), p.passes.to_string()]
            .into_iter()
            .chain(p.losses.iter().map(|&l| cell(l)))
            .chain(
                [
                    p.epoch_seconds,
                    p.train_seconds,
                    e.map(|e| e.test_acc),
                    se,
                    e.and_then(|e| e.test_acc_deterministic),
                    e.and_then(|e| e.train_acc),
                ]
                .map(cell),
            )
            .collect();
        s.push_str(&cells.join(","));
        s.push('\n');
    }
    s
}

/// The Table 1 configuration a run's `config.json` is, if it is one:
/// its data set, method and embedding (dim=20 is a learned embedding of
/// dimension 20).
pub fn table1_row(config: &Json) -> Option<Row> {
    let dataset = match config["data"]["dataset"].as_str()? {
        "mnist" => Dataset::Mnist,
        "cifar10" => Dataset::Cifar10,
        "cifar100" => Dataset::Cifar100,
        _ => return None,
    };
    let method = match config["method"]["kind"].as_str()? {
        "dt" => Method::Dt,
        "ct" => Method::Ct,
        "fm" => Method::Fm,
        "backprop" => Method::Backprop,
        "adjoint" => Method::Adjoint,
        _ => return None,
    };
    let embedding = &config["model"]["embedding"];
    let embedding = match embedding["kind"].as_str()? {
        "one-hot" => Embedding::OneHot,
        "prototype" => Embedding::Prototype,
        "learned" if embedding["dim"].as_u64() == Some(20) => Embedding::Dim20,
        _ => return None,
    };
    Some(Row::table1(dataset, method, embedding))
}

/// The figure: test accuracy (stochastic mean, deterministic, train
/// subset) against epoch, and the paper's figure as a flat line across
/// the epochs shown.
pub fn svg(points: &[EpochPoint], title: &str, paper: Option<(f64, usize)>) -> String {
    let evals: Vec<&Eval> = points.iter().filter_map(|p| p.eval.as_ref()).collect();
    let series = |name: &str, f: &dyn Fn(&Eval) -> Option<f64>| Series {
        name: name.into(),
        points: evals
            .iter()
            .filter_map(|e| Some((e.epoch as f64, f(e)?)))
            .collect(),
    };
    let mut lines = vec![
        series("test (stochastic)", &|e| Some(e.test_acc)),
        series("test (deterministic)", &|e| e.test_acc_deterministic),
        series("train subset", &|e| e.train_acc),
    ];
    lines.retain(|s| !s.points.is_empty());
    if let (Some((acc, epochs)), Some(first), Some(last)) = (paper, points.first(), points.last()) {
        lines.push(Series {
            name: format!("paper ({epochs} ep.): {acc:.2}"),
            points: vec![(first.epoch as f64, acc), (last.epoch as f64, acc)],
        });
    }
    LinePlot {
        title: title.into(),
        x_label: "epoch".into(),
        y_label: "accuracy (%)".into(),
        series: lines,
    }
    .to_svg()
}

struct Options {
    run: PathBuf,
    out: Option<PathBuf>,
    title: Option<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut run = None;
    let (mut out, mut title) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(crate::value_of(&mut it, "--out")?)),
            "--title" => title = Some(crate::value_of(&mut it, "--title")?),
            s if s.starts_with('-') => bail!("unknown option {s} (see `cargo xtask`)"),
            s if run.is_none() => run = Some(PathBuf::from(s)),
            s => bail!("unexpected argument {s}: curve takes one run folder"),
        }
    }
    let run = run.context("curve needs a run folder: cargo xtask curve RUN_DIR")?;
    Ok(Options { run, out, title })
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `cargo xtask curve RUN_DIR [--out DIR] [--title TEXT]`.
pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let metrics_path = o.run.join("metrics.jsonl");
    let config_path = o.run.join("config.json");
    if !metrics_path.is_file() {
        bail!(
            "{} is not a run folder: it has no metrics.jsonl",
            o.run.display()
        );
    }
    let metrics = read(&metrics_path)?;
    let config_text = read(&config_path)?;
    let config: Json = serde_json::from_str(&config_text)
        .with_context(|| format!("{} is not JSON", config_path.display()))?;
    let points = epochs(&metrics);
    if points.is_empty() {
        bail!("{} has no finished epoch yet", o.run.display());
    }
    let row = table1_row(&config);
    let paper = row
        .as_ref()
        .and_then(|r| Some((paper_test(r)?, paper_epochs(r.method, r.dataset))));
    let title = o.title.unwrap_or_else(|| match &row {
        Some(r) => format!(
            "{} {} on {}",
            r.method.title(),
            r.embedding.title(),
            r.dataset.title()
        ),
        None => o
            .run
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into()),
    });
    let out = o.out.clone().unwrap_or_else(|| o.run.clone());
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let write = |name: &str, text: &str| -> Result<()> {
        let p = out.join(name);
        fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    if o.out.is_some() {
        write("metrics.jsonl", &metrics)?;
        write("config.json", &config_text)?;
    }
    write("curve.csv", &csv(&points))?;
    write("curve.svg", &svg(&points, &title, paper))?;
    let last = points.last().map_or(0, |p| p.epoch);
    let evals = points.iter().filter(|p| p.eval.is_some()).count();
    let target = config["train"]["epochs"].as_u64().unwrap_or(0);
    println!(
        "curve: {} ({} of {target} epochs, {evals} evaluated) -> {}",
        o.run.display(),
        last,
        out.display()
    );
    if let Some(e) = points.iter().rev().find_map(|p| p.eval.as_ref()) {
        println!(
            "latest evaluation: epoch {}, test {:.2}%{}{}",
            e.epoch,
            e.test_acc,
            e.test_acc_deterministic
                .map(|d| format!(", deterministic {d:.2}%"))
                .unwrap_or_default(),
            paper
                .map(|(acc, ep)| format!(" (paper, {ep} epochs: {acc:.2}%)"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(epoch: usize, block: usize, loss: f64) -> String {
        format!(
            r#"{{"event":"pass","epoch":{epoch},"block":{block},"loss":{loss},"ce":{loss},"kl":0.0,"denoise":0.0}}"#
        )
    }

    fn epoch(epoch: usize, seconds: f64) -> String {
        format!(
            r#"{{"event":"epoch","epoch":{epoch},"epoch_seconds":{seconds},"train_seconds":{}}}"#,
            seconds * epoch as f64
        )
    }

    fn eval(epoch: usize, runs: &[f64]) -> String {
        let mean = runs.iter().sum::<f64>() / runs.len() as f64;
        format!(
            r#"{{"event":"eval","epoch":{epoch},"test_acc":{mean},"test_acc_runs":{runs:?},"test_acc_deterministic":99.0,"train_acc":98.0}}"#
        )
    }

    #[test]
    fn repeated_passes_count_once_and_blocks_average() {
        let m = [
            pass(1, 0, 2.0),
            pass(1, 1, 4.0),
            epoch(1, 10.0),
            // Epoch 2 cut short, then trained again after a resume.
            pass(2, 0, 9.0),
            pass(2, 0, 1.0),
            pass(2, 1, 3.0),
            epoch(2, 10.0),
            eval(2, &[90.0, 92.0]),
            // Epoch 3 never finished: left out.
            pass(3, 0, 0.5),
        ]
        .join("\n");
        let pts = epochs(&m);
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0].losses[0], Some(3.0));
        assert_eq!(pts[1].passes, 2);
        assert_eq!(pts[1].losses[0], Some(2.0));
        assert!(pts[0].eval.is_none());
        assert_eq!(pts[1].eval.as_ref().map(|e| e.test_acc), Some(91.0));
        let text = csv(&pts);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "1,2,3,3,0,0,10,10,,,,");
        assert_eq!(lines[2], "2,2,2,2,0,0,10,20,91,1,99,98");
    }

    #[test]
    fn table1_rows_come_from_the_config() {
        let cfg = |method: &str, embedding: &str| -> Json {
            serde_json::from_str(&format!(
                r#"{{"data":{{"dataset":"mnist"}},"method":{{"kind":"{method}"}},"model":{{"embedding":{embedding}}}}}"#
            ))
            .unwrap()
        };
        let ct = table1_row(&cfg("ct", r#"{"kind":"one-hot"}"#)).unwrap();
        assert_eq!(paper_test(&ct), Some(97.84));
        let dim20 = table1_row(&cfg("dt", r#"{"kind":"learned","dim":20}"#)).unwrap();
        assert_eq!(paper_test(&dim20), Some(99.49));
        assert!(table1_row(&cfg("dt", r#"{"kind":"learned","dim":32}"#)).is_none());
    }

    #[test]
    fn the_figure_has_the_paper_line_and_only_evaluated_epochs() {
        let m = [
            pass(1, 0, 2.0),
            epoch(1, 1.0),
            pass(2, 0, 1.0),
            epoch(2, 1.0),
            eval(2, &[95.0]),
        ]
        .join("\n");
        let s = svg(&epochs(&m), "CT & co", Some((97.84, 100)));
        assert!(s.contains("CT &amp; co"));
        assert!(s.contains("paper (100 ep.): 97.84"));
        // One evaluated epoch for each of three accuracy series, two paper points.
        assert_eq!(s.matches("<circle").count(), 5);
    }

    #[test]
    fn options_need_one_run_folder() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse(&args(&[])).is_err());
        assert!(parse(&args(&["a", "b"])).is_err());
        assert!(parse(&args(&["a", "--bogus"])).is_err());
        let o = parse(&args(&["a", "--out", "d"])).unwrap();
        assert_eq!(o.out, Some(PathBuf::from("d")));
    }
}

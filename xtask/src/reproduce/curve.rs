//! `cargo xtask curve`: one run folder's learning curve, as a CSV table
//! and an SVG figure beside the paper's Table 1 figure, for long runs
//! whose record goes under `docs/` while checkpoints stay out of the
//! repository.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::plot::{LinePlot, Series};
use super::rows::{Dataset, Embedding, PaperMethod, Row};
use super::runs::{as_usize, summarise, Eval};
use super::table::{mean_se, paper_epochs, paper_test};

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

/// The lines of `metrics` up to the last finished epoch's `epoch` line (an
/// epoch's pass and eval lines come before it): a copy of a live run's
/// record holds no half-written line and no unfinished epoch.
pub fn finished_prefix(metrics: &str) -> &str {
    let (mut end, mut pos) = (0, 0);
    for line in metrics.split_inclusive('\n') {
        pos += line.len();
        if line.ends_with('\n')
            && serde_json::from_str::<Json>(line).is_ok_and(|v| v["event"] == "epoch")
        {
            end = pos;
        }
    }
    &metrics[..end]
}

/// A number in Rust's shortest round-trip form, with an exponent where it
/// is very small or large (`1.2e-31`, not 31 zeros).
fn cell(v: Option<f64>) -> String {
    v.map(|x| format!("{x:?}")).unwrap_or_default()
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

/// The Table 1 configuration a run's `config.json` is, if it is one: its
/// data set, method and embedding (dim=20 is a learned embedding of
/// dimension 20), with softmax class probabilities and, for prototypes,
/// the prototype initialisation (the Figure 4 and 5 ablations are not
/// Table 1 rows).
pub fn table1_row(config: &Json) -> Option<Row> {
    let model = &config["model"];
    let softmax = model["class_probability"]["kind"]
        .as_str()
        .is_none_or(|k| k == "softmax");
    if !softmax {
        return None;
    }
    let dataset = config["data"]["dataset"].as_str()?;
    let dataset = *Dataset::ALL.iter().find(|d| d.name() == dataset)?;
    let method = config["method"]["kind"].as_str()?;
    let method = *PaperMethod::ALL.iter().find(|m| m.name() == method)?;
    let embedding = &model["embedding"];
    let embedding = match embedding["kind"].as_str()? {
        "one-hot" => Embedding::OneHot,
        "prototype" if embedding["init"].as_str().is_none_or(|i| i == "prototype") => {
            Embedding::Prototype
        }
        "learned" if embedding["dim"].as_u64() == Some(20) => Embedding::Dim20,
        _ => return None,
    };
    Some(Row::table1(dataset, method, embedding))
}

/// The palette colour of the paper's line (black).
const PAPER_COLOUR: usize = 6;

/// The figure: test accuracy (stochastic mean, deterministic, train
/// subset; each always in its own colour) against epoch, and the paper's
/// figure as a dashed line.
pub fn svg(points: &[EpochPoint], title: &str, paper: Option<(f64, usize)>) -> String {
    let evals: Vec<&Eval> = points.iter().filter_map(|p| p.eval.as_ref()).collect();
    let series = |colour: usize, name: &str, f: &dyn Fn(&Eval) -> Option<f64>| Series {
        name: name.into(),
        points: evals
            .iter()
            .filter_map(|e| Some((e.epoch as f64, f(e)?)))
            .collect(),
        colour: Some(colour),
        dashed: false,
    };
    let mut lines = vec![
        series(0, "test (stochastic)", &|e| Some(e.test_acc)),
        series(1, "test (deterministic)", &|e| e.test_acc_deterministic),
        series(2, "train subset", &|e| e.train_acc),
    ];
    lines.retain(|s| !s.points.is_empty());
    if let (Some((acc, epochs)), Some(last)) = (paper, points.last()) {
        lines.push(Series {
            name: format!("paper ({epochs} ep.): {acc:.2}"),
            points: vec![(0.0, acc), (last.epoch.max(5) as f64, acc)],
            colour: Some(PAPER_COLOUR),
            dashed: true,
        });
    }
    LinePlot {
        title: title.into(),
        x_label: "epoch".into(),
        y_label: "accuracy (%)".into(),
        series: lines,
        integer_x: true,
    }
    .to_svg()
}

/// The options of `cargo xtask curve`: one run folder's learning curve,
/// curve.csv (per finished epoch: the training losses averaged over the
/// epoch's passes, seconds, and the accuracies where the epoch was
/// evaluated) and curve.svg (accuracy against epoch, with the paper's
/// Table 1 figure where the run is a Table 1 configuration).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct Options {
    /// The run folder.
    #[arg(value_name = "RUN_DIR")]
    run: PathBuf,
    /// Write there instead of into the run folder, and copy the finished
    /// epochs' metrics.jsonl and config.json beside (never checkpoints);
    /// refuses a run folder and a record of another run.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The figure's title.
    #[arg(long, value_name = "TEXT")]
    title: Option<String>,
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes `text` to `dir/name` through a temporary file and a rename, so a
/// reader never sees half a file.
fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

/// Whether `dir` is (or was) a `noprop train` run folder.
fn is_run_folder(dir: &Path) -> bool {
    ["meta.json", "checkpoints", ".lock"]
        .iter()
        .any(|n| dir.join(n).exists())
}

/// Checks that `out` may receive a copy of the run's record: not a run
/// folder itself, and any record already there is an earlier copy of the
/// same run (same config, metrics a prefix of the new ones).
fn check_out(out: &Path, config: &str, metrics: &str) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--out {} is a file, not a folder", out.display());
    }
    if is_run_folder(out) {
        bail!(
            "--out {} is a run folder; the record goes into a folder of its own",
            out.display()
        );
    }
    let old_config = out.join("config.json");
    if old_config.exists() && read(&old_config)? != config {
        bail!(
            "--out {} holds another run's config.json; choose another folder",
            out.display()
        );
    }
    let old_metrics = out.join("metrics.jsonl");
    if old_metrics.exists() && !metrics.starts_with(&read(&old_metrics)?) {
        bail!(
            "--out {} holds a metrics.jsonl that is not an earlier part of this run's; \
             choose another folder",
            out.display()
        );
    }
    Ok(())
}

/// `cargo xtask curve RUN_DIR [--out DIR] [--title TEXT]`.
pub fn run(o: Options) -> Result<()> {
    let metrics_path = o.run.join("metrics.jsonl");
    if !metrics_path.is_file() {
        bail!(
            "{} is not a run folder: it has no metrics.jsonl",
            o.run.display()
        );
    }
    let run_dir = o
        .run
        .canonicalize()
        .with_context(|| format!("cannot read {}", o.run.display()))?;
    let metrics = read(&metrics_path)?;
    let metrics = finished_prefix(&metrics);
    let config_path = run_dir.join("config.json");
    let config_text = read(&config_path)?;
    let config: Json = serde_json::from_str(&config_text)
        .with_context(|| format!("{} is not JSON", config_path.display()))?;
    if !config.is_object() {
        bail!("{} is not a run's config", config_path.display());
    }
    let points = epochs(metrics);
    if points.is_empty() {
        bail!("{} has no finished epoch yet", o.run.display());
    }
    // A copy into the run folder itself would race the live record.
    let copy_to = match &o.out {
        Some(out) if out.canonicalize().ok().as_ref() != Some(&run_dir) => Some(out.clone()),
        _ => None,
    };
    if let Some(out) = &copy_to {
        check_out(out, &config_text, metrics)?;
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
        None => run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into()),
    });
    let out = copy_to.clone().unwrap_or_else(|| run_dir.clone());
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    if copy_to.is_some() {
        write_atomic(&out, "config.json", &config_text)?;
        write_atomic(&out, "metrics.jsonl", metrics)?;
    }
    write_atomic(&out, "curve.csv", &csv(&points))?;
    write_atomic(&out, "curve.svg", &svg(&points, &title, paper))?;
    let last = points.last().map_or(0, |p| p.epoch);
    let of = config["train"]["epochs"]
        .as_u64()
        .map(|n| format!(" of {n}"))
        .unwrap_or_default();
    let evals = points.iter().filter(|p| p.eval.is_some()).count();
    let mut report = format!(
        "curve: {} ({last}{of} epochs, {evals} evaluated) -> {}\n",
        o.run.display(),
        out.display()
    );
    if let Some(e) = points.iter().rev().find_map(|p| p.eval.as_ref()) {
        report.push_str(&format!(
            "latest evaluation: epoch {}, test {:.2}%{}{}\n",
            e.epoch,
            e.test_acc,
            e.test_acc_deterministic
                .map(|d| format!(", deterministic {d:.2}%"))
                .unwrap_or_default(),
            paper
                .map(|(acc, ep)| format!(" (paper, {ep} epochs: {acc:.2}%)"))
                .unwrap_or_default()
        ));
    }
    // The files are written; a reader that closed the pipe early
    // (`| head -1`) is not an error.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), report.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write the summary to stdout")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reproduce::plot::tests::well_formed;

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

    fn config(method: &str, model: &str) -> Json {
        serde_json::from_str(&format!(
            r#"{{"data":{{"dataset":"mnist"}},"method":{{"kind":"{method}"}},"model":{model},"train":{{"epochs":100}}}}"#
        ))
        .unwrap()
    }

    /// Two finished epochs (the second evaluated, its first pass repeated
    /// after a resume) and the start of a third.
    fn record() -> String {
        [
            pass(1, 0, 2.0),
            pass(1, 1, 4.0),
            epoch(1, 10.0),
            pass(2, 0, 9.0),
            pass(2, 0, 1.0),
            pass(2, 1, 3.0),
            eval(2, &[90.0, 92.0]),
            epoch(2, 10.0),
            pass(3, 0, 0.5),
        ]
        .join("\n")
    }

    #[test]
    fn repeated_passes_count_once_and_blocks_average() {
        let pts = epochs(&record());
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0].losses[0], Some(3.0));
        assert_eq!(pts[1].passes, 2);
        assert_eq!(pts[1].losses[0], Some(2.0));
        assert!(pts[0].eval.is_none());
        assert_eq!(pts[1].eval.as_ref().map(|e| e.test_acc), Some(91.0));
        let text = csv(&pts);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "1,2,3.0,3.0,0.0,0.0,10.0,10.0,,,,");
        assert_eq!(lines[2], "2,2,2.0,2.0,0.0,0.0,10.0,20.0,91.0,1.0,99.0,98.0");
        assert_eq!(cell(Some(1.5e-31)), "1.5e-31");
    }

    #[test]
    fn a_copy_ends_at_the_last_finished_epoch() {
        let m = record();
        let kept = finished_prefix(&m);
        assert!(kept.ends_with(&format!("{}\n", epoch(2, 10.0))));
        assert!(!kept.contains(r#""epoch":3"#));
        assert_eq!(epochs(kept), epochs(&m));
        // An epoch line still being written is not finished.
        assert_eq!(finished_prefix(&epoch(1, 1.0)), "");
    }

    #[test]
    fn table1_rows_come_from_the_config_and_ablations_are_not_rows() {
        let ct = table1_row(&config("ct", r#"{"embedding":{"kind":"one-hot"}}"#)).unwrap();
        assert_eq!(paper_test(&ct), Some(97.84));
        let dim20 = table1_row(&config(
            "dt",
            r#"{"embedding":{"kind":"learned","dim":20}}"#,
        ));
        assert_eq!(dim20.as_ref().and_then(paper_test), Some(99.49));
        let proto = r#"{"embedding":{"kind":"prototype","init":"prototype"}}"#;
        assert!(table1_row(&config("dt", proto)).is_some());
        for model in [
            r#"{"embedding":{"kind":"learned","dim":32}}"#,
            r#"{"embedding":{"kind":"prototype","init":"orthogonal"}}"#,
            r#"{"embedding":{"kind":"one-hot"},"class_probability":{"kind":"radial"}}"#,
        ] {
            assert!(table1_row(&config("dt", model)).is_none(), "{model}");
        }
    }

    #[test]
    fn the_figure_has_a_dashed_paper_line_and_only_evaluated_epochs() {
        let m = [
            pass(1, 0, 2.0),
            epoch(1, 1.0),
            pass(2, 0, 1.0),
            eval(2, &[95.0]),
            epoch(2, 1.0),
        ]
        .join("\n");
        let s = svg(&epochs(&m), "CT & co", Some((97.84, 100)));
        well_formed(&s).unwrap();
        assert!(s.contains("CT &amp; co"));
        assert!(s.contains("paper (100 ep.): 97.84"));
        // The paper's line is drawn in dashes (many short strokes), with no markers.
        assert!(crate::reproduce::plot::tests::count(&s, "polyline", "stroke-width=\"2\"") > 3);
        // One evaluated epoch for each of three accuracy series.
        assert_eq!(s.matches("<circle").count(), 3);
        // Short runs still get whole-number epoch ticks.
        assert!(!s.contains(">\n0.5\n<"));
    }

    /// `cargo xtask curve ARGS`.
    fn run_args(args: &[String]) -> Result<()> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        super::run(crate::parse_args(&args)?)
    }

    #[test]
    fn options_need_one_run_folder() {
        let parse = crate::parse_args::<Options>;
        assert!(parse(&[]).is_err());
        assert!(parse(&["a", "b"]).is_err());
        assert!(parse(&["a", "--bogus"]).is_err());
        let o = parse(&["a", "--out", "d"]).unwrap();
        assert_eq!(o.out, Some(PathBuf::from("d")));
    }

    #[test]
    fn a_copy_never_replaces_another_runs_record() {
        let dir = std::env::temp_dir().join(format!("xtask-curve-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (run, out) = (dir.join("run"), dir.join("out"));
        fs::create_dir_all(run.join("checkpoints")).unwrap();
        let cfg = config("ct", r#"{"embedding":{"kind":"one-hot"}}"#).to_string();
        fs::write(run.join("config.json"), &cfg).unwrap();
        fs::write(run.join("metrics.jsonl"), record()).unwrap();
        let args = |out: &Path| {
            vec![
                run.display().to_string(),
                "--out".into(),
                out.display().to_string(),
            ]
        };
        // A first copy, then a later one of the same run, are fine.
        run_ok(&args(&out));
        let copied = fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(copied, finished_prefix(&record()));
        run_ok(&args(&out));
        assert!(out.join("curve.svg").is_file() && out.join("curve.csv").is_file());
        // Another run's record, or a run folder, is refused and left alone.
        fs::write(out.join("metrics.jsonl"), "precious\n").unwrap();
        let e = run_args(&args(&out)).unwrap_err().to_string();
        assert!(e.contains("not an earlier part"), "{e}");
        assert_eq!(
            fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
            "precious\n"
        );
        let other = dir.join("other");
        fs::create_dir_all(other.join("checkpoints")).unwrap();
        let e = run_args(&args(&other)).unwrap_err().to_string();
        assert!(e.contains("is a run folder"), "{e}");
        // --out naming the run folder itself writes the curve there, copies nothing.
        run_ok(&args(&run.join("checkpoints").join("..")));
        assert!(run.join("curve.svg").is_file());
        assert_eq!(
            fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
            record()
        );
        fs::remove_dir_all(&dir).unwrap();

        fn run_ok(args: &[String]) {
            if let Err(e) = run_args(args) {
                panic!("{e:#}");
            }
        }
    }
}

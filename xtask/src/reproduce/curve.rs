//! `cargo xtask curve`: one run folder's learning curve, as a CSV table
//! and an SVG figure beside the paper's Table 1 figure, for long runs
//! whose record goes under `docs/` while checkpoints stay out of the
//! repository.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use noprop_report::curve::{csv, epochs, finished_prefix, svg, table1_row};
use noprop_report::table::{paper_epochs, paper_test};

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

    /// Two finished epochs and the start of a third.
    const RECORD: &str = r#"{"event":"pass","epoch":1,"block":0,"loss":2.0,"ce":2.0,"kl":0.0,"denoise":0.0}
{"event":"epoch","epoch":1,"epoch_seconds":10.0,"train_seconds":10.0}
{"event":"pass","epoch":2,"block":0,"loss":1.0,"ce":1.0,"kl":0.0,"denoise":0.0}
{"event":"eval","epoch":2,"test_acc":91.0,"test_acc_runs":[90.0,92.0]}
{"event":"epoch","epoch":2,"epoch_seconds":10.0,"train_seconds":20.0}
{"event":"pass","epoch":3,"block":0,"loss":0.5,"ce":0.5,"kl":0.0,"denoise":0.0}"#;

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
        let cfg = r#"{"data":{"dataset":"mnist"},"method":{"kind":"ct"},"model":{"embedding":{"kind":"one-hot"}},"train":{"epochs":100}}"#;
        fs::write(run.join("config.json"), cfg).unwrap();
        fs::write(run.join("metrics.jsonl"), RECORD).unwrap();
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
        assert_eq!(copied, finished_prefix(RECORD));
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
            RECORD
        );
        fs::remove_dir_all(&dir).unwrap();

        fn run_ok(args: &[String]) {
            if let Err(e) = run_args(args) {
                panic!("{e:#}");
            }
        }
    }
}

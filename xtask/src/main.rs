//! `cargo xtask`: project chores that orchestrate cargo and the `noprop`
//! binary. Everything a user does is also a `noprop` subcommand; this only
//! strings them together.
//!
//! ```text
//! cargo xtask bench [--threads N] [--rounds R] [--torch-python PY] [--torch-script FILE] [--json]
//! cargo xtask data [--dataset mnist|cifar10|cifar100] [--dir DIR]
//! cargo xtask reproduce [--quick] [--only PATTERN] [--device cpu|cuda|metal] [--out DIR] [--data DIR]
//! cargo xtask ci
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

mod reproduce;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("data") => data(&args[1..]),
        Some("ci") => ci(),
        Some("reproduce") => reproduce::run(&args[1..], &root()),
        _ => {
            eprintln!("usage: cargo xtask <bench|data|ci|reproduce> [options]\n\n{}\n{}", HELP, reproduce::HELP);
            return std::process::ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

const HELP: &str = "\
bench   time one block's training step (batch 128) and T = 10 inference, fast
        and stock kernels, and PyTorch's reference if --torch-python (or
        $NOPROP_TORCH_PYTHON) names a Python with torch; prints ratios.
        --threads N (2), --rounds R (3, interleaved; medians reported),
        --torch-script FILE (default ../shared/bench/torch_reference.py), --json
data    download a data set with checksums (noprop data download)
ci      run the test suite as CI does";

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn run_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line in output")?;
    Ok(serde_json::from_str(last)?)
}

fn build_noprop() -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["build", "--release", "-p", "noprop-cli"])
        .status()?;
    if !status.success() {
        bail!("cargo build failed");
    }
    Ok(root().join("target/release/noprop"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn bench(args: &[String]) -> Result<()> {
    let threads = flag(args, "--threads").unwrap_or_else(|| "2".into());
    let rounds: usize = flag(args, "--rounds").map(|r| r.parse()).transpose()?.unwrap_or(3);
    let as_json = args.iter().any(|a| a == "--json");
    let torch_python = flag(args, "--torch-python").or_else(|| std::env::var("NOPROP_TORCH_PYTHON").ok());
    let torch_script = flag(args, "--torch-script")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/bench/torch_reference.py"));
    let noprop = build_noprop()?;
    let mut rows: Vec<(&str, Vec<Value>)> = vec![("noprop fast", vec![]), ("noprop stock", vec![])];
    let mut torch = vec![];
    // Interleave the implementations so that machine noise hits them alike.
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (i, kernels) in ["fast", "stock"].iter().enumerate() {
            let steps = if *kernels == "stock" { "10" } else { "30" };
            rows[i].1.push(run_json(
                Command::new(&noprop).args(["bench", "--json", "--kernels", kernels, "--threads", &threads, "--steps", steps]),
            )?);
        }
        if let Some(py) = &torch_python {
            torch.push(run_json(Command::new(py).arg(&torch_script).args(["step", "--threads", &threads]))?);
        }
    }
    let med = |vals: &[Value], key: &str| median(vals.iter().filter_map(|v| v[key].as_f64()).collect());
    let fast_step = med(&rows[0].1, "block_step_ms");
    let fast_inf = med(&rows[0].1, "infer_images_per_s");
    println!("{:<14} {:>14} {:>18}", "impl", "step ms (med)", "infer img/s (med)");
    for (name, vals) in &rows {
        println!("{:<14} {:>14.1} {:>18.1}", name, med(vals, "block_step_ms"), med(vals, "infer_images_per_s"));
    }
    let mut summary = json!({
        "block_step_ms": fast_step,
        "infer_images_per_s": fast_inf,
        "stock_block_step_ms": med(&rows[1].1, "block_step_ms"),
        "stock_infer_images_per_s": med(&rows[1].1, "infer_images_per_s"),
        "threads": threads.parse::<usize>().unwrap_or(0),
        "rounds": rounds,
    });
    if !torch.is_empty() {
        let t_step = med(&torch, "train_step_ms_median");
        let t_inf = med(&torch, "infer_T10_images_per_s");
        println!("{:<14} {:>14.1} {:>18.1}", "pytorch", t_step, t_inf);
        println!("step time noprop/pytorch: {:.2}x; inference throughput noprop/pytorch: {:.2}x", fast_step / t_step, fast_inf / t_inf);
        summary["torch_step_ms"] = json!(t_step);
        summary["torch_infer_images_per_s"] = json!(t_inf);
        summary["step_ratio_vs_torch"] = json!(fast_step / t_step);
        summary["infer_ratio_vs_torch"] = json!(fast_inf / t_inf);
    } else {
        println!("(no PyTorch comparison: pass --torch-python or set NOPROP_TORCH_PYTHON)");
    }
    if as_json {
        println!("{summary}");
    }
    Ok(())
}

fn data(args: &[String]) -> Result<()> {
    let dataset = flag(args, "--dataset").unwrap_or_else(|| "mnist".into());
    let noprop = build_noprop()?;
    let mut cmd = Command::new(noprop);
    cmd.args(["data", "download", "--dataset", &dataset]);
    if let Some(dir) = flag(args, "--dir") {
        cmd.args(["--dir", &dir]);
    }
    if !cmd.status()?.success() {
        bail!("download failed");
    }
    Ok(())
}

fn ci() -> Result<()> {
    let status = Command::new(env!("CARGO")).current_dir(root()).args(["test", "--workspace"]).status()?;
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}

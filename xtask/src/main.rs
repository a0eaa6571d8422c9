//! `cargo xtask`: project chores that orchestrate cargo and the `noprop`
//! binary. Everything a user does is also a `noprop` subcommand; this only
//! strings them together.
//!
//! ```text
//! cargo xtask bench [--threads N] [--rounds R] [--torch-python PY] [--torch-script FILE] [--json]
//! cargo xtask data [--dataset mnist|cifar10|cifar100] [--dir DIR]
//! cargo xtask curve RUN_DIR [--out DIR] [--title TEXT]
//! cargo xtask reproduce [--quick] [--only PATTERN] [--device cpu|cuda|metal] [--out DIR] [--data DIR]
//! cargo xtask ci
//! cargo xtask soak [--kills N] [--seed S] [--dir DIR] [--no-build]
//! cargo xtask cuda-env [--dir DIR] [--compute-cap N]
//! cargo xtask cuda-build [--check] [--dir DIR] [--compute-cap N]
//! cargo xtask gpu-bundle [--out DIR] [--binary FILE] [--no-build] [--data DIR]
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

mod cuda;
mod gpu_bundle;
mod reproduce;
mod soak;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The help text of a command (several commands share one), or `None`
/// for an unknown command.
fn help_for(command: &str) -> Option<&'static str> {
    Some(match command {
        "bench" | "data" | "ci" => HELP,
        "reproduce" => reproduce::HELP,
        "curve" => reproduce::curve::HELP,
        "soak" => soak::HELP,
        "cuda-env" | "cuda-build" => cuda::HELP,
        "gpu-bundle" => gpu_bundle::HELP,
        _ => return None,
    })
}

const COMMANDS: &str = "bench|data|ci|reproduce|curve|soak|cuda-env|cuda-build|gpu-bundle";

fn usage() -> String {
    format!(
        "usage: cargo xtask <{COMMANDS}> [options]\n\n{}\n{}\n{}\n{}\n{}\n{}",
        HELP,
        reproduce::HELP,
        reproduce::curve::HELP,
        soak::HELP,
        cuda::HELP,
        gpu_bundle::HELP
    )
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wants_help = |a: &String| a == "--help" || a == "-h";
    if args.first().is_some_and(|a| wants_help(a) || a == "help") {
        println!("{}", usage());
        return std::process::ExitCode::SUCCESS;
    }
    // `cargo xtask bench --help` prints help; it never runs the command.
    if let (Some(command), true) = (args.first(), args.iter().skip(1).any(wants_help)) {
        if let Some(help) = help_for(command) {
            println!("{help}");
            return std::process::ExitCode::SUCCESS;
        }
    }
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("data") => data(&args[1..]),
        Some("ci") => ci(),
        Some("reproduce") => reproduce::run(&args[1..], &root()),
        Some("curve") => reproduce::curve::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("cuda-env") => cuda::env(&args[1..], &root()),
        Some("cuda-build") => cuda::build(&args[1..], &root()),
        Some("gpu-bundle") => gpu_bundle::run(&args[1..], &root()),
        _ => {
            eprintln!("{}", usage());
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
bench   time the Figure-6 block's hot ops (forward and backward, GFLOP/s
        against the FP32 peak), one block's training step (batch 128), the
        fused all-block step per block and T = 10 inference (batch 1000), fast
        and stock kernels, and PyTorch's reference if --torch-python (or
        $NOPROP_TORCH_PYTHON) names a Python with torch; prints ratios.
        --threads N (2), --rounds R (3, interleaved; medians reported),
        --torch-script FILE (default ../shared/bench/torch_reference.py),
        --avx512 (time the build with AVX-512 GEMM kernels, <target>/avx512),
        --json (one JSON object as the last line)
data    download a data set with checksums (noprop data download)
ci      run the test suite as CI does";

/// The value after the flag `name` that the walk `it` over the arguments has
/// just passed, or the one-line error "`name` needs a value" when the
/// arguments end there (reproduce, cuda-env, cuda-build and gpu-bundle parse
/// this way, rejecting unknown options, where [`flag`] ignores them).
fn value_of<'a>(it: &mut impl Iterator<Item = &'a String>, name: &str) -> Result<String> {
    it.next()
        .cloned()
        .with_context(|| format!("{name} needs a value"))
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn run_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON line in output")?;
    Ok(serde_json::from_str(last)?)
}

fn build_noprop() -> Result<PathBuf> {
    build_noprop_with(false)
}

/// Builds the release `noprop`, with the `avx512` feature into its own
/// `<target>/avx512` (so the two builds do not rebuild each other); returns it.
fn build_noprop_with(avx512: bool) -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root())
        .args(["build", "--release", "-p", "noprop-cli"]);
    let target = if avx512 {
        if !cpu_has_avx512() {
            eprintln!("[--] this CPU has no AVX-512F: the --avx512 build runs the same FMA kernels as the default one");
        }
        let dir = reproduce::avx512_target_dir(&root());
        cmd.args(["--features", "avx512"])
            .env("CARGO_TARGET_DIR", &dir);
        dir
    } else {
        reproduce::target_dir(&root())
    };
    if !cmd.status()?.success() {
        bail!("cargo build failed");
    }
    Ok(target.join("release/noprop"))
}

/// Whether this CPU has AVX-512F, which the `avx512` feature's kernels need.
fn cpu_has_avx512() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
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

/// The median of `key` over `vals`.
fn med_of(vals: &[Value], key: &str) -> f64 {
    median(vals.iter().filter_map(|v| v[key].as_f64()).collect())
}

/// Per-op medians over rounds: each op's forward and backward milliseconds,
/// and the throughput they imply.
fn op_medians(rounds: &[Value]) -> Vec<Value> {
    let Some(first) = rounds.first().and_then(|r| r["ops"].as_array()) else {
        return vec![];
    };
    first
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let of = |key: &str| median(rounds.iter().filter_map(|r| r["ops"][i][key].as_f64()).collect());
            let (fwd, bwd) = (of("fwd_ms"), of("bwd_ms"));
            let mut v = json!({ "op": op["op"], "shape": op["shape"], "algo": op["algo"], "fwd_ms": fwd, "bwd_ms": bwd });
            if let (Some(ff), Some(bf)) = (op["fwd_gflop"].as_f64(), op["bwd_gflop"].as_f64()) {
                v["fwd_gflop"] = json!(ff);
                v["bwd_gflop"] = json!(bf);
                v["fwd_gflops"] = json!(ff / (fwd / 1e3));
                v["bwd_gflops"] = json!(bf / (bwd / 1e3));
            }
            v
        })
        .collect()
}

fn bench(args: &[String]) -> Result<()> {
    let threads = flag(args, "--threads").unwrap_or_else(|| "2".into());
    let rounds: usize = flag(args, "--rounds")
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(3);
    let as_json = args.iter().any(|a| a == "--json");
    let torch_python =
        flag(args, "--torch-python").or_else(|| std::env::var("NOPROP_TORCH_PYTHON").ok());
    let torch_script = flag(args, "--torch-script")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/bench/torch_reference.py"));
    let noprop = build_noprop_with(args.iter().any(|a| a == "--avx512"))?;
    let (mut fast, mut stock, mut torch) = (vec![], vec![], vec![]);
    // Interleave the implementations so that machine noise hits them alike.
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        let common = [
            "bench",
            "--json",
            "--threads",
            &threads,
            "--infer-batch",
            "1000",
        ];
        fast.push(run_json(Command::new(&noprop).args(common).args([
            "--kernels",
            "fast",
            "--steps",
            "30",
            "--fused-steps",
            "5",
            "--op-reps",
            "10",
        ]))?);
        stock.push(run_json(Command::new(&noprop).args(common).args([
            "--kernels",
            "stock",
            "--steps",
            "10",
            "--fused-steps",
            "0",
            "--op-reps",
            "2",
        ]))?);
        if let Some(py) = &torch_python {
            torch.push(run_json(Command::new(py).arg(&torch_script).args([
                "step",
                "--threads",
                &threads,
            ]))?);
        }
    }
    let peak = fast
        .first()
        .and_then(|v| v["peak_gflops"].as_f64())
        .unwrap_or(f64::NAN);
    let fast_ops = op_medians(&fast);
    let stock_ops = op_medians(&stock);
    println!(
        "{:<26} {:<24} {:>9} {:>9} {:>9} {:>13} {:>11} {:>9} {:>9}",
        "op (median ms)",
        "shape",
        "algo",
        "fwd",
        "bwd",
        "GFLOP/s f/b",
        "% peak f/b",
        "stock fwd",
        "stock bwd"
    );
    for (f, s) in fast_ops
        .iter()
        .zip(stock_ops.iter().map(Some).chain(std::iter::repeat(None)))
    {
        let rate = |k: &str| f[k].as_f64().map_or("-".into(), |v| format!("{v:.0}"));
        let pct = |k: &str| {
            f[k].as_f64()
                .map_or("-".into(), |v| format!("{:.0}", 100.0 * v / peak))
        };
        let st = |k: &str| {
            s.and_then(|s| s[k].as_f64())
                .map_or("-".into(), |v| format!("{v:.2}"))
        };
        println!(
            "{:<26} {:<24} {:>9} {:>9.2} {:>9.2} {:>13} {:>11} {:>9} {:>9}",
            f["op"].as_str().unwrap_or(""),
            f["shape"].as_str().unwrap_or(""),
            f["algo"].as_str().unwrap_or(""),
            f["fwd_ms"].as_f64().unwrap_or(f64::NAN),
            f["bwd_ms"].as_f64().unwrap_or(f64::NAN),
            format!("{}/{}", rate("fwd_gflops"), rate("bwd_gflops")),
            format!("{}/{}", pct("fwd_gflops"), pct("bwd_gflops")),
            st("fwd_ms"),
            st("bwd_ms"),
        );
    }
    let fast_step = med_of(&fast, "block_step_ms");
    let fused = med_of(&fast, "fused_step_ms_per_block");
    let fast_inf = med_of(&fast, "infer_images_per_s");
    let step_gflop = fast
        .first()
        .and_then(|v| v["block_step_gflop"].as_f64())
        .unwrap_or(f64::NAN);
    println!();
    println!(
        "{:<14} {:>14} {:>22} {:>18}",
        "impl", "step ms (med)", "fused ms/block (med)", "infer img/s (med)"
    );
    println!(
        "{:<14} {:>14.1} {:>22.1} {:>18.1}",
        "noprop fast", fast_step, fused, fast_inf
    );
    println!(
        "{:<14} {:>14.1} {:>22} {:>18.1}",
        "noprop stock",
        med_of(&stock, "block_step_ms"),
        "-",
        med_of(&stock, "infer_images_per_s")
    );
    let cpu_gemm = fast
        .first()
        .map(|v| v["cpu_gemm"].clone())
        .unwrap_or(Value::Null);
    println!("GEMM kernels: {}", cpu_gemm.as_str().unwrap_or("?"));
    println!(
        "block step: {:.2} GFLOP (direct-method count), {:.1} GFLOP/s, {:.0}% of the {:.0} GFLOP/s peak ({})",
        step_gflop,
        step_gflop / (fast_step / 1e3),
        100.0 * step_gflop / (fast_step / 1e3) / peak,
        peak,
        fast.first().and_then(|v| v["peak_basis"].as_str()).unwrap_or("?"),
    );
    let mut summary = json!({
        "block_step_ms": fast_step,
        "fused_step_ms_per_block": fused,
        "infer_images_per_s": fast_inf,
        "infer_batch": 1000,
        "threads": threads.parse::<usize>().unwrap_or(0),
        "rounds": rounds,
        "block_step_gflop": step_gflop,
        "block_step_gflops": step_gflop / (fast_step / 1e3),
        "peak_gflops": peak,
        "peak_basis": fast.first().map(|v| v["peak_basis"].clone()).unwrap_or(Value::Null),
        "cpu_gemm": cpu_gemm,
        "ops": fast_ops,
        "stock_block_step_ms": med_of(&stock, "block_step_ms"),
        "stock_infer_images_per_s": med_of(&stock, "infer_images_per_s"),
        "stock_ops": stock_ops,
    });
    if !torch.is_empty() {
        let t_step = med_of(&torch, "train_step_ms_median");
        let t_inf = med_of(&torch, "infer_T10_images_per_s");
        println!(
            "{:<14} {:>14.1} {:>22} {:>18.1}",
            "pytorch", t_step, "-", t_inf
        );
        println!(
            "vs PyTorch: block step {:.2}x the time, fused step per block {:.2}x, inference {:.2}x the throughput",
            fast_step / t_step,
            fused / t_step,
            fast_inf / t_inf
        );
        summary["torch_step_ms"] = json!(t_step);
        summary["torch_infer_images_per_s"] = json!(t_inf);
        summary["torch_version"] = torch[0]["torch"].clone();
        summary["step_ratio_vs_torch"] = json!(fast_step / t_step);
        summary["fused_step_ratio_vs_torch"] = json!(fused / t_step);
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
    let status = Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["test", "--workspace"])
        .status()?;
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_help() {
        for command in COMMANDS.split('|') {
            let help = help_for(command).unwrap_or_else(|| panic!("{command} has no help"));
            assert!(help.contains(command), "{command}'s help does not name it");
        }
        assert!(help_for("bogus").is_none());
    }

    #[test]
    fn flag_values_and_the_one_line_error() {
        let args: Vec<String> = ["--out", "dir", "--dir"].map(String::from).into();
        let mut it = args.iter();
        it.next();
        assert_eq!(value_of(&mut it, "--out").unwrap(), "dir");
        it.next();
        let err = value_of(&mut it, "--dir").unwrap_err();
        assert_eq!(format!("{err:#}"), "--dir needs a value");
    }
}

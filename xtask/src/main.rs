//! `cargo xtask`: project chores that orchestrate cargo and the `noprop`
//! binary. Everything a user does is also a `noprop` subcommand; this only
//! strings them together. `cargo xtask --help` lists the commands and
//! `cargo xtask COMMAND --help` their options (clap: a misspelt option is
//! an error, never ignored).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
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

/// `cargo xtask`: project chores.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Project chores: benchmarks, the paper's tables and figures, the soak, the CUDA build"
)]
enum Cli {
    /// Time the block's ops and steps against PyTorch's reference.
    ///
    /// The Figure-6 block's hot ops (forward and backward, GFLOP/s
    /// against the FP32 peak), one block's training step (batch 128), the
    /// fused all-block step per block and T = 10 inference (batch 1000), fast
    /// and stock kernels, and PyTorch's reference if --torch-python (or
    /// $NOPROP_TORCH_PYTHON) names a Python with torch; prints ratios.
    Bench(BenchOptions),
    /// Download a data set with checksums (noprop data download).
    Data(DataOptions),
    /// Run the test suite as CI does.
    Ci,
    /// Train the paper's Table 1 and ablations, write its tables and figures.
    ///
    /// Every Table 1 row (method x embedding x data set) and the ablations
    /// of Figures 4-5, then tables 1-2 and figures 2-5.
    Reproduce(reproduce::Options),
    /// One run folder's learning curve: curve.csv and curve.svg.
    Curve(reproduce::curve::Options),
    /// Kill and resume training again and again; check nothing is lost.
    ///
    /// Kills `noprop train` at random moments and in the commit windows,
    /// resumes after each kill, and checks every finished run: each epoch's
    /// events exactly once, weights bit-identical to an uninterrupted run.
    Soak(soak::Options),
    /// Prepare the CUDA toolchain from NVIDIA's pip wheels.
    ///
    /// Fetches NVIDIA's CUDA 13.0 pip wheels into DIR, make a libcuda.so link
    /// stub and the unversioned library links, and print the shell lines to
    /// build the cuda feature: eval "$(cargo xtask cuda-env)".
    CudaEnv(cuda::Options),
    /// Build noprop with the cuda feature.
    ///
    /// cuda-env, then cargo build --release -p noprop-cli --features cuda
    /// (target dir target/cuda unless CARGO_TARGET_DIR is set).
    CudaBuild(cuda::BuildOptions),
    /// Gather a self-contained GPU run: binary, MNIST, configs, scripts.
    ///
    /// Builds the stripped CUDA binary (as cuda-build) and gathers into one
    /// folder what a GPU node without Rust or network needs for one measured
    /// run: the binary, MNIST, the DT/CT/FM configs, a copy of the PyTorch
    /// reference, run.sh and summarize.py. There: bash DIR/run.sh [--out
    /// DIR]; a CPU dry run here: bash DIR/run.sh --device cpu --quick.
    GpuBundle(gpu_bundle::Options),
}

/// The options of `cargo xtask bench`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
struct BenchOptions {
    /// Worker threads of each implementation.
    #[arg(long, value_name = "N", default_value_t = 2)]
    threads: usize,
    /// Interleaved rounds; medians are reported.
    #[arg(long, value_name = "R", default_value_t = 3)]
    rounds: usize,
    /// A Python with torch, for PyTorch's reference (else $NOPROP_TORCH_PYTHON).
    #[arg(long, value_name = "PY")]
    torch_python: Option<String>,
    /// The PyTorch reference script (default: ../shared/bench/torch_reference.py).
    #[arg(long, value_name = "FILE")]
    torch_script: Option<PathBuf>,
    /// Time the build with AVX-512 GEMM kernels (<target>/avx512).
    #[arg(long)]
    avx512: bool,
    /// One JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// The options of `cargo xtask data`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
struct DataOptions {
    /// mnist, cifar10 or cifar100.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// The data set's folder (default: noprop's).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse() {
        Cli::Bench(o) => bench(&o),
        Cli::Data(o) => data(&o),
        Cli::Ci => ci(),
        Cli::Reproduce(o) => reproduce::run(&o, &root()),
        Cli::Curve(o) => reproduce::curve::run(o),
        Cli::Soak(o) => soak::run(&o),
        Cli::CudaEnv(o) => cuda::env(&o, &root()),
        Cli::CudaBuild(o) => cuda::build(&o, &root()),
        Cli::GpuBundle(o) => gpu_bundle::run(&o, &root()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parses `args` as one command's options `A` (what follows the command's name).
#[cfg(test)]
fn parse_args<A: clap::Args>(args: &[&str]) -> Result<A, clap::Error> {
    #[derive(Parser)]
    struct One<A: clap::Args> {
        #[command(flatten)]
        options: A,
    }
    One::<A>::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
        .map(|o| o.options)
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

fn bench(o: &BenchOptions) -> Result<()> {
    let threads = o.threads.to_string();
    let rounds = o.rounds;
    let as_json = o.json;
    let torch_python = o
        .torch_python
        .clone()
        .or_else(|| std::env::var("NOPROP_TORCH_PYTHON").ok());
    let torch_script = o
        .torch_script
        .clone()
        .unwrap_or_else(|| root().join("../shared/bench/torch_reference.py"));
    let noprop = build_noprop_with(o.avx512)?;
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

fn data(o: &DataOptions) -> Result<()> {
    let noprop = build_noprop()?;
    let mut cmd = Command::new(noprop);
    cmd.args(["data", "download", "--dataset", &o.dataset]);
    if let Some(dir) = &o.dir {
        cmd.arg("--dir").arg(dir);
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
    fn the_commands_are_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        for name in [
            "bench",
            "data",
            "ci",
            "reproduce",
            "curve",
            "soak",
            "cuda-env",
            "cuda-build",
            "gpu-bundle",
        ] {
            assert!(Cli::command().find_subcommand(name).is_some(), "{name}");
        }
    }

    #[test]
    fn typos_and_missing_values_are_errors() {
        assert!(Cli::try_parse_from(["xtask", "bench", "--thraeds", "2"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "soak", "--kils", "3"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "data", "--dir"]).is_err());
        let o: BenchOptions = parse_args(&["--threads", "1", "--json"]).unwrap();
        assert_eq!((o.threads, o.rounds, o.json), (1, 3, true));
    }
}

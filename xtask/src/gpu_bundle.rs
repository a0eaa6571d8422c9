//! `cargo xtask gpu-bundle`: everything one measured GPU run needs, in one
//! folder, for a node with an NVIDIA driver and a Python environment holding
//! CUDA 13's libraries (and PyTorch), but no Rust toolchain and no network.
//!
//! ```text
//! bin/noprop.gz               the cuda build, stripped and gzipped
//! data/mnist/*.gz             MNIST's four IDX files
//! configs/mnist-*-onehot.toml the shipped DT, CT and FM configs
//! torch_reference.py          a copy of the PyTorch reference
//! run.sh, summarize.py        the run and its summary (xtask/bundle/)
//! MANIFEST.json               commit, files and sizes, the time estimate
//! ```
//!
//! The folder must stay under [`MAX_BYTES`] (what travels with one command to
//! a lent machine) and `run.sh` under its 470-second budget; the per-step
//! estimates behind that budget are in [`ESTIMATE`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

/// What one command may carry to a lent machine: the bundle stays below it.
pub const MAX_BYTES: u64 = 64 << 20;

/// The configs the run trains, from `configs/`.
const CONFIGS: &[&str] = &["mnist-dt-onehot", "mnist-ct-onehot", "mnist-fm-onehot"];

/// MNIST's files as published (gzipped), from noprop-data's catalogue.
fn mnist_files() -> Vec<String> {
    noprop_data::DatasetKind::Mnist
        .files()
        .into_iter()
        .map(|f| f.name)
        .collect()
}

const RUN_SH: &str = include_str!("../bundle/run.sh");
const SUMMARIZE_PY: &str = include_str!("../bundle/summarize.py");

/// Estimated seconds of each step of `run.sh` on one H100/H200, written
/// down before any GPU run (none has been at hand), with the reasoning:
/// (step, low, high, basis).
pub const ESTIMATE: &[(&str, u32, u32, &str)] = &[
    ("selftest", 10, 30, "18 small checks; CUDA context, cuBLAS and PTX module loads dominate"),
    ("dt", 30, 90, "4690 one-block steps at 2-5 ms (about 150 kernel launches each), 60k-image load, eval 6 x 20k images x T=10"),
    ("bench", 15, 40, "35 block steps, 10 reps of 12 ops, 5 fused steps, T=10 inference of 1000 images"),
    ("torch-step", 15, 30, "torch import and CUDA init, 35 steps"),
    ("torch-dt", 20, 60, "4690 steps at 2-4 ms (eager PyTorch), eval 2 x 10k images"),
    ("ct", 40, 100, "469 steps; eval 1000 steps x 20 batches of 1000 x (1 stochastic + deterministic) = 40k forwards at 1-2 ms"),
    ("fm", 40, 100, "as ct (Euler, 1000 steps)"),
];

/// The options of `cargo xtask gpu-bundle`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct Options {
    /// The bundle's folder (default: target/gpu-bundle).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Bundle this noprop and build nothing.
    #[arg(long, value_name = "FILE")]
    binary: Option<PathBuf>,
    /// Use target/cuda/release/noprop as it is.
    #[arg(long = "no-build", action = clap::ArgAction::SetFalse)]
    build: bool,
    /// MNIST's folder (else $NOPROP_DATA/mnist, ../shared/data/mnist, data/mnist).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The PyTorch reference (default: ../shared/bench/torch_reference.py).
    #[arg(long, value_name = "FILE")]
    torch_script: Option<PathBuf>,
    /// The GPU's compute capability.
    #[arg(long, value_name = "N", default_value = "90", value_parser = crate::cuda::compute_cap)]
    compute_cap: String,
}

impl Options {
    fn out(&self, root: &Path) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| root.join("target/gpu-bundle"))
    }
}

/// The first folder holding MNIST's four gzipped files.
fn mnist_dir(flag: Option<&Path>, root: &Path) -> Result<PathBuf> {
    let files = mnist_files();
    let has = |d: &Path| files.iter().all(|f| d.join(f).is_file());
    let mut tried = vec![];
    if let Some(d) = flag {
        for c in [d.to_path_buf(), d.join("mnist")] {
            if has(&c) {
                return Ok(c);
            }
            tried.push(c);
        }
        bail!(
            "no gzipped MNIST ({}) in {}",
            files.join(", "),
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        );
    }
    let mut candidates = vec![];
    if let Some(d) = std::env::var_os(noprop_data::DATA_ENV) {
        candidates.push(PathBuf::from(d).join("mnist"));
    }
    candidates.push(root.join("../shared/data/mnist"));
    candidates.push(root.join("data/mnist"));
    for c in candidates {
        if has(&c) {
            return Ok(c);
        }
        tried.push(c);
    }
    bail!(
        "no gzipped MNIST found (looked in {}); pass --data DIR or run `cargo xtask data`",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Empties `out` for a new bundle: a folder this command made (it holds
/// MANIFEST.json) is replaced; any other non-empty folder is refused.
fn fresh_folder(out: &Path) -> Result<()> {
    if out.exists() {
        let ours = out.join("MANIFEST.json").is_file();
        let empty = fs::read_dir(out)
            .with_context(|| format!("cannot read {}", out.display()))?
            .next()
            .is_none();
        if !ours && !empty {
            bail!(
                "{} exists and is not a bundle (no MANIFEST.json); pass another --out",
                out.display()
            );
        }
        fs::remove_dir_all(out).with_context(|| format!("cannot empty {}", out.display()))?;
    }
    for sub in ["bin", "data/mnist", "configs"] {
        fs::create_dir_all(out.join(sub))
            .with_context(|| format!("cannot create {}", out.join(sub).display()))?;
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<u64> {
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

#[cfg(unix)]
fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> Result<()> {
    Ok(())
}

/// Every file under `dir` with its size, relative paths, sorted.
fn listing(dir: &Path) -> Result<Vec<(String, u64)>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if path.is_dir() {
                walk(base, &path, out)?;
            } else {
                let rel = path.strip_prefix(base).unwrap_or(&path);
                out.push((rel.display().to_string(), entry.metadata()?.len()));
            }
        }
        Ok(())
    }
    let mut out = vec![];
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn git_commit(root: &Path) -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `cargo xtask gpu-bundle`.
pub fn run(opts: &Options, root: &Path) -> Result<()> {
    let mnist = mnist_dir(opts.data.as_deref(), root)?;
    let torch = opts
        .torch_script
        .clone()
        .unwrap_or_else(|| root.join("../shared/bench/torch_reference.py"));
    if !torch.is_file() {
        bail!(
            "the PyTorch reference {} does not exist; pass --torch-script FILE",
            torch.display()
        );
    }
    for c in CONFIGS {
        let p = root.join("configs").join(format!("{c}.toml"));
        if !p.is_file() {
            bail!("{} does not exist", p.display());
        }
    }
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => {
            if opts.build {
                crate::cuda::build(&crate::cuda::BuildOptions::release(&opts.compute_cap), root)?;
            }
            crate::cuda::build_target(root).join("release/noprop")
        }
    };
    if !binary.is_file() {
        bail!(
            "{} does not exist; build it (cargo xtask cuda-build) or pass --binary FILE",
            binary.display()
        );
    }

    let out = &opts.out(root);
    fresh_folder(out)?;
    // Stripped, then gzipped: the CUDA kernels' PTX is text, and the
    // stripped binary alone is near the 64 MiB limit. run.sh unpacks it.
    let stripped = out.join("bin/noprop");
    let strip = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&stripped)
        .arg(&binary)
        .status()
        .context("cannot run strip (binutils) to shrink the binary")?;
    if !strip.success() {
        bail!("strip --strip-all {} failed ({strip})", binary.display());
    }
    let stripped_bytes = fs::metadata(&stripped)?.len();
    let bin = out.join("bin/noprop.gz");
    let gz = fs::File::create(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    let gzip = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .arg(&stripped)
        .stdout(gz)
        .status()
        .context("cannot run gzip to pack the binary")?;
    if !gzip.success() {
        bail!("gzip -9 {} failed ({gzip})", stripped.display());
    }
    fs::remove_file(&stripped).with_context(|| format!("cannot remove {}", stripped.display()))?;
    for f in mnist_files() {
        copy(&mnist.join(&f), &out.join("data/mnist").join(&f))?;
    }
    for c in CONFIGS {
        let name = format!("{c}.toml");
        copy(
            &root.join("configs").join(&name),
            &out.join("configs").join(&name),
        )?;
    }
    copy(&torch, &out.join("torch_reference.py"))?;
    for (name, text) in [("run.sh", RUN_SH), ("summarize.py", SUMMARIZE_PY)] {
        let p = out.join(name);
        fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        make_executable(&p)?;
    }

    let files = listing(out)?;
    let total: u64 = files.iter().map(|(_, n)| n).sum();
    let (low, high) = ESTIMATE
        .iter()
        .fold((0, 0), |(l, h), (_, a, b, _)| (l + a, h + b));
    let manifest = json!({
        "commit": git_commit(root),
        "binary": binary,
        "binary_stripped_bytes": stripped_bytes,
        "compute_cap": opts.compute_cap,
        "files": files.iter().map(|(p, n)| json!({"path": p, "bytes": n})).collect::<Vec<_>>(),
        "total_bytes": total,
        "estimate_seconds": {
            "low": low,
            "high": high,
            "steps": ESTIMATE.iter().map(|(s, a, b, why)| json!({"step": s, "low": a, "high": b, "basis": why})).collect::<Vec<_>>(),
        },
        "run": "bash run.sh [--out DIR]   (a dry run on CPU: bash run.sh --device cpu --quick)",
    });
    let manifest_text = format!("{}\n", serde_json::to_string_pretty(&manifest)?);
    fs::write(out.join("MANIFEST.json"), &manifest_text)
        .with_context(|| format!("cannot write {}", out.join("MANIFEST.json").display()))?;
    let total = total + manifest_text.len() as u64;
    if total > MAX_BYTES {
        bail!(
            "the bundle in {} holds {:.1} MiB, over the {} MiB one command may carry",
            out.display(),
            total as f64 / (1u64 << 20) as f64,
            MAX_BYTES >> 20
        );
    }
    eprintln!(
        "bundle: {} ({:.1} MiB in {} files; binary {:.1} MiB stripped, {:.1} MiB gzipped); estimated {}-{} s on one H100/H200\n\
         run there: bash {}/run.sh   (CUDA 13's libraries from the Python environment, or NOPROP_CUDA_LIB)\n\
         dry run here: bash {}/run.sh --device cpu --quick",
        out.display(),
        total as f64 / (1u64 << 20) as f64,
        files.len() + 1,
        stripped_bytes as f64 / (1u64 << 20) as f64,
        fs::metadata(&bin)?.len() as f64 / (1u64 << 20) as f64,
        low,
        high,
        out.display(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_reject_unknown() {
        let root = Path::new("/r");
        let o: Options = crate::parse_args(&[
            "--binary",
            "/b/noprop",
            "--out",
            "/o",
            "--compute-cap",
            "80",
        ])
        .unwrap();
        assert_eq!(o.binary.as_deref(), Some(Path::new("/b/noprop")));
        assert_eq!(o.out(root), Path::new("/o"));
        assert_eq!(o.compute_cap, "80");
        assert!(o.build);
        let o: Options = crate::parse_args(&["--no-build"]).unwrap();
        assert!(!o.build);
        assert_eq!(o.out(root), Path::new("/r/target/gpu-bundle"));
        assert!(crate::parse_args::<Options>(&["--bogus"]).is_err());
        assert!(crate::parse_args::<Options>(&["--out"]).is_err());
        assert!(crate::parse_args::<Options>(&["--compute-cap", "9.0"]).is_err());
    }

    #[test]
    fn the_estimate_fits_the_run_budget() {
        let high: u32 = ESTIMATE.iter().map(|e| e.2).sum();
        // run.sh's default --budget, with room for start-up and the summary.
        assert!(high <= 470, "{high}");
        let budget_line = RUN_SH.lines().find(|l| l.starts_with("budget=")).unwrap();
        assert_eq!(budget_line, "budget=470");
        for (step, ..) in ESTIMATE {
            assert!(
                RUN_SH.contains(&format!("step {step} ")),
                "run.sh has no step {step}"
            );
        }
    }

    #[test]
    fn a_foreign_folder_is_refused_and_a_bundle_replaced() {
        let dir = std::env::temp_dir().join(format!("gpu-bundle-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("precious.txt"), "keep").unwrap();
        let err = fresh_folder(&dir).unwrap_err().to_string();
        assert!(err.contains("not a bundle"), "{err}");
        assert!(dir.join("precious.txt").is_file());
        fs::remove_file(dir.join("precious.txt")).unwrap();
        fresh_folder(&dir).unwrap();
        fs::write(dir.join("MANIFEST.json"), "{}").unwrap();
        fs::write(dir.join("bin/old"), "x").unwrap();
        fresh_folder(&dir).unwrap();
        assert!(!dir.join("bin/old").exists());
        assert!(dir.join("data/mnist").is_dir());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mnist_is_looked_for_where_the_flag_says() {
        let dir = std::env::temp_dir().join(format!("gpu-bundle-mnist-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("mnist")).unwrap();
        let err = mnist_dir(Some(&dir), Path::new("/r"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no gzipped MNIST"), "{err}");
        for f in mnist_files() {
            fs::write(dir.join("mnist").join(f), "").unwrap();
        }
        assert_eq!(
            mnist_dir(Some(&dir), Path::new("/r")).unwrap(),
            dir.join("mnist")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}

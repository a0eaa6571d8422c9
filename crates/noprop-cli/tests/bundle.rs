//! The GPU bundle's run script (`xtask/bundle/run.sh`), dry-run on the CPU
//! with this build's `noprop`, as `cargo xtask gpu-bundle` lays it out:
//! every step runs (self-test, DT/CT/FM epochs on a slice of MNIST, bench;
//! PyTorch's steps are skipped where `python3` has no torch) and
//! `summary.json` carries their figures.
//!
//! Needs real MNIST: `NOPROP_DATA=/path/to/data cargo test -p noprop-cli
//! --test bundle -- --ignored` (`$NOPROP_DATA/mnist`, else
//! `<workspace>/../shared/data/mnist`), and `bash` and `python3`.

use std::path::{Path, PathBuf};
use std::process::Command;

const MNIST: &[&str] = &[
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mnist_dir() -> PathBuf {
    match std::env::var_os("NOPROP_DATA") {
        Some(root) if !root.is_empty() => PathBuf::from(root).join("mnist"),
        _ => workspace().join("../shared/data/mnist"),
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.display(), to.display()));
}

#[test]
#[ignore = "needs real MNIST: set NOPROP_DATA or have ../shared/data"]
fn bundle_dry_run_on_cpu_writes_its_summary() {
    let root = workspace();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    for sub in ["bin", "data/mnist", "configs"] {
        std::fs::create_dir_all(bundle.join(sub)).unwrap();
    }
    // Gzipped, as the bundle carries it (run.sh unpacks it).
    let gz = std::fs::File::create(bundle.join("bin/noprop.gz")).unwrap();
    let status = Command::new("gzip")
        .args(["-1", "-c", env!("CARGO_BIN_EXE_noprop")])
        .stdout(gz)
        .status()
        .unwrap();
    assert!(status.success());
    for f in MNIST {
        copy(&mnist_dir().join(f), &bundle.join("data/mnist").join(f));
    }
    for c in ["mnist-dt-onehot", "mnist-ct-onehot", "mnist-fm-onehot"] {
        let name = format!("{c}.toml");
        copy(
            &root.join("configs").join(&name),
            &bundle.join("configs").join(&name),
        );
    }
    for f in ["run.sh", "summarize.py"] {
        copy(&root.join("xtask/bundle").join(f), &bundle.join(f));
    }
    let out = dir.path().join("out");
    let run = Command::new("bash")
        .arg(bundle.join("run.sh"))
        .args([
            "--device",
            "cpu",
            "--quick",
            "--threads",
            "2",
            "--python",
            "python3",
        ])
        .arg("--out")
        .arg(&out)
        .env_remove("NOPROP_DATA")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "run.sh failed:\n{stderr}");

    let text = std::fs::read_to_string(out.join("summary.json")).unwrap();
    let s: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(s["device"], "cpu", "{s}");
    assert_eq!(s["quick"], true);
    assert_eq!(s["all_ok"], true, "{s}");
    for step in ["selftest", "dt", "bench", "ct", "fm"] {
        assert_eq!(s["steps"][step]["exit"], 0, "{step}: {s}");
    }
    let selftest = &s["steps"]["selftest"]["result"];
    assert!(selftest["checks"].as_u64().unwrap() >= 18, "{selftest}");
    assert_eq!(selftest["failed"], serde_json::json!([]));
    for run in ["dt", "ct", "fm"] {
        let acc = s["runs"][run]["test_acc"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&acc), "{run}: {acc}");
        assert!(s["runs"][run]["epoch_seconds"].as_f64().unwrap() > 0.0);
        // On the CPU there is no device memory to report.
        assert!(s["runs"][run]["train_peak_device_bytes"].is_null());
    }
    assert!(s["noprop"]["block_step_ms"].as_f64().unwrap() > 0.0);
    // Checkpoints stay on the node; metrics come back.
    assert!(out.join("runs/dt/metrics.jsonl").is_file());
    assert!(!out.join("runs/dt/checkpoints").exists());
}

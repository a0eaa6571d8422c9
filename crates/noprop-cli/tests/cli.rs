//! End-to-end tests of the `noprop` binary on tiny synthetic MNIST-format
//! files: a run folder is complete, `eval` reads it, bad input fails with one
//! line, and a run killed mid-epoch resumes to the same weights as a run
//! that was never interrupted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use noprop_data::{DatasetKind, Split};

fn noprop() -> Command {
    let mut c = Command::cargo_bin("noprop").unwrap();
    c.env_remove("NOPROP_DATA").env("RAYON_NUM_THREADS", "2");
    c
}

/// `noprop train --config CFG --data DATA`, more arguments to follow.
fn train_cmd(cfg: impl AsRef<std::ffi::OsStr>, data: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = noprop();
    c.args(["train", "--config"])
        .arg(cfg)
        .arg("--data")
        .arg(data);
    c
}

/// Trains `cfg` on `data` into the run folder `run`, which must succeed.
fn train_into(cfg: impl AsRef<std::ffi::OsStr>, data: impl AsRef<std::ffi::OsStr>, run: &Path) {
    let out = train_cmd(cfg, data).arg("--out").arg(run).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        run.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a tiny MNIST in the canonical IDX format.
fn write_mnist(dir: &Path, train: usize, test: usize) {
    for (split, n) in [(Split::Train, train), (Split::Test, test)] {
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
        let mut pixels = vec![0u8; n * 784];
        for (i, &y) in labels.iter().enumerate() {
            for r in (y as usize * 2)..(y as usize * 2 + 4) {
                for c in 0..28 {
                    pixels[i * 784 + r * 28 + c] = 200;
                }
            }
            pixels[i * 784 + (i * 31) % 784] = 255;
        }
        DatasetKind::Mnist
            .write(dir, split, &pixels, &labels)
            .unwrap();
    }
}

fn write_config(path: &Path, epochs: usize, extra: &str) {
    let text = format!(
        r#"
[data]
dataset = "mnist"
[model]
embedding = {{ kind = "one-hot" }}
[method]
kind = "dt"
blocks = 3
eta = 0.1
[train]
epochs = {epochs}
batch_size = 16
lr = 1e-3
weight_decay = 1e-3
seed = 4
[eval]
runs = 2
batch_size = 50
train_subset = 32
[checkpoint]
keep_last = 0
{extra}
"#
    );
    std::fs::write(path, text).unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

fn fixture(train: usize) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    write_mnist(&root.join("mnist"), train, 50);
    Fixture { _tmp: tmp, root }
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The events written so far by a running process: the last line may be
/// half-written, so unparsable lines are skipped.
fn metrics_so_far(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn checkpoint_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn train_writes_a_complete_run_folder_and_eval_reads_it() {
    let f = fixture(64);
    let cfg = f.root.join("tiny.toml");
    write_config(&cfg, 2, "");
    let run = f.root.join("run");
    let out = train_cmd(&cfg, f.root.join("mnist"))
        .arg("--out")
        .arg(&run)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["epochs"], 2);
    assert!(summary["eval"]["test_acc"].as_f64().unwrap() >= 0.0);
    for file in [
        "config.json",
        "meta.json",
        "metrics.jsonl",
        "checkpoints/epoch-0002/model.safetensors",
        "checkpoints/epoch-0002/optimizer.safetensors",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["seed"], 4);
    assert!(meta["command"].as_array().unwrap().len() > 3);
    let m = metrics(&run);
    assert_eq!(m.iter().filter(|v| v["event"] == "pass").count(), 6);
    assert_eq!(m.iter().filter(|v| v["event"] == "eval").count(), 2);
    let names: Vec<String> =
        checkpoint_tensors(&run.join("checkpoints/epoch-0002/model.safetensors"))
            .into_iter()
            .map(|x| x.0)
            .collect();
    assert!(names.contains(&"blocks.3.img.conv1.weight".to_string()));
    assert!(names.contains(&"head.bias".to_string()));
    assert!(names.contains(&"embed".to_string()));
    assert!(!names.iter().any(|n| n.starts_with("blocks.4")));

    let out = noprop()
        .arg("eval")
        .arg(&run)
        .arg("--data")
        .arg(f.root.join("mnist"))
        .args(["--json", "--runs", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["epoch"], 2);
    assert_eq!(v["eval"]["test_acc_runs"].as_array().unwrap().len(), 3);
    assert_eq!(v["cpu_gemm"], meta["cpu_gemm"]);
}

fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error:") && last.contains(needle),
        "expected an error naming {needle:?}, got {err}"
    );
}

#[test]
fn bad_input_gives_a_one_line_error() {
    let f = fixture(32);
    let data = f.root.join("mnist");
    // An unknown field.
    let cfg = f.root.join("unknown.toml");
    write_config(&cfg, 1, "[extra]\nfoo = 1\n");
    let out = train_cmd(&cfg, &data).output().unwrap();
    assert_one_line_error(&out, "unknown field");
    // T = 0 and a negative learning rate.
    for (from, to, needle) in [
        ("blocks = 3", "blocks = 0", "method.blocks"),
        ("lr = 1e-3", "lr = -1e-3", "train.lr"),
    ] {
        let cfg = f.root.join("bad.toml");
        write_config(&cfg, 1, "");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(from, to);
        std::fs::write(&cfg, text).unwrap();
        let out = train_cmd(&cfg, &data).output().unwrap();
        assert_one_line_error(&out, needle);
    }
    // A field of another method is an unknown field of this one, named.
    let cfg = f.root.join("foreign.toml");
    write_config(&cfg, 1, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("eta = 0.1", "eta = 0.1\nsigma = 0.2");
    std::fs::write(&cfg, text).unwrap();
    let out = train_cmd(&cfg, &data).output().unwrap();
    assert_one_line_error(&out, "unknown field `sigma`");
    // A JSON config that repeats a key is refused, as TOML refuses it.
    let cfg = f.root.join("dup.json");
    std::fs::write(&cfg, r#"{"data": {"dataset": "mnist"}, "method": {"kind": "dt", "blocks": 2, "blocks": 3}, "train": {"epochs": 1}}"#).unwrap();
    let out = train_cmd(&cfg, &data).output().unwrap();
    assert_one_line_error(&out, "duplicate key \"blocks\"");
    // A config in the format before 0.2 says what moved where.
    let cfg = f.root.join("old.toml");
    std::fs::write(&cfg, "[data]\ndataset = \"mnist\"\n[model]\nmethod = \"dt\"\nblocks = 3\nembedding = \"one-hot\"\n[train]\nepochs = 1\nbatch_size = 16\nlr = 1e-3\nweight_decay = 0.0\neta = 0.1\n").unwrap();
    let out = train_cmd(&cfg, &data).output().unwrap();
    assert_one_line_error(&out, "model.method moved to method.kind");
    assert_one_line_error(&out, "train.eta moved to method.eta");
    // Training on no images is an error, not "everything".
    let cfg = f.root.join("ok.toml");
    write_config(&cfg, 1, "");
    let out = noprop()
        .args(["train", "--train-limit", "0", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert_one_line_error(&out, "data.train_limit must be at least 1");
    // One training image trains nothing: an error, not "loss 0.0000".
    let out = noprop()
        .args(["train", "--train-limit", "1", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert_one_line_error(&out, "training needs at least 2");
    // Devices and other files that are not configs or checkpoints are refused before reading.
    let out = noprop()
        .args(["train", "--config", "/dev/zero"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "not a regular file");
    let out = noprop()
        .args(["eval", "/dev/zero"])
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert_one_line_error(&out, "not a regular file");
    // With RUST_BACKTRACE set, still one line, and the OS cause once.
    let out = noprop()
        .env("RUST_BACKTRACE", "1")
        .args(["train", "--config"])
        .arg(f.root.join("missing.toml"))
        .output()
        .unwrap();
    assert_one_line_error(&out, "missing.toml");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    let out = noprop()
        .env("RUST_BACKTRACE", "full")
        .arg("eval")
        .arg(f.root.join("bad.safetensors"))
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Enumerated arguments are checked by the parser.
    let out = noprop()
        .args(["train", "--kernels", "gpu", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("fast"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Missing data.
    let cfg = f.root.join("ok.toml");
    write_config(&cfg, 1, "");
    let out = train_cmd(&cfg, f.root.join("nowhere")).output().unwrap();
    assert_one_line_error(&out, "nowhere");
    // Corrupt data: a truncated image file.
    let broken = f.root.join("broken");
    write_mnist(&broken, 32, 50);
    let img = broken.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(&img, &bytes[..bytes.len() - 100]).unwrap();
    let out = train_cmd(&cfg, &broken).output().unwrap();
    assert_one_line_error(&out, "train-images-idx3-ubyte");
    // An unreadable checkpoint.
    let bad = f.root.join("bad.safetensors");
    std::fs::write(&bad, b"garbage").unwrap();
    let out = noprop()
        .arg("eval")
        .arg(&bad)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert_one_line_error(&out, "bad.safetensors");
    // Not a run folder.
    let out = noprop()
        .args(["train", "--resume"])
        .arg(&f.root)
        .output()
        .unwrap();
    assert_one_line_error(&out, "not a run folder");
}

#[test]
fn a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result() {
    let f = fixture(400);
    let cfg = f.root.join("tiny.toml");
    write_config(&cfg, 3, "");
    let data = f.root.join("mnist");

    let straight = f.root.join("straight");
    train_into(&cfg, &data, &straight);

    let killed = f.root.join("killed");
    let mut child = train_cmd(&cfg, &data)
        .arg("--out")
        .arg(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = killed.join("checkpoints/epoch-0001/model.safetensors");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !first.is_file() {
        assert!(Instant::now() < deadline, "no checkpoint after 300 s");
        assert!(child.try_wait().unwrap().is_none(), "training exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Kill it in epoch 2 (events reach metrics.jsonl only when their epoch
    // is committed, so a short wait is all that tells epoch 2 has begun).
    std::thread::sleep(Duration::from_millis(150));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("checkpoints/epoch-0002").exists(),
        "the run finished before it was killed"
    );
    assert!(!metrics_so_far(&killed).iter().any(|v| v["epoch"] == 2));

    let out = noprop()
        .args(["train", "--resume"])
        .arg(&killed)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let m = metrics(&killed);
    let epochs: Vec<u64> = m
        .iter()
        .filter(|v| v["event"] == "epoch")
        .map(|v| v["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, vec![1, 2, 3]);
    for e in 1..=3u64 {
        let passes: Vec<u64> = m
            .iter()
            .filter(|v| v["event"] == "pass" && v["epoch"] == e)
            .map(|v| v["block"].as_u64().unwrap())
            .collect();
        assert_eq!(passes, vec![1, 2, 3], "epoch {e}");
        assert_eq!(
            m.iter()
                .filter(|v| v["event"] == "eval" && v["epoch"] == e)
                .count(),
            1
        );
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(killed.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["resumes"][0]["from_epoch"], 1);
    assert_eq!(
        checkpoint_tensors(&killed.join("checkpoints/epoch-0003/model.safetensors")),
        checkpoint_tensors(&straight.join("checkpoints/epoch-0003/model.safetensors")),
        "resumed weights differ from the uninterrupted run's"
    );
    let evals = |m: &[serde_json::Value]| {
        m.iter()
            .filter(|v| v["event"] == "eval")
            .map(|v| v["test_acc_runs"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(evals(&m), evals(&metrics(&straight)));
}

/// A kill in each window of an epoch's commit (after the checkpoint folder
/// is renamed into place, and after the events are appended) is recovered
/// by `--resume`: every epoch's events exactly once, the same weights as a
/// run never interrupted.
#[test]
fn kills_in_the_commit_windows_lose_nothing() {
    let f = fixture(64);
    let cfg = f.root.join("tiny.toml");
    write_config(&cfg, 2, "");
    let data = f.root.join("mnist");
    let train = |out: &Path, failpoint: Option<&str>| {
        let mut c = noprop();
        c.args(["train", "--config"])
            .arg(&cfg)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out);
        if let Some(p) = failpoint {
            c.env("NOPROP_FAILPOINT", p);
        }
        c.output().unwrap()
    };
    let straight = f.root.join("straight");
    assert!(train(&straight, None).status.success());
    for point in ["after-commit", "after-events"] {
        let run = f.root.join(point);
        let out = train(&run, Some(point));
        assert!(!out.status.success(), "{point}: the failpoint did not fire");
        let out = noprop()
            .args(["train", "--resume"])
            .arg(&run)
            .arg("--data")
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = metrics(&run);
        let epochs: Vec<u64> = m
            .iter()
            .filter(|v| v["event"] == "epoch")
            .map(|v| v["epoch"].as_u64().unwrap())
            .collect();
        assert_eq!(epochs, vec![1, 2], "{point}");
        assert_eq!(
            m.iter().filter(|v| v["event"] == "pass").count(),
            6,
            "{point}"
        );
        assert_eq!(
            m.iter().filter(|v| v["event"] == "eval").count(),
            2,
            "{point}"
        );
        assert_eq!(
            checkpoint_tensors(&run.join("checkpoints/epoch-0002/model.safetensors")),
            checkpoint_tensors(&straight.join("checkpoints/epoch-0002/model.safetensors")),
            "{point}"
        );
    }
}

/// `--resume` continues under the run's own config and data: an edited
/// `config.json` or other data is refused unless `--accept-changes`, which
/// meta.json records; `--epochs` on resume is recorded in config.json.
/// Resuming on other GEMM kernels (a build with or without `avx512`) is
/// allowed, said on stderr and recorded.
#[test]
fn resume_refuses_changed_config_or_data_unless_accepted() {
    let f = fixture(64);
    let cfg = f.root.join("tiny.toml");
    write_config(&cfg, 1, "");
    let data = f.root.join("mnist");
    let run = f.root.join("run");
    train_into(&cfg, &data, &run);
    let resume = |extra: &[&str], data: &Path| {
        noprop()
            .args(["train", "--resume"])
            .arg(&run)
            .arg("--data")
            .arg(data)
            .args(extra)
            .output()
            .unwrap()
    };
    // Other data (the same shapes, other images).
    let other = f.root.join("other");
    write_mnist(&other, 65, 50);
    assert_one_line_error(&resume(&["--epochs", "2"], &other), "data.train 64 -> 65");
    // An edited learning rate.
    let path = run.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"lr\": 0.001", "\"lr\": 0.01")).unwrap();
    assert_one_line_error(&resume(&["--epochs", "2"], &data), "train.lr 0.001 -> 0.01");
    let out = resume(&["--epochs", "2", "--accept-changes"], &data);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("meta.json")).unwrap()).unwrap();
    assert!(
        meta["resumes"][0]["accepted_changes"][0]
            .as_str()
            .unwrap()
            .contains("train.lr"),
        "{meta}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(config["train"]["epochs"], 2);

    assert_eq!(
        meta["resumes"][0]["noprop_version"],
        env!("CARGO_PKG_VERSION")
    );
    // `noprop --version` names the kernels and features of this build.
    let out = noprop().arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains(&format!("CPU GEMM kernels: {}", noprop_kernels::gemm_isa()))
            && version.contains("features: download"),
        "{version}"
    );
    // The run so far as if trained by a build with other GEMM kernels.
    let isa = meta["cpu_gemm"].as_str().unwrap().to_string();
    assert_eq!(meta["resumes"][0]["cpu_gemm"], isa.as_str());
    let meta_path = run.join("meta.json");
    let mut edited = meta.clone();
    edited["resumes"][0]["cpu_gemm"] = "other-isa".into();
    std::fs::write(&meta_path, edited.to_string()).unwrap();
    let out = resume(&["--epochs", "3"], &data);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "note: this run trained with other-isa GEMM kernels and continues with {isa} ones"
        )),
        "{stderr}"
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    assert_eq!(meta["resumes"][1]["cpu_gemm"], isa.as_str());
    // Resumed again on the same kernels: nothing to say.
    let out = resume(&["--epochs", "4"], &data);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("GEMM kernels"));
    // A CPU run recorded before noprop kept the kernels ran the default
    // build's (`fma`): a note exactly when this build runs others.
    let mut old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    old.as_object_mut().unwrap().remove("cpu_gemm");
    for r in old["resumes"].as_array_mut().unwrap() {
        r.as_object_mut().unwrap().remove("cpu_gemm");
    }
    std::fs::write(&meta_path, old.to_string()).unwrap();
    let out = resume(&["--epochs", "5"], &data);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).contains("this run trained with fma GEMM kernels"),
        isa != "fma",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `noprop selftest` on the CPU: the CPU against itself, and candle's
/// stock CPU ops against the fast kernels; a JSON summary on request.
#[test]
fn selftest_passes_on_the_cpu() {
    for kernels in ["fast", "stock"] {
        let out = noprop()
            .args([
                "selftest",
                "--device",
                "cpu",
                "--json",
                "--kernels",
                kernels,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{kernels}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["failed"], 0);
        assert!(v["checks"].as_array().unwrap().len() >= 18);
        assert_eq!(v["cpu_gemm"], noprop_kernels::gemm_isa());
    }
}

/// A second process on a run folder in use is refused at once, naming the holder.
#[test]
fn a_second_process_on_a_run_folder_is_refused() {
    let f = fixture(400);
    let cfg = f.root.join("tiny.toml");
    write_config(&cfg, 50, "");
    let data = f.root.join("mnist");
    let run = f.root.join("run");
    let mut child = train_cmd(&cfg, &data)
        .arg("--out")
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run.join("config.json").is_file() {
        assert!(Instant::now() < deadline, "no run folder after 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    let out = noprop()
        .args(["train", "--resume"])
        .arg(&run)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let fresh = train_cmd(&cfg, &data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_one_line_error(
        &out,
        &format!("in use by another noprop process (pid {pid})"),
    );
    assert_one_line_error(&fresh, "in use");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the refusal should come at once"
    );
}

#[test]
fn prototype_embeddings_render_as_png() {
    let f = fixture(40);
    let cfg = f.root.join("proto.toml");
    write_config(&cfg, 1, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("kind = \"one-hot\"", "kind = \"prototype\"")
        .replace("blocks = 3", "blocks = 1");
    std::fs::write(&cfg, text).unwrap();
    let run = f.root.join("run");
    train_into(&cfg, f.root.join("mnist"), &run);
    assert!(run.join("embed-init.safetensors").is_file());
    let png = f.root.join("fig2.png");
    let out = noprop()
        .args(["inspect", "embeddings"])
        .arg(&run)
        .arg("--png")
        .arg(&png)
        .args(["--scale", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    // Ten tiles of 28x28 at scale 2 with a 2-pixel border, two rows (initial, learned).
    assert_eq!((info.width, info.height), (10 * 58, 2 * 58));
    // A one-hot run has no image embedding to draw.
    let onehot = f.root.join("onehot.toml");
    write_config(&onehot, 1, "");
    let run2 = f.root.join("run2");
    train_into(&onehot, f.root.join("mnist"), &run2);
    let out = noprop()
        .args(["inspect", "embeddings"])
        .arg(&run2)
        .arg("--png")
        .arg(&png)
        .output()
        .unwrap();
    assert_one_line_error(&out, "prototype");
    // The run's own files are never overwritten, and sizes are bounded before allocating.
    let config = std::fs::read(run.join("config.json")).unwrap();
    let out = noprop()
        .args(["inspect", "embeddings"])
        .arg(&run)
        .arg("--png")
        .arg(run.join("config.json"))
        .output()
        .unwrap();
    assert_one_line_error(&out, ".png");
    let out = noprop()
        .args(["inspect", "embeddings"])
        .arg(&run)
        .arg("--png")
        .arg(run.join("fig.png"))
        .output()
        .unwrap();
    assert_one_line_error(&out, "inside the run folder");
    assert_eq!(std::fs::read(run.join("config.json")).unwrap(), config);
    let out = noprop()
        .args(["inspect", "embeddings"])
        .arg(&run)
        .arg("--png")
        .arg(&png)
        .args(["--scale", "100000"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--scale");
    let out = noprop()
        .args(["bench", "--batch", "100000000"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--batch");
    let out = noprop()
        .args(["bench", "--threads", "100000"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--threads");
}

/// `noprop bench` times every method: a shipped CT, FM, back-prop and
/// adjoint config (and a CIFAR-100 prototype one) each print one JSON line with a positive step time and
/// inference rate (synthetic inputs, so no data is needed).
#[test]
fn bench_times_every_method() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for (config, method) in [
        ("mnist-ct-onehot.toml", "ct"),
        ("mnist-fm-onehot.toml", "fm"),
        ("mnist-backprop-onehot.toml", "backprop"),
        ("mnist-adjoint-onehot.toml", "adjoint"),
        // 100 classes, more than the 32 images of a 4-image batch's pool:
        // every class still gets an image to build its prototype from.
        ("cifar100-ct-prototype.toml", "ct"),
    ] {
        let out = noprop()
            .args(["bench", "--steps", "1", "--warmup", "0", "--batch", "4"])
            .args(["--infer-batch", "2", "--threads", "1", "--json", "-c"])
            .arg(root.join(config))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(v["method"], method, "{v}");
        assert!(v["step_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["infer_images_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["infer_steps"].as_u64().unwrap() >= 10, "{v}");
    }
}

/// `noprop inspect schedule` prints the schedule a checkpoint holds: for
/// NoProp-CT the learned gamma(t), whose ends are the checkpoint's
/// `schedule.gamma0` and `gamma0 + softplus(gamma_gap)`; for NoProp-DT the
/// recorded alpha_bar_0..=T. A method without a schedule is refused.
#[test]
fn inspect_schedule_reads_the_checkpoint() {
    let f = fixture(64);
    let train = |name: &str, method: &str| -> PathBuf {
        let cfg = f.root.join(format!("{name}.toml"));
        write_config(&cfg, 1, "");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("kind = \"dt\"\nblocks = 3\neta = 0.1\n", method);
        std::fs::write(&cfg, text).unwrap();
        let run = f.root.join(name);
        train_into(&cfg, f.root.join("mnist"), &run);
        run
    };
    let inspect = |run: &Path, extra: &[&str]| {
        noprop()
            .args(["inspect", "schedule"])
            .arg(run)
            .args(extra)
            .output()
            .unwrap()
    };
    let ct = train(
        "ct",
        "kind = \"ct\"\neta = 1.0\ntime_dim = 8\nsteps = 2\n[method.schedule]\nhidden = 4\ngamma0 = -3.0\ngamma1 = 3.0\n",
    );
    let out = inspect(&ct, &["--json", "--points", "5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let model = ct.join("checkpoints/epoch-0001/model.safetensors");
    let tensor = |name: &str| -> f64 {
        let bytes = checkpoint_tensors(&model)
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .1;
        f32::from_le_bytes(bytes[..4].try_into().unwrap()) as f64
    };
    let (g0, gap) = (tensor("schedule.gamma0"), tensor("schedule.gamma_gap"));
    let g1 = g0 + gap.exp().ln_1p();
    let at = |k: &str| v[k].as_f64().unwrap();
    assert!((at("gamma_at_1") - g0).abs() < 1e-5, "{v}");
    assert!((at("gamma_at_0") - g1).abs() < 1e-4, "{v}");
    // One training epoch moves the endpoints, but not far from -3 and 3.
    assert!(
        g0 != -3.0 && (g0 + 3.0).abs() < 0.5 && (g1 - 3.0).abs() < 0.5,
        "{g0} {g1}"
    );
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    assert!((at("final_noise_std") - sig(g0).sqrt()).abs() < 1e-6, "{v}");
    let share = at("weight_share_below_half");
    assert!(share > 0.0 && share < 0.5, "{v}");
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 5);
    for w in points.windows(2) {
        assert!(w[1]["gamma"].as_f64() < w[0]["gamma"].as_f64(), "{v}");
        assert!(
            w[1]["alpha_bar"].as_f64() > w[0]["alpha_bar"].as_f64(),
            "{v}"
        );
    }
    let text = String::from_utf8(inspect(&ct, &[]).stdout).unwrap();
    assert!(
        text.contains("gamma(1) = ") && text.lines().count() == 5 + 11,
        "{text}"
    );
    // The model file itself works as well as its run folder.
    assert_eq!(
        inspect(&model, &["--json", "--points", "5"]).stdout,
        out.stdout
    );

    let dt = train("dt", "kind = \"dt\"\nblocks = 3\neta = 0.1\n");
    let out = inspect(&dt, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let abar: Vec<f64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["alpha_bar"].as_f64().unwrap())
        .collect();
    assert_eq!(abar.len(), 4, "{v}");
    assert!(
        abar.windows(2).all(|w| w[1] > w[0]) && abar[0] < 1e-3,
        "{v}"
    );
    assert!((v["final_noise_std"].as_f64().unwrap() - (1.0 - abar[3]).sqrt()).abs() < 1e-12);

    let fm = train("fm", "kind = \"fm\"\ntime_dim = 8\nsteps = 2\n");
    assert_one_line_error(&inspect(&fm, &[]), "no noise schedule");
    assert_one_line_error(&inspect(&ct, &["--points", "1"]), "--points");
    assert_one_line_error(&inspect(&f.root.join("none"), &[]), "none");
}

/// The pass records of a run without their times and worker indices.
fn passes(run: &Path) -> Vec<serde_json::Value> {
    metrics(run)
        .into_iter()
        .filter(|v| v["event"] == "pass" || v["event"] == "eval")
        .map(|mut v| {
            for k in ["seconds", "worker", "train_seconds"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

/// `mpirun -n N noprop ARGS...`, when this build has the `mpi` feature and
/// `mpirun` is installed.
fn mpirun(n: usize) -> Option<Command> {
    if !cfg!(feature = "mpi") || Command::new("mpirun").arg("--version").output().is_err() {
        return None;
    }
    let mut c = Command::new("mpirun");
    c.args(["-n", &n.to_string()])
        .arg(assert_cmd::cargo::cargo_bin("noprop"))
        .env_remove("NOPROP_DATA");
    Some(c)
}

/// Runs `c` (a `noprop` or `mpirun` command) with `args`, which must succeed.
fn succeed(mut c: Command, args: &[&std::ffi::OsStr]) {
    let out = c.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The arguments as `OsStr`s.
fn refs(v: &[std::ffi::OsString]) -> Vec<&std::ffi::OsStr> {
    v.iter().map(|a| a.as_os_str()).collect()
}

/// Whether two runs' checkpoints of `epoch` hold the same tensors.
fn same_checkpoints(a: &Path, b: &Path, epoch: usize) -> bool {
    ["model", "optimizer"].iter().all(|file| {
        let path = |r: &Path| r.join(format!("checkpoints/epoch-{epoch:04}/{file}.safetensors"));
        checkpoint_tensors(&path(a)) == checkpoint_tensors(&path(b))
    })
}

#[test]
fn workers_and_mpi_ranks_train_exactly_the_single_worker_run() {
    let f = fixture(64);
    let data = f.root.join("mnist");
    let (cfg, cfg1) = (f.root.join("two.toml"), f.root.join("one.toml"));
    write_config(&cfg, 2, "");
    write_config(&cfg1, 1, "");
    let one = f.root.join("one-worker");
    train_into(&cfg, &data, &one);
    // `train --config CFG --data DATA --out RUN`, then `train --resume RUN --epochs 2`.
    let start = |cfg: &Path, run: &Path| -> Vec<std::ffi::OsString> {
        ["train", "--config"]
            .map(Into::into)
            .into_iter()
            .chain([
                cfg.into(),
                "--data".into(),
                data.clone().into(),
                "--out".into(),
                run.into(),
            ])
            .collect()
    };
    let resume = |run: &Path| -> Vec<std::ffi::OsString> {
        ["train", "--resume"]
            .map(Into::into)
            .into_iter()
            .chain([
                run.into(),
                "--epochs".into(),
                "2".into(),
                "--data".into(),
                data.clone().into(),
            ])
            .collect()
    };
    for k in ["2", "3"] {
        let run = f.root.join(format!("threads-{k}"));
        let mut args = start(&cfg, &run);
        args.extend(["--workers".into(), k.into()]);
        succeed(noprop(), &refs(&args));
        assert!(same_checkpoints(&one, &run, 2), "--workers {k}");
        assert_eq!(passes(&one), passes(&run), "--workers {k}");
        let last = metrics(&run).pop().unwrap();
        assert_eq!(last["workers"], k.parse::<u64>().unwrap());
        assert!(last["exchanged_bytes"].as_u64().unwrap() > 0);
    }
    // Started on 3 workers, resumed on 2.
    let run = f.root.join("three-then-two");
    let mut args = start(&cfg1, &run);
    args.extend(["--workers".into(), "3".into()]);
    succeed(noprop(), &refs(&args));
    let mut args = resume(&run);
    args.extend(["--workers".into(), "2".into()]);
    succeed(noprop(), &refs(&args));
    assert!(same_checkpoints(&one, &run, 2));
    // MPI ranks: the same run under mpirun -n 2 and -n 3, and a resume with
    // another number of ranks.
    let Some(_) = mpirun(2) else { return };
    for n in [2, 3] {
        let run = f.root.join(format!("mpi-{n}"));
        succeed(mpirun(n).unwrap(), &refs(&start(&cfg, &run)));
        assert!(same_checkpoints(&one, &run, 2), "mpirun -n {n}");
        assert_eq!(passes(&one), passes(&run), "mpirun -n {n}");
    }
    let run = f.root.join("mpi-2-then-3");
    succeed(mpirun(2).unwrap(), &refs(&start(&cfg1, &run)));
    succeed(mpirun(3).unwrap(), &refs(&resume(&run)));
    assert!(same_checkpoints(&one, &run, 2));
}

#[test]
fn a_run_that_cannot_be_split_is_refused_before_a_folder_is_made() {
    let f = fixture(32);
    let data = f.root.join("mnist");
    let cfg = f.root.join("c.toml");
    write_config(&cfg, 1, "");
    let run = f.root.join("run");
    let out = train_cmd(&cfg, &data)
        .args(["--workers", "4", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert_one_line_error(&out, "4 workers for 3 blocks");
    assert!(!run.exists());
    let learned = f.root.join("learned.toml");
    write_config(&learned, 1, "");
    let text = std::fs::read_to_string(&learned).unwrap().replace(
        r#"{ kind = "one-hot" }"#,
        r#"{ kind = "learned", dim = 20 }"#,
    );
    std::fs::write(&learned, text).unwrap();
    let out = train_cmd(&learned, &data)
        .args(["--workers", "2", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert_one_line_error(&out, "learned or prototype embedding");
    assert!(!run.exists());
}

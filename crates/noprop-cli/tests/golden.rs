//! Behaviour pinned across refactorings: short runs of every method, each
//! trained by the `noprop` binary on tiny synthetic MNIST files, must give
//! checkpoint tensors (weights and optimizer state) that are byte-identical
//! to the ones recorded below, and the same loss values and accuracies in
//! `metrics.jsonl`.
//!
//! The recorded digests were taken from commit 021d005, before the trainer
//! redesign (issue 10). A change that is meant to alter the numbers (a new
//! default, a fixed bug) updates them deliberately: run
//! `NOPROP_GOLDEN_PRINT=1 cargo test -p noprop-cli --test golden -- --nocapture`
//! and paste the table it prints, saying why in the commit message.
//!
//! The digests hold for any thread count (the kernels sum in a fixed order)
//! and for the AVX2 and baseline builds of the kernels (tested bit for bit in
//! noprop-kernels); they assume IEEE f32 arithmetic without fused
//! multiply-adds that candle does not itself choose, as on x86-64 and aarch64,
//! and the default build's GEMM kernels: a build with `--features avx512` on
//! a CPU with AVX-512 sums differently by design, and skips this test.

use std::path::Path;
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use noprop_data::{DatasetKind, Split};

/// FNV-1a, 64 bit: enough to tell two byte strings apart in a test.
fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn write_mnist(dir: &Path, train: usize, test: usize) {
    for (split, n) in [(Split::Train, train), (Split::Test, test)] {
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % 10).collect();
        let mut pixels = vec![0u8; n * 784];
        for (i, &y) in labels.iter().enumerate() {
            for r in (y as usize * 2)..(y as usize * 2 + 4) {
                for c in 0..28 {
                    pixels[i * 784 + r * 28 + c] = 180 + (c as u8 % 5) * 10;
                }
            }
            pixels[i * 784 + (i * 37) % 784] = 255;
        }
        DatasetKind::Mnist
            .write(dir, split, &pixels, &labels)
            .unwrap();
    }
}

/// The digest of every tensor (name, dtype, shape, bytes) of a safetensors file.
fn tensors_digest(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st.tensors();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = FNV_START;
    for (name, t) in v {
        h = fnv(name.as_bytes(), h);
        h = fnv(format!("{:?}{:?}", t.dtype(), t.shape()).as_bytes(), h);
        h = fnv(t.data(), h);
    }
    h
}

/// The digest of the loss values and accuracies of `metrics.jsonl` (not
/// the timings), each number in Rust's shortest round-trip form.
fn metrics_digest(run: &Path) -> u64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut h = FNV_START;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let keys: &[&str] = match v["event"].as_str() {
            Some("pass") => &["epoch", "block", "loss", "ce", "kl", "denoise", "batches"],
            Some("eval") => &[
                "epoch",
                "test_acc",
                "test_acc_se",
                "test_acc_runs",
                "test_acc_deterministic",
                "train_acc",
            ],
            Some("epoch") => &["epoch"],
            _ => &[],
        };
        for k in keys {
            h = fnv(format!("{k}={};", v[*k]).as_bytes(), h);
        }
    }
    h
}

/// One pinned run: a name, the config's text, and the recorded digests of
/// the final model, optimizer and metrics.
struct Case {
    name: &'static str,
    config: String,
    model: u64,
    optimizer: u64,
    metrics: u64,
}

/// A config in the current format.
fn config(model: &str, method: &str, train_extra: &str, epochs: usize) -> String {
    format!(
        r#"
[data]
dataset = "mnist"
[model]
{model}
[method]
{method}
[train]
epochs = {epochs}
batch_size = 16
lr = 1e-3
weight_decay = 1e-3
seed = 11
{train_extra}
[eval]
runs = 2
batch_size = 40
train_subset = 24
[checkpoint]
keep_last = 1
"#
    )
}

/// The runs, each with the digests recorded from commit 021d005 (where the
/// same settings were written in the old flat format).
fn cases() -> Vec<Case> {
    let c = |name, config, model, optimizer, metrics| Case {
        name,
        config,
        model,
        optimizer,
        metrics,
    };
    let learned = |dim: usize| format!("embedding = {{ kind = \"learned\", dim = {dim} }}");
    let adam = "optimizer = \"adam\"";
    vec![
        c("dt-sequential-onehot", config("", "kind = \"dt\"\nblocks = 3\neta = 0.5", "", 2), 0xe020f7063fe70a3c, 0xda2f415c71424381, 0x7240c12a9926522f),
        c("dt-fused-onehot", config("", "kind = \"dt\"\nblocks = 3\neta = 0.5\norder = \"fused\"", "", 2), 0x6744081cd07898d7, 0xf7fb1327117a46eb, 0x636bc68b52412519),
        c("dt-learned-adam-radial", config("embedding = { kind = \"learned\", dim = 6, lr = 3e-3 }\nclass_probability = { kind = \"radial\", sigma = 0.5 }", "kind = \"dt\"\nblocks = 2\neta = 0.5", adam, 1), 0x651d9646c0343a49, 0x5d64ac7f8ee7a384, 0x18acc340c4d3f3ad),
        c("dt-prototype", config("embedding = { kind = \"prototype\" }", "kind = \"dt\"\nblocks = 2\neta = 0.5", "", 1), 0xcd9ef6020822da1a, 0xcf31c04defae277d, 0xa21558bdfd4d3e96),
        c("ct-onehot", config("", "kind = \"ct\"\neta = 0.5\ntime_dim = 8\nsampler = \"eq3\"\nsteps = 6\nschedule = { hidden = 8, gamma0 = -5.0, gamma1 = 5.0 }", adam, 2), 0x84572ca3eb0118ed, 0x116294c3cbd6f4e2, 0xd5915df66ab83d26),
        c("ct-learned-heun", config(&learned(12), "kind = \"ct\"\neta = 0.5\ntime_dim = 8\nsampler = \"heun\"\nsteps = 6", adam, 1), 0xc0e388842a1cd8d2, 0xfa39d5c13bc50387, 0x6fee98dcdae0bd2e),
        c("fm-onehot", config("", "kind = \"fm\"\nsigma = 0.1\ntime_dim = 8\nsolver = \"euler\"\nsteps = 6", adam, 2), 0x2fdc0e06f673782f, 0x6d9d2e1efcf30829, 0xee3d846599ae86d5),
        c("fm-learned", config(&learned(12), "kind = \"fm\"\ntime_dim = 8\nsolver = \"heun\"\nsteps = 6", adam, 1), 0x09c96e5bc881c677, 0x472535b8fdc988bf, 0x8fa7c1c49acc4437),
        c("backprop-onehot", config("", "kind = \"backprop\"\nblocks = 3\nalpha_init = 0.4", "", 2), 0x6bbab6614636b6e3, 0x2b90a993af18459b, 0xd0e94ecd4297c7df),
        c("backprop-learned-uniform", config(&format!("{}\nhead_init = \"uniform\"", learned(12)), "kind = \"backprop\"\nblocks = 2", adam, 1), 0x6dc36a68781a37c1, 0x8273acf06e20a1d8, 0xf7f0965046ac340b),
        c("adjoint-onehot", config("", "kind = \"adjoint\"\ntime_dim = 8\ntrain_steps = 5\nsteps = 6", "", 1), 0xc808b9ffa1154e16, 0x9087a735ba498497, 0x3f4c132646c39570),
    ]
}

#[test]
fn every_method_trains_to_the_recorded_tensors() {
    if noprop_kernels::gemm_isa() == "avx512f" {
        eprintln!("skipped: the digests are the default build's, and this build runs AVX-512 GEMM kernels");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mnist");
    write_mnist(&data, 40, 30);
    let print = std::env::var_os("NOPROP_GOLDEN_PRINT").is_some();
    let mut failures = vec![];
    for case in cases() {
        let cfg = tmp.path().join(format!("{}.toml", case.name));
        std::fs::write(&cfg, &case.config).unwrap();
        let run = tmp.path().join(case.name);
        let out = Command::cargo_bin("noprop")
            .unwrap()
            .env_remove("NOPROP_DATA")
            .args(["train", "--threads", "2", "--config"])
            .arg(&cfg)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&run)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let ckpts = run.join("checkpoints");
        let last = std::fs::read_dir(&ckpts)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .max()
            .unwrap();
        let got = (
            tensors_digest(&last.join("model.safetensors")),
            tensors_digest(&last.join("optimizer.safetensors")),
            metrics_digest(&run),
        );
        if print {
            println!(
                "{:<26} model {:#018x} optimizer {:#018x} metrics {:#018x}",
                case.name, got.0, got.1, got.2
            );
        }
        if got != (case.model, case.optimizer, case.metrics) {
            failures.push(format!(
                "{}: model {:#018x} optimizer {:#018x} metrics {:#018x}, recorded {:#018x} {:#018x} {:#018x}",
                case.name, got.0, got.1, got.2, case.model, case.optimizer, case.metrics
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "runs differ from the recorded ones:\n{}",
        failures.join("\n")
    );
}

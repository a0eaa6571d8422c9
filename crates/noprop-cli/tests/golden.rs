//! Behaviour pinned across refactorings and across CPUs: short runs of every
//! method, each trained by the `noprop` binary on tiny synthetic MNIST files,
//! must give checkpoint tensors (weights and optimizer state) that are
//! byte-identical to the ones recorded in `golden/digests.txt`, and the same
//! loss values and accuracies in `metrics.jsonl`.
//!
//! Each method runs twice: one optimizer step (one minibatch, one epoch),
//! whose digests are kept per tensor, so that a difference names the layers
//! it starts in; and a few epochs, whose digests are kept per file.
//!
//! The digests hold for any thread count (the kernels sum in a fixed order),
//! for every cache size (the GEMMs cut their summed dimension where the
//! shapes alone say, see `noprop_kernels::matmul`) and for the AVX2 and
//! baseline builds of the kernels' own loops, on every x86-64 CPU with AVX2
//! and FMA: the second test re-runs everything with the L1, L2 and L3 sizes
//! the `gemm` crate reads from `/sys` replaced by other CPUs' (in a private
//! mount namespace, where the machine allows one) and with the baseline
//! loops forced. A build with `--features avx512` on a CPU with AVX-512 sums
//! differently by design, and skips these tests.
//!
//! A change that is meant to alter the numbers (a new default, a fixed bug)
//! records them again, deliberately:
//! `NOPROP_GOLDEN_WRITE=1 cargo test -p noprop-cli --test golden`, saying
//! why in the commit message. The digests now recorded were written after
//! the fixed-depth GEMMs landed (issue 27); ten of the eleven full runs give
//! the digests the older code gave on a CPU with a 32 KiB 8-way L1 cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// The digest of each tensor (dtype, shape, bytes) of a safetensors file, by
/// name.
fn tensor_digests(path: &Path) -> BTreeMap<String, u64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let h = fnv(
                format!("{:?}{:?}", t.dtype(), t.shape()).as_bytes(),
                FNV_START,
            );
            (name, fnv(t.data(), h))
        })
        .collect()
}

/// The digest of every tensor (name, dtype, shape, bytes) of a safetensors
/// file, in name order.
fn file_digest(path: &Path) -> u64 {
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

/// One pinned method: a name and its config's text (for the full run).
struct Case {
    name: &'static str,
    config: String,
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

/// The config of the one-step run of a case: one epoch over the
/// 16-image training set, that is one minibatch.
fn one_step(config: &str) -> String {
    let mut out = String::new();
    for line in config.lines() {
        if line.starts_with("epochs = ") {
            out.push_str("epochs = 1\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn cases() -> Vec<Case> {
    let c = |name, config| Case { name, config };
    let learned = |dim: usize| format!("embedding = {{ kind = \"learned\", dim = {dim} }}");
    let adam = "optimizer = \"adam\"";
    vec![
        c("dt-sequential-onehot", config("", "kind = \"dt\"\nblocks = 3\neta = 0.5", "", 2)),
        c("dt-fused-onehot", config("", "kind = \"dt\"\nblocks = 3\neta = 0.5\norder = \"fused\"", "", 2)),
        c("dt-learned-adam-radial", config("embedding = { kind = \"learned\", dim = 6, lr = 3e-3 }\nclass_probability = { kind = \"radial\", sigma = 0.5 }", "kind = \"dt\"\nblocks = 2\neta = 0.5", adam, 1)),
        c("dt-prototype", config("embedding = { kind = \"prototype\" }", "kind = \"dt\"\nblocks = 2\neta = 0.5", "", 1)),
        c("ct-onehot", config("", "kind = \"ct\"\neta = 0.5\ntime_dim = 8\nsampler = \"eq3\"\nsteps = 6\nschedule = { hidden = 8, gamma0 = -5.0, gamma1 = 5.0 }", adam, 2)),
        c("ct-learned-heun", config(&learned(12), "kind = \"ct\"\neta = 0.5\ntime_dim = 8\nsampler = \"heun\"\nsteps = 6", adam, 1)),
        c("fm-onehot", config("", "kind = \"fm\"\nsigma = 0.1\ntime_dim = 8\nsolver = \"euler\"\nsteps = 6", adam, 2)),
        c("fm-learned", config(&learned(12), "kind = \"fm\"\ntime_dim = 8\nsolver = \"heun\"\nsteps = 6", adam, 1)),
        c("fm-prototype", config("embedding = { kind = \"prototype\" }", "kind = \"fm\"\ntime_dim = 8\nsolver = \"euler\"\nsteps = 3", adam, 1)),
        c("dt-prototype-radial", config("embedding = { kind = \"prototype\", lr = 1e-4 }\nclass_probability = { kind = \"radial\", sigma = 0.5 }", "kind = \"dt\"\nblocks = 2\neta = 0.5", adam, 1)),
        c("backprop-onehot", config("", "kind = \"backprop\"\nblocks = 3\nalpha_init = 0.4", "", 2)),
        c("backprop-learned-uniform", config(&format!("{}\nhead_init = \"uniform\"", learned(12)), "kind = \"backprop\"\nblocks = 2", adam, 1)),
        c("adjoint-onehot", config("", "kind = \"adjoint\"\ntime_dim = 8\ntrain_steps = 5\nsteps = 6", "", 1)),
    ]
}

/// The recorded digests: `case run file tensor digest` per line, where `run`
/// is `step` or `full`, `file` is `model`, `optimizer` or `metrics`, and
/// `tensor` is a tensor's name (the model of a step run) or `*` (every
/// tensor of the file, and the metrics).
const RECORDED: &str = include_str!("golden/digests.txt");

/// Digests keyed by `(case, run, file, tensor)`.
type Digests = BTreeMap<(String, String, String, String), u64>;

fn parse_recorded() -> Digests {
    RECORDED
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 5, "golden/digests.txt: bad line {l:?}");
            let d = u64::from_str_radix(f[4].trim_start_matches("0x"), 16).unwrap();
            ((f[0].into(), f[1].into(), f[2].into(), f[3].into()), d)
        })
        .collect()
}

/// What the process sees of the CPU: the caches the `gemm` crate reads
/// (the machine's own, or an emulated L1 data cache of `KiB` and `ways`,
/// with matching L2 and L3), and whether the kernels' baseline loops are
/// forced.
#[derive(Clone, Copy)]
struct Setting {
    name: &'static str,
    l1: Option<(usize, usize)>,
    baseline: bool,
}

/// The settings the second test runs: each L1 geometry class the `gemm`
/// crate's blocking distinguishes (depth 512 and 1024), a CPU whose caches
/// it cannot read (its built-in defaults), and both loop builds.
const EMULATED: &[Setting] = &[
    Setting {
        name: "L1 32 KiB 8-way (AMD Zen, gemm depth 512)",
        l1: Some((32, 8)),
        baseline: false,
    },
    Setting {
        name: "L1 48 KiB 12-way (Intel Sapphire Rapids, gemm depth 1024)",
        l1: Some((48, 12)),
        baseline: true,
    },
    Setting {
        name: "L1 64 KiB 8-way (gemm depth 1024)",
        l1: Some((64, 8)),
        baseline: false,
    },
    Setting {
        name: "caches unreadable (gemm's defaults)",
        l1: Some((0, 0)),
        baseline: false,
    },
    Setting {
        name: "this CPU, baseline loops",
        l1: None,
        baseline: true,
    },
];

/// A fake `/sys/devices/system/cpu` with two CPUs whose data caches are
/// an L1 of `kib` KiB and `ways` ways, a 512 KiB L2 and a 32 MiB L3 (no
/// cache folders at all when `kib` is 0).
fn fake_sysfs(root: &Path, (kib, ways): (usize, usize)) {
    for cpu in 0..2 {
        let cache = root.join(format!("cpu{cpu}/cache"));
        std::fs::create_dir_all(&cache).unwrap();
        if kib == 0 {
            std::fs::remove_dir(&cache).unwrap();
            continue;
        }
        let levels = [
            (1, "Data", kib, ways, cpu.to_string()),
            (2, "Unified", 512, 8, cpu.to_string()),
            (3, "Unified", 32768, 16, "0-1".into()),
        ];
        for (i, (level, kind, size, ways, shared)) in levels.into_iter().enumerate() {
            let dir = cache.join(format!("index{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            for (file, value) in [
                ("level", level.to_string()),
                ("type", kind.to_string()),
                ("size", format!("{size}K")),
                ("ways_of_associativity", ways.to_string()),
                ("coherency_line_size", "64".into()),
                ("shared_cpu_list", shared),
            ] {
                std::fs::write(dir.join(file), format!("{value}\n")).unwrap();
            }
        }
    }
}

/// The command that runs `noprop` under `setting`: through `unshare` with
/// the fake caches bound over `/sys/devices/system/cpu` where it emulates
/// them.
fn noprop(setting: Setting, scratch: &Path) -> Command {
    let bin = assert_cmd::cargo::cargo_bin("noprop");
    let mut cmd = match setting.l1 {
        None => Command::new(bin),
        Some(l1) => {
            let root = scratch.join("sysfs");
            let _ = std::fs::remove_dir_all(&root);
            fake_sysfs(&root, l1);
            let mut c = Command::new("unshare");
            c.args(["--mount", "--map-root-user", "sh", "-c"])
                .arg(r#"mount --bind "$0" /sys/devices/system/cpu && exec "$@""#)
                .arg(&root)
                .arg(bin);
            c
        }
    };
    cmd.env_remove("NOPROP_DATA");
    if setting.baseline {
        cmd.env(noprop_kernels::SIMD_ENV, "baseline");
    } else {
        cmd.env_remove(noprop_kernels::SIMD_ENV);
    }
    cmd
}

/// Whether this machine lets an unprivileged `unshare` bind a folder over
/// `/sys/devices/system/cpu` (root, or user namespaces allowed).
fn can_emulate(scratch: &Path) -> bool {
    let dir = scratch.join("probe");
    std::fs::create_dir_all(dir.join("cpu0")).unwrap();
    Command::new("unshare")
        .args(["--mount", "--map-root-user", "sh", "-c"])
        .arg(r#"mount --bind "$0" /sys/devices/system/cpu && test -d /sys/devices/system/cpu/cpu0 && ! test -e /sys/devices/system/cpu/cpu0/cache"#)
        .arg(&dir)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Trains `config` into `run` under `setting` and returns its digests.
fn train(
    setting: Setting,
    scratch: &Path,
    case: &str,
    run: &str,
    config: &str,
    data: &Path,
) -> Digests {
    let cfg = scratch.join(format!("{case}-{run}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let out_dir = scratch.join(format!("{case}-{run}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = noprop(setting, scratch)
        .args(["train", "--threads", "2", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} ({case}, {run}): {}",
        setting.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let last: PathBuf = std::fs::read_dir(out_dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .max()
        .unwrap();
    let mut d = Digests::new();
    let key = |file: &str, tensor: &str| {
        (
            case.to_string(),
            run.to_string(),
            file.to_string(),
            tensor.to_string(),
        )
    };
    for file in ["model", "optimizer"] {
        let path = last.join(format!("{file}.safetensors"));
        if run == "step" && file == "model" {
            for (name, digest) in tensor_digests(&path) {
                d.insert(key(file, &name), digest);
            }
        } else {
            d.insert(key(file, "*"), file_digest(&path));
        }
    }
    d.insert(key("metrics", "*"), metrics_digest(&out_dir));
    d
}

/// Every case's step and full runs under `setting`.
fn all_runs(setting: Setting, scratch: &Path) -> Digests {
    let step_data = scratch.join("mnist-16");
    let full_data = scratch.join("mnist-40");
    if !full_data.exists() {
        write_mnist(&step_data, 16, 30);
        write_mnist(&full_data, 40, 30);
    }
    let mut d = Digests::new();
    for case in cases() {
        d.extend(train(
            setting,
            scratch,
            case.name,
            "step",
            &one_step(&case.config),
            &step_data,
        ));
        d.extend(train(
            setting,
            scratch,
            case.name,
            "full",
            &case.config,
            &full_data,
        ));
    }
    d
}

/// Where `got` differs from the recorded digests, one line per case and
/// run, naming the tensors that differ (at most eight) and how many agree.
fn differences(setting: &str, got: &Digests, recorded: &Digests) -> Vec<String> {
    let mut by_run: BTreeMap<(String, String), (Vec<String>, usize)> = BTreeMap::new();
    let keys: BTreeSet<_> = recorded.keys().chain(got.keys()).collect();
    for key in keys {
        let entry = by_run.entry((key.0.clone(), key.1.clone())).or_default();
        match (got.get(key), recorded.get(key)) {
            (Some(a), Some(b)) if a == b => entry.1 += 1,
            (a, b) => entry.0.push(format!(
                "{}:{} {} (recorded {})",
                key.2,
                key.3,
                a.map_or("missing".into(), |a| format!("{a:#018x}")),
                b.map_or("none".into(), |b| format!("{b:#018x}"))
            )),
        }
    }
    by_run
        .into_iter()
        .filter(|(_, (diff, _))| !diff.is_empty())
        .map(|((case, run), (diff, same))| {
            let shown: Vec<&str> = diff.iter().take(8).map(String::as_str).collect();
            format!(
                "[{setting}] {case} {run}: {} differ, {} agree: {}",
                diff.len(),
                same,
                shown.join("; ")
            )
        })
        .collect()
}

fn skip_avx512() -> bool {
    let skip = noprop_kernels::gemm_isa() == "avx512f";
    if skip {
        eprintln!("skipped: the digests are the default build's, and this build runs AVX-512 GEMM kernels");
    }
    skip
}

#[test]
fn every_method_trains_to_the_recorded_tensors() {
    if skip_avx512() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let native = Setting {
        name: "this CPU",
        l1: None,
        baseline: false,
    };
    let got = all_runs(native, tmp.path());
    if std::env::var_os("NOPROP_GOLDEN_WRITE").is_some() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/digests.txt");
        let mut text = String::from("# Written by `NOPROP_GOLDEN_WRITE=1 cargo test -p noprop-cli --test golden`; see golden.rs.\n# case run file tensor digest\n");
        for ((case, run, file, tensor), d) in &got {
            text.push_str(&format!("{case} {run} {file} {tensor} {d:#018x}\n"));
        }
        std::fs::write(&path, text).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let failures = differences(native.name, &got, &parse_recorded());
    assert!(
        failures.is_empty(),
        "runs differ from the recorded ones:\n{}",
        failures.join("\n")
    );
}

/// The same digests with the caches of other CPUs and the baseline loops.
/// Needs `unshare` and a mount namespace (root, or user namespaces); where
/// the machine allows neither it says so and passes, unless
/// `NOPROP_REQUIRE_CPU_EMULATION` is set, as CI sets it.
#[test]
fn the_recorded_tensors_do_not_depend_on_the_cpu_model() {
    if skip_avx512() || std::env::var_os("NOPROP_GOLDEN_WRITE").is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    if !can_emulate(tmp.path()) {
        let msg = "cannot emulate other CPUs' caches here: `unshare --mount --map-root-user` failed (needs root or user namespaces)";
        assert!(
            std::env::var_os("NOPROP_REQUIRE_CPU_EMULATION").is_none(),
            "{msg}"
        );
        eprintln!("skipped: {msg}");
        return;
    }
    let recorded = parse_recorded();
    let mut failures = vec![];
    for &setting in EMULATED {
        failures.extend(differences(
            setting.name,
            &all_runs(setting, tmp.path()),
            &recorded,
        ));
    }
    assert!(
        failures.is_empty(),
        "runs differ from the recorded ones:\n{}",
        failures.join("\n")
    );
}

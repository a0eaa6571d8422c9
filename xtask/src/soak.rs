//! `cargo xtask soak`: kills `noprop train` again and again, at random
//! moments and in the commit windows (through the `NOPROP_FAILPOINT` hook),
//! resumes it each time, and checks that every run ends with each epoch's
//! events exactly once and the same weights as a run never interrupted.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use noprop_data::{DatasetKind, Split};
use serde_json::Value;

/// The options of `cargo xtask soak`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct Options {
    /// How many times `noprop train` is killed.
    #[arg(long, value_name = "N", default_value_t = 200)]
    kills: usize,
    /// The seed of the kill times.
    #[arg(long, value_name = "S", default_value_t = 1)]
    seed: u64,
    /// The work folder (default: a temporary folder, removed on success).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Use target/release/noprop as it is.
    #[arg(long)]
    no_build: bool,
}

/// A small xorshift generator: the soak's kill times, reproducible by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A tiny MNIST in the canonical layout: each class brightens its own band of rows.
fn write_mnist(dir: &Path, train: u32, test: u32) -> Result<()> {
    for (split, n) in [(Split::Train, train), (Split::Test, test)] {
        let labels: Vec<u32> = (0..n).map(|i| i * 7 % 10).collect();
        let mut pixels = vec![0u8; n as usize * 784];
        for (i, &y) in labels.iter().enumerate() {
            for r in (y as usize * 2)..(y as usize * 2 + 4) {
                for c in 0..28 {
                    pixels[i * 784 + r * 28 + c] = 200;
                }
            }
            pixels[i * 784 + (i * 31) % 784] = 255;
        }
        DatasetKind::Mnist.write(dir, split, &pixels, &labels)?;
    }
    Ok(())
}

const EPOCHS: usize = 4;
const BLOCKS: usize = 3;

fn config() -> String {
    format!(
        "[data]\ndataset = \"mnist\"\n[model]\nembedding = {{ kind = \"one-hot\" }}\n[method]\nkind = \"dt\"\nblocks = {BLOCKS}\neta = 0.1\n\
         [train]\nepochs = {EPOCHS}\nbatch_size = 16\nlr = 1e-3\nweight_decay = 1e-3\nseed = 5\n\
         [eval]\nruns = 1\nbatch_size = 64\ntrain_subset = 16\n[checkpoint]\nkeep_last = 1\n"
    )
}

/// The data section of a safetensors file (the tensors, not the metadata,
/// which holds the training clock).
fn tensor_bytes(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let n = u64::from_le_bytes(bytes.get(..8).context("short file")?.try_into()?) as usize;
    Ok(bytes.get(8 + n..).context("short file")?.to_vec())
}

/// What is wrong with a finished run, compared with the reference run.
fn check(run: &Path, reference: &[u8]) -> Result<Vec<String>> {
    let mut problems = vec![];
    let text = fs::read_to_string(run.join("metrics.jsonl"))?;
    let events: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("metrics.jsonl has a torn line")?;
    for e in 1..=EPOCHS as u64 {
        let count = |kind: &str| {
            events
                .iter()
                .filter(|v| v["event"] == kind && v["epoch"] == e)
                .count()
        };
        if count("epoch") != 1 || count("eval") != 1 || count("pass") != BLOCKS {
            problems.push(format!(
                "epoch {e}: {} epoch, {} eval, {} pass events",
                count("epoch"),
                count("eval"),
                count("pass")
            ));
        }
    }
    let last = run.join(format!("checkpoints/epoch-{EPOCHS:04}/model.safetensors"));
    if tensor_bytes(&last)? != reference {
        problems.push("final weights differ from the uninterrupted run's".into());
    }
    Ok(problems)
}

pub fn run(opts: &Options) -> Result<()> {
    let (kills, seed) = (opts.kills, opts.seed);
    let noprop = if opts.no_build {
        crate::root().join("target/release/noprop")
    } else {
        crate::build_noprop()?
    };
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("noprop-soak-{}", std::process::id()))
    });
    if dir.exists() {
        bail!("{} exists; pass another --dir", dir.display());
    }
    let data = dir.join("mnist");
    write_mnist(&data, 160, 64)?;
    let cfg = dir.join("soak.toml");
    fs::write(&cfg, config())?;
    let train = |out: &Path, resume: bool, failpoint: Option<&str>| {
        let mut c = Command::new(&noprop);
        c.arg("train")
            .args(["--threads", "1"])
            .arg("--data")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if resume {
            c.arg("--resume").arg(out);
        } else {
            c.arg("--config").arg(&cfg).arg("--out").arg(out);
        }
        if let Some(p) = failpoint {
            c.env("NOPROP_FAILPOINT", p);
        }
        c
    };

    let reference = dir.join("reference");
    let t0 = Instant::now();
    if !train(&reference, false, None).status()?.success() {
        bail!("the uninterrupted run failed");
    }
    let run_time = t0.elapsed();
    let reference =
        tensor_bytes(&reference.join(format!("checkpoints/epoch-{EPOCHS:04}/model.safetensors")))?;
    eprintln!(
        "soak: uninterrupted run {:.1} s; killing until {kills} kills",
        run_time.as_secs_f64()
    );

    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (mut done, mut runs, mut failpoint_kills) = (0usize, 0usize, 0usize);
    let mut failures = vec![];
    while done < kills {
        runs += 1;
        let run = dir.join(format!("run-{runs:03}"));
        let mut started = false;
        loop {
            // One kill in four in a commit window, the rest at a random moment of the run.
            let point = match rng.below(8) {
                0 => Some("after-commit"),
                1 => Some("after-events"),
                _ => None,
            };
            let mut child = train(&run, started, point).spawn()?;
            let status = if point.is_some() {
                child.wait()?
            } else {
                let deadline = Instant::now()
                    + Duration::from_millis(rng.below(run_time.as_millis() as u64 + 1));
                loop {
                    if let Some(s) = child.try_wait()? {
                        break s;
                    }
                    if Instant::now() >= deadline {
                        child.kill()?;
                        break child.wait()?;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            };
            // The folder counts as started once its creation committed (config.json).
            started = run.join("config.json").is_file();
            if status.success() {
                break;
            }
            done += 1;
            failpoint_kills += usize::from(status.code() == Some(86));
            if done >= kills {
                // Enough kills: let this run finish undisturbed.
                if !train(&run, started, None).status()?.success() {
                    failures.push(format!(
                        "{}: does not finish after its last kill",
                        run.display()
                    ));
                }
                break;
            }
        }
        for p in check(&run, &reference)? {
            failures.push(format!("{}: {p}", run.display()));
        }
    }
    eprintln!(
        "soak: {done} kills ({failpoint_kills} in commit windows) over {runs} runs, {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        bail!(
            "{} problems (folder kept: {}):\n{}",
            failures.len(),
            dir.display(),
            failures.join("\n")
        );
    }
    if opts.dir.is_none() {
        fs::remove_dir_all(&dir)?;
    }
    println!("soak: every run resumable, every epoch's events exactly once, final weights identical ({done} kills, {runs} runs)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_bytes_skip_the_header() {
        let dir = std::env::temp_dir().join(format!("xtask-soak-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.safetensors");
        let header = br#"{"__metadata__":{"epoch":"1"}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.extend([1, 2, 3, 4]);
        fs::write(&p, bytes).unwrap();
        assert_eq!(tensor_bytes(&p).unwrap(), vec![1, 2, 3, 4]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rng_is_reproducible() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        assert_eq!(
            (0..5).map(|_| a.below(100)).collect::<Vec<_>>(),
            (0..5).map(|_| b.below(100)).collect::<Vec<_>>()
        );
    }
}

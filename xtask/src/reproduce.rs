//! `cargo xtask reproduce`: trains every configuration of the paper's
//! Table 1 (and the ablations of Figures 4 and 5) with `noprop train`, one
//! run folder per row and seed, and writes the tables and figures from the
//! run folders' metrics.
//!
//! Layout of the results folder (`results/` by default):
//!
//! ```text
//! reproduce.json                 the mode (full or quick), so the two never mix
//! configs/<row>-seed<S>.toml     each run's effective config (a config file, edited)
//! runs/<row>-seed<S>/            the run folders of `noprop train`
//! log.jsonl                      one line per `noprop train` call: row, seed, exit, wall seconds, build
//! table1.md, table1.csv          test/train accuracy, mean ± s.e., beside the paper's Table 1
//! table2.md, table2.csv          peak training memory beside the paper's Table 2
//! fig2-<row>.png                 prototype embeddings, initial above learned
//! fig3-<dataset>.svg/.csv        test accuracy against cumulative training time (CT, FM, adjoint)
//! fig4.svg/.csv, fig5.svg/.csv   the ablations (class probabilities; embedding initialisation)
//! ```
//!
//! A run is finished when its last `epoch` event reaches the configured
//! epochs; finished runs are skipped and interrupted ones continued with
//! `noprop train --resume`, so the command can be stopped and started again.
//! The tables are written from every run folder of the mode, so rows
//! trained by separate `--only` calls end up in one table.

pub mod curve;
mod estimate;
mod rows;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use noprop_report::{figures, runs, table};
use rows::{Dataset, Quick, Row, Variant};
use runs::State;
use table::{fmt_duration, RowResult};

/// The options of `cargo xtask reproduce`: train every Table 1 row (method
/// x embedding x data set) and the ablations of Figures 4-5 with `noprop
/// train`, 3 seeds each, then write tables 1-2 and figures 2-5 into the
/// results folder. Finished runs are skipped, interrupted ones resumed.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct Options {
    /// MNIST only, one seed, a data subset and a few epochs (a CPU smoke run
    /// of about half an hour on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Rows to run (repeatable, or comma-separated): a glob over row names
    /// (`mnist-*-onehot`), an exact name (`mnist-dt-onehot`), or whole
    /// dash-separated words (`mnist`, `dt-onehot`, `radial`, `init`).
    #[arg(long, value_name = "PATTERN")]
    only: Vec<String>,
    /// The device; builds noprop with that feature.
    #[arg(long, value_name = "D", default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    device: String,
    /// Results folder (default: results/ in the workspace).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Data root holding mnist/, cifar10/, cifar100/ (or one data set's own
    /// folder); default $NOPROP_DATA, else ./data.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Seeds 0..N-1 (default 3, quick 1).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    seeds: Option<usize>,
    /// Worker threads for each `noprop train` (with --workers: per worker).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    threads: Option<usize>,
    /// Runs of `noprop train` at once on this machine (each child's output
    /// then goes to logs/<run>.log).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least_one)]
    jobs: usize,
    /// Write a SLURM job array (slurm/array.sbatch, one task per run, each
    /// safe to run again: it resumes) instead of training here.
    #[arg(long)]
    slurm: bool,
    /// With --slurm: submit the array with sbatch.
    #[arg(long, requires = "slurm")]
    submit: bool,
    /// Train the blocks of each NoProp-DT one-hot run on K workers at once
    /// (`noprop train --workers K`; the same result as one worker). Rows
    /// that cannot be split (a learned embedding, other methods) train on
    /// one; K above a run's number of blocks uses one worker per block.
    #[arg(long, value_name = "K", value_parser = at_least_one)]
    workers: Option<usize>,
    /// Print the runs, their state and an estimate of each one's time on the
    /// device (a short `noprop bench` of each model here); run nothing.
    #[arg(long)]
    plan: bool,
    /// Only rewrite the tables and figures from the runs there are.
    #[arg(long = "report")]
    report_only: bool,
    /// Use the noprop binary as it is (no cargo build).
    #[arg(long = "no-build", action = clap::ArgAction::SetFalse)]
    build: bool,
    /// On the CPU, build noprop with its `avx512` feature (into
    /// <target>/avx512): AVX-512 GEMM kernels where the CPU has them
    /// (1.2-1.7x faster training on an Intel Xeon), results not
    /// bit-identical to the default build's; each run's meta.json names its
    /// kernels (cpu_gemm).
    #[arg(long)]
    avx512: bool,
}

/// A count of at least 1.
fn at_least_one(v: &str) -> Result<usize, String> {
    v.parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("expected a number >= 1, got {v:?}"))
}

impl Options {
    /// Which build of `noprop` the runs use: the device's, or `avx512`.
    fn build_kind(&self) -> &str {
        if self.avx512 {
            "avx512"
        } else {
            &self.device
        }
    }

    /// The rules across options.
    fn check(&self) -> Result<()> {
        if self.avx512 && self.device != "cpu" {
            bail!("--avx512 is for --device cpu (a GPU build does not train with the CPU's GEMM kernels)");
        }
        if self.avx512 && !crate::cpu_has_avx512() {
            eprintln!("[--] this CPU has no AVX-512F: an --avx512 build runs the same FMA kernels as the default one");
        }
        Ok(())
    }
}

/// The data folder of a data set: `--data DIR` itself if it holds the data
/// set's files, else `DIR/<dataset>`; without `--data`,
/// `$NOPROP_DATA/<dataset>`, else `./data/<dataset>`.
fn data_dir(ds: Dataset, flag: Option<&Path>) -> PathBuf {
    if let Some(d) = flag {
        return if data_present(ds, d) {
            d.to_path_buf()
        } else {
            d.join(ds.name())
        };
    }
    match std::env::var_os("NOPROP_DATA") {
        Some(root) if !root.is_empty() => PathBuf::from(root).join(ds.name()),
        _ => Path::new("data").join(ds.name()),
    }
}

/// Whether `dir` holds a data set in one of the layouts noprop-data reads,
/// or is a CIFAR data set's archive file itself.
fn data_present(ds: Dataset, dir: &Path) -> bool {
    let archive = match ds {
        Dataset::Mnist => false,
        Dataset::Cifar10 | Dataset::Cifar100 => dir.is_file(),
    };
    archive || ds.is_present(dir)
}

/// One (row, seed) to train.
struct Job {
    row: Row,
    seed: u64,
    config: toml::Table,
    config_path: PathBuf,
    run_dir: PathBuf,
}

impl Job {
    fn label(&self) -> String {
        format!("{} seed {}", self.row.name(), self.seed)
    }
}

/// Where a run folder stands against the config the reproduction would use.
enum JobState {
    Ready(State),
    /// The folder was made with another config.
    Stale(Vec<String>),
}

fn job_state(job: &Job) -> Result<JobState> {
    let cfg = job.run_dir.join("config.json");
    if !cfg.is_file() {
        return Ok(JobState::Ready(State::New));
    }
    let run_cfg: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&cfg).with_context(|| format!("cannot read {}", cfg.display()))?,
    )
    .with_context(|| format!("{} is not JSON", cfg.display()))?;
    let diff = runs::config_differences(&job.config, &run_cfg);
    if !diff.is_empty() {
        return Ok(JobState::Stale(diff));
    }
    let metrics = fs::read_to_string(job.run_dir.join("metrics.jsonl")).unwrap_or_default();
    Ok(JobState::Ready(runs::state(
        &metrics,
        rows::config_epochs(&job.config)?,
    )))
}

fn read_summary(run_dir: &Path) -> runs::Summary {
    runs::summarise(&fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default())
}

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                root.join(d)
            }
        }
        _ => root.join("target"),
    }
}

fn build(root: &Path, device: &str) -> Result<()> {
    // Without a system CUDA (no nvcc on PATH), from NVIDIA's pip wheels.
    if device == "cuda" && Command::new("nvcc").arg("--version").output().is_err() {
        eprintln!("building noprop: no nvcc on PATH, so with cargo xtask cuda-build");
        return crate::cuda::build(&crate::cuda::BuildOptions::release("90"), root);
    }
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args(["build", "--release", "-p", "noprop-cli"]);
    if device != "cpu" {
        cmd.args(["--features", device]);
        cmd.env("CARGO_TARGET_DIR", device_target_dir(root, device));
    }
    eprintln!("building noprop: {cmd:?}");
    if !cmd.status().context("cannot run cargo")?.success() {
        bail!("cargo build of noprop-cli failed");
    }
    Ok(())
}

/// Where the `noprop` of `device` (a build kind: `cpu`, `cuda`, `metal`,
/// or `avx512`, the CPU build with that feature) is built: `CARGO_TARGET_DIR`
/// if set, else `target` for the CPU and `target/<kind>` for a feature (its
/// own folder, as `cargo xtask cuda-build` uses, so switching rebuilds
/// nothing); `avx512` always gets its own folder inside the target folder,
/// so that the two CPU builds never overwrite each other's binary.
fn device_target_dir(root: &Path, device: &str) -> PathBuf {
    match device {
        "cpu" => target_dir(root),
        "avx512" => avx512_target_dir(root),
        "cuda" => crate::cuda::build_target(root),
        d => match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) if !t.is_empty() => target_dir(root),
            _ => root.join("target").join(d),
        },
    }
}

/// Where the CPU build with the `avx512` feature goes: `<target>/avx512`.
pub(crate) fn avx512_target_dir(root: &Path) -> PathBuf {
    target_dir(root).join("avx512")
}

/// The `noprop` binary a reproduction on `device` runs.
fn noprop_binary(root: &Path, device: &str) -> PathBuf {
    device_target_dir(root, device)
        .join("release")
        .join("noprop")
}

/// The text of a generated config file: a header saying where it came from,
/// then the edited table.
fn config_text(job: &Job, base: &Path, quick: bool) -> Result<String> {
    let mut s = format!(
        "# Generated by `cargo xtask reproduce{}` from {}, seed {}; edits to this file are overwritten.\n",
        if quick { " --quick" } else { "" },
        base.display(),
        job.seed
    );
    match job.row.variant {
        Variant::Table1 => {}
        Variant::Radial => s.push_str(&format!(
            "# Figure 4 ablation: radial class probabilities, sigma = {}.\n",
            rows::RADIAL_SIGMA
        )),
        Variant::Init(i) => s.push_str(&format!(
            "# Figure 5 ablation: learned embedding, d = C*H*W, {} initialisation.\n",
            i.name()
        )),
    }
    if quick {
        s.push_str(&format!(
            "# Quick settings: {}.\n",
            Quick::for_row(&job.row).describe()
        ));
    }
    s.push('\n');
    s.push_str(&toml::to_string(&job.config).context("cannot write TOML")?);
    Ok(s)
}

/// Appends one line to `log.jsonl`.
fn log(out: &Path, v: serde_json::Value) {
    let line = format!("{v}\n");
    let _ = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("log.jsonl"))
        .and_then(|mut f| f.write_all(line.as_bytes()));
}

pub fn run(opts: &Options, root: &Path) -> Result<()> {
    opts.check()?;
    let started = Instant::now();
    let all = rows::all_rows(opts.quick);
    let selected = rows::select(&all, &opts.only)?;
    let seeds = opts.seeds.unwrap_or(if opts.quick { 1 } else { 3 });
    let out = opts.out.clone().unwrap_or_else(|| root.join("results"));
    fs::create_dir_all(out.join("configs"))
        .with_context(|| format!("cannot create {}", out.display()))?;

    // A quick and a full reproduction never share a folder.
    let manifest = out.join("reproduce.json");
    let mode = if opts.quick { "quick" } else { "full" };
    if let Ok(text) = fs::read_to_string(&manifest) {
        let old: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", manifest.display()))?;
        if old["mode"].as_str().is_some_and(|m| m != mode) {
            bail!(
                "{} holds a {} reproduction; pass --out DIR for a {mode} one",
                out.display(),
                old["mode"].as_str().unwrap_or("?")
            );
        }
    }
    fs::write(
        &manifest,
        format!(
            "{}\n",
            json!({"mode": mode, "seeds": seeds, "device": opts.device})
        ),
    )
    .with_context(|| format!("cannot write {}", manifest.display()))?;

    // Each row's config, edited per seed; rows without a config file are skipped.
    let mut notes: Vec<(Row, String)> = vec![];
    let mut jobs: Vec<Job> = vec![];
    // Runs of rows not selected now: read for the report only.
    let mut other_jobs: Vec<Job> = vec![];
    for row in &all {
        let base = root
            .join("configs")
            .join(format!("{}.toml", row.base_config()));
        let text = match fs::read_to_string(&base) {
            Ok(t) => t,
            Err(_) => {
                notes.push((
                    *row,
                    format!(
                        "configs/{}.toml does not exist yet; skipped",
                        row.base_config()
                    ),
                ));
                continue;
            }
        };
        let table: toml::Table = match toml::from_str(&text) {
            Ok(t) => t,
            Err(e) => {
                notes.push((
                    *row,
                    format!(
                        "configs/{}.toml is not valid TOML ({}); skipped",
                        row.base_config(),
                        e.message()
                    ),
                ));
                continue;
            }
        };
        for seed in 0..seeds as u64 {
            let config = rows::effective_config(&table, row, seed, opts.quick, &opts.device)?;
            let name = format!("{}-seed{seed}", row.name());
            let job = Job {
                row: *row,
                seed,
                config,
                config_path: out.join("configs").join(format!("{name}.toml")),
                run_dir: out.join("runs").join(&name),
            };
            if selected.contains(row) {
                let shown = base.strip_prefix(root).unwrap_or(&base);
                fs::write(&job.config_path, config_text(&job, shown, opts.quick)?)
                    .with_context(|| format!("cannot write {}", job.config_path.display()))?;
                jobs.push(job);
            } else {
                other_jobs.push(job);
            }
        }
    }
    for (row, note) in &notes {
        if selected.contains(row) {
            eprintln!("[--] {}: {note}", row.name());
        }
    }

    let noprop = noprop_binary(root, opts.build_kind());
    let mut failed: Vec<String> = vec![];
    let (mut trained, mut skipped) = (0, 0);
    if !opts.report_only {
        // Fail early, in one line, if a data set that a selected run needs is missing.
        let mut checked: Vec<Dataset> = vec![];
        for job in &jobs {
            let ds = job.row.dataset;
            if checked.contains(&ds) {
                continue;
            }
            checked.push(ds);
            let dir = data_dir(ds, opts.data.as_deref());
            if !data_present(ds, &dir) {
                bail!(
                    "{} data not found in {} (needed by {}); pass --data DIR, set NOPROP_DATA, or leave those rows out with --only",
                    ds.title(),
                    dir.display(),
                    jobs.iter().find(|j| j.row.dataset == ds).map(|j| j.row.name()).unwrap_or_default()
                );
            }
        }
        if opts.plan {
            let noprop = plan_binary(root, &opts);
            print_plan(&jobs, noprop.as_deref(), &opts)?;
            return Ok(());
        }
        if opts.build {
            build(root, opts.build_kind())?;
        }
        if !jobs.is_empty() && !noprop.is_file() {
            bail!(
                "{} does not exist; build it (drop --no-build)",
                noprop.display()
            );
        }
        if opts.slurm {
            let script = write_slurm(root, &out, &jobs, &noprop, opts)?;
            if opts.submit {
                let status = Command::new("sbatch")
                    .arg(&script)
                    .status()
                    .context("cannot run sbatch (is this a SLURM login node?)")?;
                if !status.success() {
                    bail!("sbatch {} failed ({status})", script.display());
                }
            } else {
                eprintln!(
                    "reproduce: wrote {} ({} tasks); submit it with `sbatch {}` (or pass --submit), \
                     then gather the tables with `cargo xtask reproduce --report`",
                    script.display(),
                    jobs.len(),
                    script.display()
                );
            }
            return Ok(());
        }
        let n = jobs.len();
        // Up to --jobs children at once; with more than one, each child's
        // output goes to logs/<run>.log rather than the shared terminal.
        // Children still running when this returns early (an error) are ended.
        let mut running = Children(vec![]);
        let finish = |(i, child, t0, resumed): Running, failed: &mut Vec<String>| -> Result<bool> {
            let job = &jobs[i];
            let tag = format!("[{}/{n}] {}", i + 1, job.label());
            let status = wait_child(child)?;
            let wall = t0.elapsed().as_secs_f64();
            log(
                &out,
                json!({"row": job.row.name(), "seed": job.seed, "exit": status.code(), "wall_seconds": wall,
                             "resumed": resumed, "quick": opts.quick, "avx512": opts.avx512}),
            );
            if status.success() {
                let s = read_summary(&job.run_dir);
                let acc = s.final_eval().map_or("no final evaluation".into(), |e| {
                    format!("test {:.2}%", e.test_acc)
                });
                eprintln!(
                    "{tag}: done, {} epochs, {acc}, {} wall",
                    s.epochs_done,
                    fmt_duration(wall)
                );
                return Ok(true);
            }
            eprintln!(
                "{tag}: noprop train failed ({status}) after {}",
                fmt_duration(wall)
            );
            failed.push(format!("{}: noprop train failed ({status})", job.label()));
            Ok(false)
        };
        for (i, job) in jobs.iter().enumerate() {
            let tag = format!("[{}/{n}] {}", i + 1, job.label());
            let state = match job_state(job)? {
                JobState::Stale(diff) => {
                    let msg = format!(
                        "{} was made with another config ({}); remove it or pass another --out",
                        job.run_dir.display(),
                        diff.join("; ")
                    );
                    eprintln!("{tag}: {msg}");
                    failed.push(format!("{}: {msg}", job.label()));
                    continue;
                }
                JobState::Ready(s) => s,
            };
            let epochs = rows::config_epochs(&job.config)?;
            let resume = match state {
                State::Finished { epochs_done } => {
                    eprintln!("{tag}: finished ({epochs_done} epochs), skipped");
                    skipped += 1;
                    continue;
                }
                State::Partial { epochs_done } => {
                    eprintln!("{tag}: resuming after epoch {epochs_done} of {epochs}");
                    true
                }
                State::New => {
                    eprintln!("{tag}: {epochs} epochs");
                    // A folder without config.json holds nothing of value (a
                    // run killed while creating it); noprop wants it empty.
                    if job.run_dir.is_dir() {
                        let _ = fs::remove_dir(job.run_dir.join("checkpoints"));
                        let _ = fs::remove_dir(&job.run_dir);
                    }
                    false
                }
            };
            while running.0.len() >= opts.jobs {
                let done = wait_any(&mut running.0)?;
                trained += usize::from(finish(done, &mut failed)?);
            }
            let mut cmd = Command::new(&noprop);
            cmd.args(train_args(job, resume, opts)?);
            if opts.jobs > 1 {
                let logs = out.join("logs");
                fs::create_dir_all(&logs)
                    .with_context(|| format!("cannot create {}", logs.display()))?;
                let path = logs.join(format!("{}-seed{}.log", job.row.name(), job.seed));
                let file = fs::File::create(&path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                cmd.stdout(file.try_clone()?).stderr(file);
            }
            // Alone, the child draws its own progress on the inherited stderr.
            let child = cmd
                .spawn()
                .with_context(|| format!("cannot run {}", noprop.display()))?;
            running.0.push((i, child, Instant::now(), resume));
        }
        while !running.0.is_empty() {
            let done = wait_any(&mut running.0)?;
            trained += usize::from(finish(done, &mut failed)?);
        }
    }

    // Tables and figures from every run folder of this mode.
    other_jobs.extend(jobs);
    report(root, &out, &opts, seeds, &all, &notes, &other_jobs, &noprop)?;
    eprintln!(
        "reproduce: {trained} trained, {skipped} already finished, {} failed, in {}; results in {}",
        failed.len(),
        fmt_duration(started.elapsed().as_secs_f64()),
        out.display()
    );
    if !failed.is_empty() {
        bail!("{} run(s) failed:\n  {}", failed.len(), failed.join("\n  "));
    }
    Ok(())
}

/// The arguments of `noprop train` for `job`: a new run from its config
/// file, or (`resume`) the run folder continued to the configured epochs.
fn train_args(job: &Job, resume: bool, opts: &Options) -> Result<Vec<std::ffi::OsString>> {
    let mut a: Vec<std::ffi::OsString> = vec!["train".into()];
    if resume {
        a.extend(["--resume".into(), job.run_dir.clone().into()]);
        a.extend([
            "--epochs".into(),
            rows::config_epochs(&job.config)?.to_string().into(),
        ]);
    } else {
        a.extend(["--config".into(), job.config_path.clone().into()]);
        a.extend(["--out".into(), job.run_dir.clone().into()]);
    }
    a.extend(["--device".into(), opts.device.clone().into()]);
    a.extend([
        "--data".into(),
        data_dir(job.row.dataset, opts.data.as_deref()).into(),
    ]);
    if let Some(t) = opts.threads {
        a.extend(["--threads".into(), t.to_string().into()]);
    }
    if let Some(k) = opts
        .workers
        .and_then(|k| rows::split_workers(&job.config, k))
    {
        a.extend(["--workers".into(), k.to_string().into()]);
    }
    Ok(a)
}

/// A running `noprop train`: its job's index, the child, its start, and
/// whether it resumes a run.
type Running = (usize, std::process::Child, Instant, bool);

/// The running children, ended (killed and waited for) when dropped.
struct Children(Vec<Running>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child, _, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for one of the running children and takes it out.
fn wait_any(running: &mut Vec<Running>) -> Result<Running> {
    loop {
        for k in 0..running.len() {
            if running[k]
                .1
                .try_wait()
                .context("cannot wait for noprop train")?
                .is_some()
            {
                return Ok(running.swap_remove(k));
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn wait_child(mut child: std::process::Child) -> Result<std::process::ExitStatus> {
    child.wait().context("cannot wait for noprop train")
}

/// `'text'` for a POSIX shell.
fn shell_quote(text: &std::ffi::OsStr) -> String {
    format!("'{}'", text.to_string_lossy().replace('\'', "'\\''"))
}

/// The shell line of one SLURM array task: continues the run when its
/// folder has a config, else starts it, so a task can be run again (after
/// a time limit or a node failure) and a finished run trains nothing more.
fn slurm_task(job: &Job, noprop: &Path, opts: &Options) -> Result<String> {
    let cmd = |resume: bool| -> Result<String> {
        let mut words = vec![shell_quote(noprop.as_os_str())];
        words.extend(
            train_args(job, resume, opts)?
                .iter()
                .map(|a| shell_quote(a)),
        );
        Ok(words.join(" "))
    };
    Ok(format!(
        "if [ -f {}/config.json ]; then {}; else {}; fi",
        shell_quote(job.run_dir.as_os_str()),
        cmd(true)?,
        cmd(false)?
    ))
}

/// Writes `slurm/tasks.sh` (one line per run) and `slurm/array.sbatch`, a
/// job array with one task per run; returns the batch script's path.
fn write_slurm(
    root: &Path,
    out: &Path,
    jobs: &[Job],
    noprop: &Path,
    opts: &Options,
) -> Result<PathBuf> {
    let dir = out.join("slurm");
    // sbatch reads `#SBATCH` lines without a shell, and `%` starts its patterns.
    let plain = dir.to_string_lossy();
    if plain.contains(|c: char| c.is_whitespace() || "\"'%\\".contains(c)) {
        bail!(
            "--slurm needs a results folder whose path has no spaces, quotes or %: {}",
            dir.display()
        );
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tasks = String::new();
    for job in jobs {
        tasks.push_str(&slurm_task(job, noprop, opts)?);
        tasks.push('\n');
    }
    let tasks_path = dir.join("tasks.sh");
    fs::write(&tasks_path, &tasks)
        .with_context(|| format!("cannot write {}", tasks_path.display()))?;
    let workers = jobs
        .iter()
        .filter_map(|j| opts.workers.and_then(|k| rows::split_workers(&j.config, k)))
        .max()
        .unwrap_or(1);
    let cpus = opts.threads.unwrap_or(4) * workers;
    let gpu = if opts.device == "cuda" {
        "#SBATCH --gpus-per-task=1\n"
    } else {
        ""
    };
    let script = format!(
        "#!/bin/bash\n\
         # Written by `cargo xtask reproduce --slurm`: one array task per run.\n\
         # A task can be submitted again; it continues its run (--resume).\n\
         #SBATCH --job-name=noprop-reproduce\n\
         #SBATCH --array=0-{last}\n\
         #SBATCH --ntasks=1\n\
         #SBATCH --cpus-per-task={cpus}\n\
         {gpu}\
         #SBATCH --output={plain}/task-%a.log\n\
         set -euo pipefail\n\
         cd {root}\n\
         line=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {tasks})\n\
         exec bash -c \"$line\"\n",
        last = jobs.len().saturating_sub(1),
        root = shell_quote(root.as_os_str()),
        tasks = shell_quote(tasks_path.as_os_str()),
    );
    let path = dir.join("array.sbatch");
    fs::write(&path, script).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The binary `--plan` benchmarks with, or `None` (said in one line) when
/// there is none to use: built first as a run would build it, or with
/// `--no-build` the one there is (for cuda, `cargo xtask cuda-build`'s
/// `target/cuda/release/noprop` where it exists).
fn plan_binary(root: &Path, opts: &Options) -> Option<PathBuf> {
    let noprop = noprop_binary(root, opts.build_kind());
    if opts.build {
        if let Err(e) = build(root, opts.build_kind()) {
            eprintln!("[--] no time estimates: {e:#}");
            return None;
        }
    }
    if noprop.is_file() {
        return Some(noprop);
    }
    let how = match opts.build_kind() {
        "cpu" => "`cargo build --release -p noprop-cli`".to_string(),
        "cuda" => "`cargo xtask cuda-build`".to_string(),
        "avx512" => format!(
            "`CARGO_TARGET_DIR={} cargo build --release -p noprop-cli --features avx512`",
            avx512_target_dir(root).display()
        ),
        d => format!("`cargo xtask reproduce --device {d}` without --no-build"),
    };
    eprintln!(
        "[--] no time estimates: {} does not exist; build it with {how} or drop --no-build",
        noprop.display()
    );
    None
}

/// Prints each job with its state and, where `noprop` is given, the time
/// it has left; ends with the total (and one per data set when there are several).
fn print_plan(jobs: &[Job], noprop: Option<&Path>, opts: &Options) -> Result<()> {
    struct Line {
        text: String,
        /// The time left, or why there is no figure; `None` when nothing is left.
        cost: Option<std::result::Result<estimate::Estimate, String>>,
    }
    // One benchmark per model, shared by the jobs whose costs match.
    let mut benches: Vec<(String, std::result::Result<estimate::Bench, String>)> = vec![];
    let mut lines: Vec<Line> = vec![];
    let n = jobs.len();
    for (i, job) in jobs.iter().enumerate() {
        let epochs = rows::config_epochs(&job.config)?;
        let (state, done) = match job_state(job)? {
            JobState::Stale(d) => (format!("made with another config: {}", d.join("; ")), None),
            JobState::Ready(State::New) => ("new".into(), Some(0)),
            JobState::Ready(State::Partial { epochs_done }) => (
                format!("resume after epoch {epochs_done}"),
                Some(epochs_done),
            ),
            JobState::Ready(State::Finished { .. }) => ("finished".into(), None),
        };
        let text = format!(
            "[{}/{n}] {} ({epochs} epochs, {}): {state}",
            i + 1,
            job.label(),
            job.config_path.display()
        );
        let cost = match (done, noprop) {
            (Some(done), Some(noprop)) => Some(job_cost(job, done, noprop, opts, &mut benches)),
            _ => None,
        };
        lines.push(Line { text, cost });
    }

    let mut per_dataset: Vec<(Dataset, estimate::Estimate, usize)> = vec![];
    let mut missing = 0;
    for (line, job) in lines.iter().zip(jobs) {
        match &line.cost {
            None => println!("{}", line.text),
            Some(Ok(e)) => {
                println!("{}, ~{}", line.text, fmt_duration(e.total()));
                match per_dataset.iter_mut().find(|(d, ..)| *d == job.row.dataset) {
                    Some((_, sum, k)) => {
                        *sum += *e;
                        *k += 1;
                    }
                    None => per_dataset.push((job.row.dataset, *e, 1)),
                }
            }
            Some(Err(why)) => {
                println!("{}, no estimate: {why}", line.text);
                missing += 1;
            }
        }
    }
    if noprop.is_none() {
        return Ok(());
    }
    let threads = benches
        .iter()
        .find_map(|(_, b)| b.as_ref().ok().and_then(|b| b.threads));
    let device = match (opts.device.as_str(), threads) {
        ("cpu", Some(t)) => format!("cpu, {t} threads"),
        (d, _) => d.to_string(),
    };
    let mut total = estimate::Estimate::default();
    let mut counted = 0;
    for (ds, e, k) in &per_dataset {
        if per_dataset.len() > 1 {
            println!(
                "{}: ~{} on {device} for {k} run(s) (training {}, evaluation {})",
                ds.title(),
                fmt_duration(e.total()),
                fmt_duration(e.train),
                fmt_duration(e.eval)
            );
        }
        total += *e;
        counted += k;
    }
    if counted == 0 {
        println!(
            "total: {}",
            if missing == 0 {
                "nothing left to train".to_string()
            } else {
                format!("no estimate for any of the {missing} run(s) still to train")
            }
        );
        return Ok(());
    }
    let days = total.total() / 86_400.0;
    println!(
        "total: ~{}{} on {device} for {counted} run(s) still to train (training {}, evaluation {}){}",
        fmt_duration(total.total()),
        if days >= 2.0 {
            format!(" ({days:.1} days)")
        } else {
            String::new()
        },
        fmt_duration(total.train),
        fmt_duration(total.eval),
        if missing == 0 {
            String::new()
        } else {
            format!(", and {missing} run(s) without an estimate")
        }
    );
    println!(
        "(from a {}-step `noprop bench` of each model on this machine as loaded now; \
         data loading and checkpoint writes are not counted)",
        estimate::BENCH_STEPS
    );
    Ok(())
}

/// The time a job has left after `done` epochs, benchmarking its model
/// unless a job with the same costs already did; the error is one line.
fn job_cost(
    job: &Job,
    done: usize,
    noprop: &Path,
    opts: &Options,
    benches: &mut Vec<(String, std::result::Result<estimate::Bench, String>)>,
) -> std::result::Result<estimate::Estimate, String> {
    let unreadable = |e: anyhow::Error| format!("{}: {e:#}", job.config_path.display());
    let args = estimate::bench_args(&job.config, &opts.device, opts.threads).map_err(unreadable)?;
    let key = estimate::cost_key(&job.config, &args);
    let bench = match benches.iter().find(|(k, _)| *k == key) {
        Some((_, b)) => b.clone(),
        None => {
            eprintln!("[--] {}: noprop bench {}", job.row.name(), args.join(" "));
            let b = estimate::run_bench(noprop, &job.config_path, &args);
            benches.push((key, b.clone()));
            b
        }
    }?;
    estimate::estimate(&job.config, &bench, done).map_err(unreadable)
}

#[allow(clippy::too_many_arguments)]
fn report(
    root: &Path,
    out: &Path,
    opts: &Options,
    seeds: usize,
    all: &[Row],
    notes: &[(Row, String)],
    jobs: &[Job],
    noprop: &Path,
) -> Result<()> {
    let mut results: Vec<RowResult> = vec![];
    for row in all {
        let mut r = RowResult {
            row: *row,
            seeds_wanted: seeds,
            finished: vec![],
            unfinished: vec![],
            note: notes.iter().find(|(n, _)| n == row).map(|(_, s)| s.clone()),
            settings: opts.quick.then(|| Quick::for_row(row).describe()),
        };
        let mut stale = 0;
        for job in jobs.iter().filter(|j| j.row == *row) {
            match job_state(job)? {
                JobState::Ready(State::Finished { .. }) => {
                    r.finished.push((job.seed, read_summary(&job.run_dir)))
                }
                JobState::Ready(State::Partial { .. }) => {
                    r.unfinished.push(read_summary(&job.run_dir))
                }
                JobState::Stale(_) => stale += 1,
                JobState::Ready(State::New) => {}
            }
        }
        // A row whose unfinished runs have evaluations shows those (marked),
        // so it is not listed among the rows without results.
        let shows_unfinished = r.shown().seeds > 0;
        if stale > 0 {
            r.note = Some(format!(
                "{stale} run folder(s) made with another config, left out (see `--plan`)"
            ));
        } else if r.finished.is_empty() && r.note.is_none() && !shows_unfinished {
            r.note = Some(if !r.unfinished.is_empty() {
                "not finished yet".into()
            } else {
                "not run yet".into()
            });
        }
        results.push(r);
    }
    let ctx = table::Context {
        quick: opts.quick,
        device: opts.device.clone(),
        seeds,
    };
    let mut outputs = vec![
        noprop_report::Output {
            name: "table1.md".into(),
            contents: table::table1_markdown(&ctx, &results),
        },
        noprop_report::Output {
            name: "table1.csv".into(),
            contents: table::table1_csv(&results),
        },
        noprop_report::Output {
            name: "table2.md".into(),
            contents: table::table2_markdown(&ctx, &results),
        },
        noprop_report::Output {
            name: "table2.csv".into(),
            contents: table::table2_csv(&results),
        },
    ];
    outputs.extend(figures::figure3(&results));
    outputs.extend(figures::figure4(all, &results));
    outputs.extend(figures::figure5(all, &results));
    for o in &outputs {
        let path = out.join(&o.name);
        fs::write(&path, &o.contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut written: Vec<String> = outputs.iter().map(|o| o.name.clone()).collect();

    // Figure 2: every prototype row's first finished seed, drawn by noprop.
    for r in results
        .iter()
        .filter(|r| r.row.variant == Variant::Table1 && r.row.image_sized())
    {
        let Some((seed, _)) = r.finished.first() else {
            continue;
        };
        let run_dir = out
            .join("runs")
            .join(format!("{}-seed{seed}", r.row.name()));
        let name = format!("fig2-{}.png", r.row.name());
        if !noprop.is_file() {
            eprintln!("{name}: no noprop binary at {}", noprop.display());
            continue;
        }
        let res = Command::new(noprop)
            .current_dir(root)
            .args(["inspect", "embeddings"])
            .arg(&run_dir)
            .arg("--png")
            .arg(out.join(&name))
            .output();
        match res {
            Ok(o) if o.status.success() => written.push(name),
            Ok(o) => eprintln!("{name}: {}", String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => eprintln!("{name}: cannot run noprop: {e}"),
        }
    }
    eprintln!("wrote {}", written.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options of `cargo xtask reproduce ARGS`, checked.
    fn parse(args: &str) -> Result<Options> {
        let args: Vec<&str> = args.split_whitespace().collect();
        let o: Options = crate::parse_args(&args)?;
        o.check()?;
        Ok(o)
    }

    #[test]
    fn a_slurm_task_starts_its_run_then_resumes_it() {
        let dir = std::env::temp_dir().join(format!("xtask-slurm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // A stand-in for noprop that records its arguments and, for a new
        // run, creates the run folder's config.json as noprop does.
        let noprop = dir.join("noprop it's");
        fs::write(
            &noprop,
            "#!/bin/bash\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n\
             while [ $# -gt 0 ]; do if [ \"$1\" = --out ]; then mkdir -p \"$2\" && echo '{}' > \"$2/config.json\"; fi; shift; done\n",
        )
        .unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&noprop)
            .status()
            .unwrap();
        let row = rows::all_rows(true)[1];
        let config: toml::Table = "[method]\nkind = \"dt\"\nblocks = 10\n[model]\nembedding = { kind = \"one-hot\" }\n[train]\nepochs = 3\n"
            .parse()
            .unwrap();
        let job = Job {
            row,
            seed: 0,
            config,
            config_path: dir.join("configs/a b.toml"),
            run_dir: dir.join("runs/a b"),
        };
        let opts = parse(&format!(
            "--slurm --workers 2 --threads 1 --data {}",
            dir.display()
        ))
        .unwrap();
        let script = write_slurm(
            &dir,
            &dir.join("out"),
            std::slice::from_ref(&job),
            &noprop,
            &opts,
        )
        .unwrap();
        let text = fs::read_to_string(&script).unwrap();
        assert!(
            text.contains("#SBATCH --array=0-0") && text.contains("--cpus-per-task=2"),
            "{text}"
        );
        // The task, run twice as SLURM would run it (array index 0).
        for _ in 0..2 {
            let ok = std::process::Command::new("bash")
                .arg(&script)
                .env("SLURM_ARRAY_TASK_ID", "0")
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let calls = fs::read_to_string(dir.join("calls")).unwrap();
        let calls: Vec<&str> = calls.lines().collect();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(
            calls[0].starts_with("train --config") && calls[0].contains("--workers 2"),
            "{}",
            calls[0]
        );
        assert!(
            calls[1].starts_with("train --resume") && calls[1].contains("--epochs 3"),
            "{}",
            calls[1]
        );
        assert!(calls[1].contains("runs/a b"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn options() {
        let o = parse("--quick --only mnist-dt-onehot --only mnist-fm-* --device cuda --out /tmp/r --seeds 2 --threads 2 --no-build").unwrap();
        assert!(o.quick && !o.build && !o.plan);
        assert_eq!(o.only, ["mnist-dt-onehot", "mnist-fm-*"]);
        assert_eq!(
            (o.device.as_str(), o.seeds, o.threads),
            ("cuda", Some(2), Some(2))
        );
        assert_eq!(o.out, Some(PathBuf::from("/tmp/r")));
        assert!(parse("--device tpu").is_err());
        assert!(parse("--seeds 0").is_err());
        assert!(parse("--only").is_err());
        assert!(parse("--frobnicate").is_err());
        let o = parse("--avx512").unwrap();
        assert_eq!((o.device.as_str(), o.build_kind()), ("cpu", "avx512"));
        assert_eq!(parse("--quick").unwrap().build_kind(), "cpu");
        let e = parse("--avx512 --device cuda").unwrap_err().to_string();
        assert!(e.contains("--avx512 is for --device cpu"), "{e}");
    }

    #[test]
    fn plan_without_a_binary_has_no_times() {
        // An absolute CARGO_TARGET_DIR points away from the empty root.
        if std::env::var_os("CARGO_TARGET_DIR").is_some() {
            return;
        }
        let root = std::env::temp_dir().join(format!("xtask-plan-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        for device in ["cpu", "cuda"] {
            let o = parse(&format!("--plan --no-build --device {device}")).unwrap();
            assert_eq!(plan_binary(&root, &o), None);
        }
        // With --no-build and --device cuda, `cargo xtask cuda-build`'s binary is used.
        let cuda = root.join("target/cuda/release");
        fs::create_dir_all(&cuda).unwrap();
        fs::write(cuda.join("noprop"), b"").unwrap();
        let o = parse("--plan --no-build --device cuda").unwrap();
        assert_eq!(plan_binary(&root, &o), Some(cuda.join("noprop")));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn data_layouts() {
        let dir = std::env::temp_dir().join(format!("xtask-reproduce-data-{}", std::process::id()));
        let mnist = dir.join("mnist");
        fs::create_dir_all(&mnist).unwrap();
        assert!(!data_present(Dataset::Mnist, &mnist));
        for (i, n) in [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ]
        .iter()
        .enumerate()
        {
            // Raw or gzipped names both count.
            let name = if i % 2 == 0 {
                format!("{n}.gz")
            } else {
                n.to_string()
            };
            fs::write(mnist.join(name), b"").unwrap();
        }
        assert!(data_present(Dataset::Mnist, &mnist));
        // A file named as --data is a CIFAR archive, never MNIST.
        let archive = dir.join("cifar-10-binary.tar.gz");
        fs::write(&archive, b"").unwrap();
        assert!(data_present(Dataset::Cifar10, &archive));
        assert!(!data_present(Dataset::Mnist, &archive));
        fs::remove_file(&archive).unwrap();
        // --data names the root, or the data set's own folder.
        assert_eq!(data_dir(Dataset::Mnist, Some(&dir)), mnist);
        assert_eq!(data_dir(Dataset::Mnist, Some(&mnist)), mnist);
        assert!(!data_present(Dataset::Cifar10, &dir.join("cifar10")));
        // A missing data set is looked for (and reported) under the root.
        assert_eq!(data_dir(Dataset::Cifar10, Some(&dir)), dir.join("cifar10"));
        fs::create_dir_all(dir.join("cifar100")).unwrap();
        fs::write(dir.join("cifar100/cifar-100-binary.tar.gz"), b"").unwrap();
        assert!(data_present(
            Dataset::Cifar100,
            &data_dir(Dataset::Cifar100, Some(&dir))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}

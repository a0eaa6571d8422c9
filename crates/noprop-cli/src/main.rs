//! `noprop`: train, evaluate and inspect NoProp models.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use noprop_core::OdeSolver;
use noprop_data::DatasetKind;
use noprop_models::Kernels;
use noprop_train::config::CtSampler;
use noprop_train::{
    build_trainer, fit, load_for_eval, Collective, Config, InferenceChange, RawConfig, RunData,
    RunDir, RunMeta, Silent, ThreadCollective,
};
use serde_json::json;

mod bench;
mod inspect;
mod progress;
mod selftest;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `noprop --version`: the version, the commit where known, the GEMM
/// kernels this build runs on this CPU, and the cargo features built in.
fn long_version() -> String {
    let features: Vec<&str> = [
        ("download", cfg!(feature = "download")),
        ("cuda", cfg!(feature = "cuda")),
        ("metal", cfg!(feature = "metal")),
        ("avx512", cfg!(feature = "avx512")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    format!(
        "{} (commit {}; CPU GEMM kernels: {}; features: {})",
        env!("CARGO_PKG_VERSION"),
        option_env!("NOPROP_GIT_SHA").unwrap_or("unknown"),
        noprop_kernels::gemm_isa(),
        if features.is_empty() {
            "none".to_string()
        } else {
            features.join(", ")
        }
    )
}

/// The default configuration, embedded so that `noprop train` works anywhere.
pub(crate) const DEFAULT_CONFIG: &str = include_str!("../../../configs/mnist-dt-onehot.toml");
const DEFAULT_CONFIG_NAME: &str = "mnist-dt-onehot";

#[derive(Parser)]
#[command(
    name = "noprop",
    version,
    about = "Train neural networks block by block with NoProp (Li, Teh, Pascanu 2025)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model; writes a run folder with config, metrics and checkpoints.
    Train(TrainArgs),
    /// Evaluate a run folder (its newest checkpoint) or a checkpoint file.
    Eval(EvalArgs),
    /// Time training steps and inference of the config's model (synthetic inputs; NoProp-DT also per op)
    Bench(BenchArgs),
    /// Run every op of training and inference on the device and on the CPU, and compare.
    Selftest(selftest::SelftestArgs),
    /// Look inside a run.
    Inspect {
        #[command(subcommand)]
        command: InspectCommand,
    },
    /// Fetch data sets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

/// Where tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum DeviceArg {
    /// The CPU, with this crate's fast kernels.
    Cpu,
    /// CUDA device 0 (a build with `--features cuda`).
    Cuda,
    /// Metal device 0 (a build with `--features metal`).
    Metal,
}

/// Which kernels run the image path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum KernelsArg {
    /// Hand-written CPU kernels (candle's ops on other devices).
    Fast,
    /// candle's ops everywhere.
    Stock,
}

impl From<KernelsArg> for Kernels {
    fn from(k: KernelsArg) -> Kernels {
        match k {
            KernelsArg::Fast => Kernels::Fast,
            KernelsArg::Stock => Kernels::Stock,
        }
    }
}

/// How a continuous-time model integrates at inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SamplerArg {
    /// NoProp-CT's eq. 3 update.
    Eq3,
    /// Euler steps of the ODE.
    Euler,
    /// Heun steps of the ODE.
    Heun,
}

impl From<SamplerArg> for CtSampler {
    fn from(s: SamplerArg) -> CtSampler {
        match s {
            SamplerArg::Eq3 => CtSampler::Eq3,
            SamplerArg::Euler => CtSampler::Flow(OdeSolver::Euler),
            SamplerArg::Heun => CtSampler::Flow(OdeSolver::Heun),
        }
    }
}

/// The way back, an exhaustive `match`: a solver added to `OdeSolver` does
/// not compile until `--sampler` offers it.
impl From<CtSampler> for SamplerArg {
    fn from(s: CtSampler) -> SamplerArg {
        match s {
            CtSampler::Eq3 => SamplerArg::Eq3,
            CtSampler::Flow(OdeSolver::Euler) => SamplerArg::Euler,
            CtSampler::Flow(OdeSolver::Heun) => SamplerArg::Heun,
        }
    }
}

#[derive(Args)]
pub(crate) struct Common {
    /// The device (cuda and metal need a build with that feature).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Worker threads for CPU kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Data folder (else the config's, else $NOPROP_DATA/<dataset>, else ./data/<dataset>).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// Config file (TOML or JSON); default: the embedded configs/mnist-dt-onehot.toml.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Continue the run in this folder from its newest checkpoint.
    #[arg(long, conflicts_with = "config")]
    resume: Option<PathBuf>,
    /// Override the number of epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override the seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Run folder to create (default: runs/<config>-<UTC time>).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Train on the first N training images only.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Override the number of stochastic inference runs per evaluation.
    #[arg(long)]
    eval_runs: Option<usize>,
    /// Override the kernels.
    #[arg(long, value_enum)]
    kernels: Option<KernelsArg>,
    /// Download the data set if it is missing.
    #[arg(long)]
    download: bool,
    /// With --resume: continue even if the run's config.json or its data
    /// differ from what its checkpoint was trained on (recorded in meta.json).
    #[arg(long, requires = "resume")]
    accept_changes: bool,
    /// Train NoProp-DT's blocks on K workers at once (threads of this
    /// process, each with --threads compute threads; by default the cores
    /// shared out). The run is the same, bit for bit, for any K; a run
    /// resumes with any K.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: u16,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct EvalArgs {
    /// A run folder or a model .safetensors checkpoint.
    path: PathBuf,
    /// Number of stochastic inference runs (default: the run's config).
    #[arg(long)]
    runs: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    test_limit: Option<usize>,
    /// CT/FM: integration steps (default: the run's config, 1000).
    #[arg(long)]
    steps: Option<usize>,
    /// CT/FM/adjoint: the integrator (FM: euler or heun; adjoint: euler).
    #[arg(long, value_enum)]
    sampler: Option<SamplerArg>,
    /// Train accuracy on the first N training images (0: skip).
    #[arg(long)]
    train_subset: Option<usize>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Config whose model is timed (default: the embedded MNIST DT config).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Timed training steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Minibatch size of the training step.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Images in the timed T-step inference.
    #[arg(long, default_value_t = 1000)]
    pub infer_batch: usize,
    /// The kernels to time.
    #[arg(long, value_enum)]
    pub kernels: Option<KernelsArg>,
    /// Timed repetitions of each op (0: skip the per-op timings).
    #[arg(long, default_value_t = 10)]
    pub op_reps: usize,
    /// Timed fused all-block steps (0: skip).
    #[arg(long, default_value_t = 5)]
    pub fused_steps: usize,
    /// Sustained core clock in GHz, for the FP32 peak (threads x clock x 32 FLOP/cycle, 64 with AVX-512 GEMMs).
    #[arg(long, default_value_t = 2.98)]
    pub clock_ghz: f64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Subcommand)]
enum InspectCommand {
    /// Write prototype class embeddings as a PNG (initial above learned; the paper's Figure 2).
    Embeddings {
        /// A run folder.
        run: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        png: PathBuf,
        /// Pixels per embedding pixel.
        #[arg(long, default_value_t = 4)]
        scale: usize,
    },
    /// Print the noise schedule of a NoProp-CT or NoProp-DT checkpoint: gamma(t) or alpha_bar_t, the noise left in the last latent, where the loss's weight lies.
    Schedule {
        /// A run folder (its newest checkpoint) or a model.safetensors file.
        run: PathBuf,
        /// Grid points over t in [0, 1] (NoProp-CT).
        #[arg(long, default_value_t = 11)]
        points: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download a data set into a folder, verifying checksums.
    Download {
        /// mnist, cifar10 or cifar100.
        #[arg(long, default_value = "mnist")]
        dataset: DatasetKind,
        /// Destination (default: $NOPROP_DATA/<dataset> or ./data/<dataset>).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Lets mimalloc keep freed memory for 10 s instead of 10 ms before
/// returning it to the OS.
///
/// A training step frees and reallocates the same multi-megabyte buffers
/// every few tens of milliseconds; with the default delay each step faults
/// its pages back in, and the kernel zeroes every transparent huge page it
/// maps (10-25% of the profile samples in `clear_page_erms` before this).
/// Purging still happens, later, and at once on an explicit `mi_collect`
/// (as after each evaluation). A negative delay would disable purging, and
/// `mi_collect` with it.
fn keep_freed_memory() {
    // `mi_option_purge_delay`: entry 15 of `mi_option_e` in mimalloc 2 and 3,
    // between the 14 and 16 that libmimalloc-sys names.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: a plain setter of a process-wide option, valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) }
}

fn main() -> ExitCode {
    keep_freed_memory();
    // Built once per process; clap takes a `&'static str` without its `string` feature.
    let version: &'static str = Box::leak(long_version().into_boxed_str());
    let cli = Cli::command().long_version(version).get_matches();
    let cli = Cli::from_arg_matches(&cli).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NOPROP_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = noprop_kernels::check_simd_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Bench(args) => bench::run(args),
        Command::Selftest(args) => selftest::run(args),
        Command::Inspect {
            command: InspectCommand::Embeddings { run, png, scale },
        } => inspect::embeddings(&run, &png, scale),
        Command::Inspect {
            command: InspectCommand::Schedule { run, points, json },
        } => inspect::schedule(&run, points, json),
        Command::Data { command } => data(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line: the first line of each message (a
/// candle error built with `RUST_BACKTRACE` set carries its backtrace on the
/// lines after), each cause once even where a message already quotes it.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        let first = msg
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if first.is_empty() || out.contains(&first) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&first);
    }
    out
}

/// Forwards events, and after each evaluation hands the allocator's free
/// pages back to the system, so that the next epoch's peak resident memory
/// (`train_peak_rss_bytes`) measures training, not the evaluation before it.
struct ReleaseAfterEval<O>(O);

impl<O: noprop_train::Observer> noprop_train::Observer for ReleaseAfterEval<O> {
    fn on_event(&mut self, event: &noprop_train::Event<'_>) {
        self.0.on_event(event);
        if let noprop_train::Event::EvalEnd(_) = event {
            // SAFETY: mi_collect only walks mimalloc's own heaps of this process.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
    }
}

pub(crate) fn device(arg: DeviceArg) -> Result<Device> {
    worker_device(arg, 0)
}

/// The device of worker `k` of a parallel run: GPU `k mod G` of the `G`
/// this process sees (worker 0: GPU 0).
fn worker_device(arg: DeviceArg, k: usize) -> Result<Device> {
    let gpus = |open: &dyn Fn(usize) -> candle_core::Result<Device>| {
        (0..=k).take_while(|&i| open(i).is_ok()).count().max(1)
    };
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            let i = if k == 0 {
                0
            } else {
                k % gpus(&Device::new_cuda)
            };
            Device::new_cuda(i).with_context(|| {
                format!("cannot open CUDA device {i} (was noprop built with --features cuda?)")
            })
        }
        DeviceArg::Metal => {
            let i = if k == 0 {
                0
            } else {
                k % gpus(&Device::new_metal)
            };
            Device::new_metal(i).with_context(|| {
                format!("cannot open Metal device {i} (was noprop built with --features metal?)")
            })
        }
    }
}

/// Sets up the CPU's compute threads: `--threads` (rayon's global pool, and
/// candle's matmul through `RAYON_NUM_THREADS`), and subnormal floats
/// flushed to zero in this thread and every pool thread
/// ([`noprop_kernels::flush_denormals`]: a trained model's evaluation ran
/// 21 times faster on an Intel Xeon with it). Returns the pool's size.
pub(crate) fn set_up_cpu(threads: Option<usize>) -> Result<usize> {
    if let Some(n) = threads {
        if !(1..=1024).contains(&n) {
            bail!("--threads must lie in 1..=1024, got {n}");
        }
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        if n > cores {
            eprintln!(
                "warning: --threads {n} is more than the {cores} cores this process may use; \
                 the threads will take turns and run slower than --threads {cores}"
            );
        }
        // candle's CPU matmul reads RAYON_NUM_THREADS; our kernels use rayon's global pool.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    noprop_kernels::flush_denormals();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .start_handler(|_| {
            noprop_kernels::flush_denormals();
        })
        .build_global()
        .ok();
    Ok(rayon::current_num_threads())
}

/// An MPI rank other than 0: trains its blocks with rank 0's config (from
/// the config file, or the run folder it resumes), on its own copy of the
/// data; rank 0 alone touches the run folder.
fn follow_rank_0(args: &TrainArgs, comm: &dyn Collective) -> Result<()> {
    set_up_cpu(threads_per_worker(args, Some(comm)))?;
    let text = comm.broadcast(0, vec![])?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).context("rank 0 sent a config that is not JSON")?;
    let cfg = RawConfig::from_json_value(value)?.validate()?;
    let dev = worker_device(args.common.device, comm.local().0)?;
    let loaded = RunData::load(&cfg, args.common.data.as_deref(), args.download, &dev)?;
    let mut trainer = build_trainer(cfg, dev, Some(&loaded.host_train))?;
    same_data_everywhere(comm, &loaded.identity(trainer.config().dataset().name())?)?;
    noprop_train::run::fit_parallel(&mut trainer, &loaded.device, None, &mut Silent, comm)?;
    Ok(())
}

/// `--threads`, or for one of several workers the cores of its machine
/// shared out among the workers there.
fn threads_per_worker(args: &TrainArgs, ranks: Option<&dyn Collective>) -> Option<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let here = ranks.map_or(usize::from(args.workers), |c| c.local().1);
    args.common
        .threads
        .or((here > 1).then(|| (cores / here).max(1)))
}

/// Refuses a run whose MPI ranks read different data (another folder or
/// another copy on another node): each rank trains on its own copy.
fn same_data_everywhere(
    comm: &dyn Collective,
    identity: &noprop_train::DataIdentity,
) -> Result<()> {
    let mine = serde_json::to_vec(identity)?;
    let all = comm.all_gather(mine)?;
    if let Some(k) = all.iter().position(|d| **d != *all[0]) {
        bail!(
            "worker {k} reads other data than worker 0 ({}); give every rank the same data set",
            String::from_utf8_lossy(&all[k])
        );
    }
    Ok(())
}

/// The compute threads of one worker of a parallel run.
fn worker_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(|_| {
            noprop_kernels::flush_denormals();
        })
        .build()
        .context("cannot start a worker's threads")
}

pub(crate) fn parse_config(path: &Path) -> Result<RawConfig> {
    let text = read_bounded(path, MAX_CONFIG_BYTES)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    parse_config_text(
        &text,
        path.extension().and_then(|e| e.to_str()) == Some("json"),
    )
    .with_context(|| format!("invalid config {}", path.display()))
}

/// The largest config file read (the shipped ones are about 1 KB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A regular file's text, refused above `max` bytes before it is read (a
/// device such as `/dev/zero` would otherwise be read until memory runs out).
fn read_bounded(path: &Path, max: u64) -> Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        bail!("not a regular file");
    }
    if meta.len() > max {
        bail!(
            "{} bytes, more than the {max} a config may have",
            meta.len()
        );
    }
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > max {
        bail!("more than the {max} bytes a config may have");
    }
    Ok(text)
}

/// A one-line message for a TOML error, with its line and column.
fn toml_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let at = e.span().map(|s| {
        let line = text[..s.start].matches('\n').count() + 1;
        let col = s.start - text[..s.start].rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {col}: ")
    });
    anyhow::anyhow!("{}{}", at.unwrap_or_default(), e.message().trim())
}

/// A JSON value whose objects may not repeat a key: serde_json keeps the last
/// of two equal keys without a word, while TOML refuses them, so a JSON
/// config `"blocks": 2, "blocks": 3` would train 3 blocks.
struct StrictJson(serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, SeqAccess, Visitor};
        use serde_json::Value;
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictJson;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E: Error>(self, v: bool) -> std::result::Result<StrictJson, E> {
                Ok(StrictJson(Value::Bool(v)))
            }
            fn visit_i64<E: Error>(self, v: i64) -> std::result::Result<StrictJson, E> {
                Ok(StrictJson(v.into()))
            }
            fn visit_u64<E: Error>(self, v: u64) -> std::result::Result<StrictJson, E> {
                Ok(StrictJson(v.into()))
            }
            fn visit_f64<E: Error>(self, v: f64) -> std::result::Result<StrictJson, E> {
                Ok(StrictJson(v.into()))
            }
            fn visit_str<E: Error>(self, v: &str) -> std::result::Result<StrictJson, E> {
                Ok(StrictJson(v.into()))
            }
            fn visit_unit<E: Error>(self) -> std::result::Result<StrictJson, E> {
                Ok(StrictJson(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<StrictJson, A::Error> {
                let mut items = vec![];
                while let Some(StrictJson(v)) = a.next_element()? {
                    items.push(v);
                }
                Ok(StrictJson(Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<StrictJson, A::Error> {
                let mut map = serde_json::Map::new();
                while let Some(key) = a.next_key::<String>()? {
                    let StrictJson(v) = a.next_value()?;
                    if map.insert(key.clone(), v).is_some() {
                        return Err(A::Error::custom(format!("duplicate key {key:?}")));
                    }
                }
                Ok(StrictJson(Value::Object(map)))
            }
        }
        d.deserialize_any(V)
    }
}

pub(crate) fn parse_config_text(text: &str, json: bool) -> Result<RawConfig> {
    if json {
        let StrictJson(value) = serde_json::from_str(text)?;
        return Ok(RawConfig::from_json_value(value)?);
    }
    // A TOML file is read as a value first, so that an old-style config gets
    // the list of moved fields, then as the schema, for errors with a line number.
    let value: toml::Value = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    let moved = noprop_train::config::old_style_fields(&serde_json::to_value(&value)?);
    if !moved.is_empty() {
        return Err(noprop_train::ConfigError::OldStyle { moved }.into());
    }
    toml::from_str(text).map_err(|e| toml_error(text, &e))
}

fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

enum Target {
    Resume(RunDir),
    New(PathBuf),
}

fn train(args: TrainArgs) -> Result<()> {
    // Under `mpirun -n K` (a build with the `mpi` feature), each rank is a worker.
    #[cfg(feature = "mpi")]
    {
        let comm = noprop_train::collective::MpiCollective::init()?;
        if comm.size() > 1 {
            if args.workers > 1 {
                bail!("--workers runs threads in one process; under mpirun each rank is a worker, so leave --workers out");
            }
            // A rank that fails ends them all (MPI_Abort) with its reason.
            if let Err(e) = train_on(args, Some(&comm)) {
                comm.abort(&one_line(&e));
            }
            return Ok(());
        }
    }
    train_on(args, None)
}

/// `noprop train` alone (`ranks = None`) or as one MPI rank of a parallel run.
fn train_on(args: TrainArgs, ranks: Option<&dyn Collective>) -> Result<()> {
    if let Some(comm) = ranks.filter(|c| c.rank() != 0) {
        return follow_rank_0(&args, comm);
    }
    let workers = ranks.map_or(usize::from(args.workers), |c| c.size());
    let threads = set_up_cpu(threads_per_worker(&args, ranks))?;
    let dev = worker_device(args.common.device, ranks.map_or(0, |c| c.local().0))?;
    let command: Vec<String> = std::env::args().collect();
    let (target, mut raw) = match &args.resume {
        Some(dir) => {
            let run = RunDir::resume(dir)?;
            let raw = run.config()?;
            (Target::Resume(run), raw)
        }
        None => {
            let (raw, name) = match &args.config {
                Some(p) => (
                    parse_config(p)?,
                    p.file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or_default(),
                ),
                None => (
                    parse_config_text(DEFAULT_CONFIG, false).context("embedded default config")?,
                    DEFAULT_CONFIG_NAME.to_string(),
                ),
            };
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(format!("{name}-{}", utc_stamp())));
            (Target::New(out), raw)
        }
    };
    // Overrides. On resume only the number of epochs may change (to extend a run).
    let epochs_before = raw.train.epochs;
    if let Some(e) = args.epochs {
        raw.train.epochs = e;
    }
    match target {
        Target::New(_) => {
            if let Some(s) = args.seed {
                raw.train.seed = s;
            }
            if let Some(n) = args.train_limit {
                raw.data.train_limit = Some(n);
            }
            if let Some(n) = args.test_limit {
                raw.data.test_limit = Some(n);
            }
            if let Some(k) = args.eval_runs {
                raw.eval.runs = k;
            }
            if let Some(k) = args.kernels {
                raw.model.kernels = k.into();
            }
        }
        Target::Resume(_) => {
            if args.seed.is_some()
                || args.train_limit.is_some()
                || args.test_limit.is_some()
                || args.kernels.is_some()
                || args.eval_runs.is_some()
            {
                bail!("--resume continues a run with its own config; only --epochs may be changed");
            }
        }
    }
    if let Some(comm) = ranks {
        // The other ranks train with exactly this config (see `follow_rank_0`).
        comm.broadcast(0, serde_json::to_vec(&raw)?)?;
    }
    let cfg = raw.validate()?;
    let loaded = RunData::load(&cfg, args.common.data.as_deref(), args.download, &dev)?;
    let mut trainer = build_trainer(cfg, dev.clone(), Some(&loaded.host_train))?;
    let identity = loaded.identity(trainer.config().dataset().name())?;
    if let Some(comm) = ranks {
        same_data_everywhere(comm, &identity)?;
    }
    if workers > 1 {
        // Refuses a configuration that cannot be split before any folder is made.
        trainer.set_worker(0, workers)?;
    }
    let data = loaded.device;
    let run = match target {
        Target::Resume(run) => {
            let mut accepted = run.check_data(&identity, args.accept_changes)?;
            let (epoch, changed) = run
                .restore_latest_checked(&mut trainer, args.accept_changes)
                .context("cannot restore the newest checkpoint")?;
            accepted.extend(changed);
            run.reconcile_metrics(epoch)?;
            if trainer.config().train.epochs != epochs_before {
                run.set_epochs(trainer.config().train.epochs)?;
            }
            let cpu_gemm = dev.is_cpu().then(noprop_kernels::gemm_isa);
            if let (Some(before), Some(now)) = (run.recorded_cpu_gemm()?, cpu_gemm) {
                if before != now {
                    eprintln!(
                        "note: this run trained with {before} GEMM kernels and continues with {now} \
                         ones (another CPU, or a build with or without `--features avx512`): from here \
                         it is not bit-identical to an uninterrupted run"
                    );
                }
            }
            run.record_resume(epoch, &command, &accepted, cpu_gemm)?;
            eprintln!("resuming {} after epoch {epoch}", run.path().display());
            run
        }
        Target::New(out) => RunDir::create(
            &out,
            &trainer,
            &RunMeta::new(&trainer, threads, command).with_data(identity),
        )?,
    };
    eprintln!("run folder: {}", run.path().display());
    let mut obs = ReleaseAfterEval(progress::Progress::new(std::io::stderr().is_terminal()));
    let report = if let Some(comm) = ranks {
        noprop_train::run::fit_parallel(&mut trainer, &data, Some(&run), &mut obs, comm)?
    } else if workers > 1 {
        let host = &loaded.host_train;
        let dev_of_data = dev.clone();
        let spawn = |cfg: Config, c: ThreadCollective| -> Result<()> {
            let work = || -> Result<()> {
                let pool = worker_pool(threads)?;
                pool.install(|| -> Result<()> {
                    let dev = worker_device(args.common.device, c.rank())?;
                    // A worker on a device of its own reads its own copy.
                    let copy = (!dev.same_device(&dev_of_data))
                        .then(|| data.for_worker(&dev))
                        .transpose()?;
                    let mut t = build_trainer(cfg, dev, Some(host))?;
                    let d = copy.as_ref().unwrap_or(&data);
                    noprop_train::run::fit_parallel(&mut t, d, None, &mut Silent, &c)?;
                    Ok(())
                })
            };
            work().inspect_err(|e| c.abort(&one_line(e)))
        };
        let mut comms = ThreadCollective::group(workers).into_iter();
        let first = comms.next().context("a group has a worker 0")?;
        let cfg = trainer.config().clone();
        std::thread::scope(|s| -> Result<_> {
            let others: Vec<_> = comms
                .map(|c| {
                    let cfg = cfg.clone();
                    s.spawn(move || spawn(cfg, c))
                })
                .collect();
            // Worker 0 computes on the global pool, the others on their own.
            let mine =
                noprop_train::run::fit_parallel(&mut trainer, &data, Some(&run), &mut obs, &first);
            let theirs: Vec<Result<()>> = others
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
                })
                .collect();
            // Worker 0's own error names the worker that failed first.
            let report = mine?;
            theirs.into_iter().collect::<Result<Vec<()>>>()?;
            Ok(report)
        })?
    } else {
        fit(&mut trainer, &data, Some(&run), &mut obs)?
    };
    obs.0.finish();
    if args.common.json {
        let epochs: Vec<_> = run
            .metrics()?
            .into_iter()
            .filter(|v| v["event"] == "epoch")
            .collect();
        println!(
            "{}",
            json!({
                "run_dir": run.path(),
                "epochs": trainer.epochs_done(),
                "train_seconds": trainer.train_seconds(),
                "epoch_seconds": epochs.iter().map(|v| v["epoch_seconds"].clone()).collect::<Vec<_>>(),
                "eval": report,
            })
        );
    }
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    set_up_cpu(args.common.threads)?;
    let dev = device(args.common.device)?;
    let checkpoint = if args.path.is_dir() {
        let run = RunDir::open(&args.path)?;
        run.latest_model()?
            .with_context(|| format!("{} has no checkpoint yet", args.path.display()))?
    } else {
        args.path.clone()
    };
    let mut trainer = load_for_eval(&checkpoint, &dev)
        .with_context(|| format!("cannot load {}", checkpoint.display()))?;
    trainer.change_inference(InferenceChange {
        runs: args.runs,
        steps: args.steps,
        sampler: args.sampler.map(CtSampler::from),
        train_subset: args.train_subset,
        test_limit: args.test_limit,
    })?;
    let data = RunData::load(trainer.config(), args.common.data.as_deref(), false, &dev)?.device;
    let report = trainer.evaluate(
        &data.test,
        data.train_subset.as_ref(),
        trainer.epochs_done(),
    )?;
    if args.common.json {
        println!(
            "{}",
            json!({
                "checkpoint": checkpoint,
                "epoch": trainer.epochs_done(),
                "eval": report,
                "cpu_gemm": dev.is_cpu().then(noprop_kernels::gemm_isa),
            })
        );
    } else {
        println!("{}", progress::describe_eval(&report));
    }
    Ok(())
}

fn data(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Download { dataset, dir } => {
            let dir = noprop_data::resolve_data_dir(dataset, dir.as_deref());
            dataset
                .ensure(&dir, true)
                .with_context(|| format!("downloading {dataset} into {}", dir.display()))?;
            eprintln!("{dataset} is ready in {}", dir.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `--sampler` value names a sampler and comes back from it.
    #[test]
    fn sampler_args_round_trip() {
        for arg in SamplerArg::value_variants() {
            let sampler = CtSampler::from(*arg);
            assert_eq!(SamplerArg::from(sampler), *arg);
            assert_eq!(
                sampler.to_string(),
                arg.to_possible_value().unwrap().get_name()
            );
        }
    }
}

//! The run folder, owned by [`RunDir`] (every file in it is written through
//! this type), and the epoch loop that fills it.
//!
//! ```text
//! RUN/config.json            the resolved configuration, written before the first step
//! RUN/meta.json              version, device, seeds and streams, command line, resumes
//! RUN/metrics.jsonl          one JSON object per event (pass, eval, epoch)
//! RUN/embed-init.safetensors the initial class embedding (learned embeddings only)
//! RUN/checkpoints/epoch-NNNN/model.safetensors      weights + metadata
//! RUN/checkpoints/epoch-NNNN/optimizer.safetensors  AdamW moments, for --resume
//! ```
//!
//! An epoch folder is written under a temporary name and renamed into place,
//! so a killed run leaves either a whole checkpoint or none.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use noprop_core::Stream;
use serde::Serialize;
use serde_json::{json, Value};

use crate::checkpoint::{
    self, load_safetensors, save_safetensors, sync_dir, ModelRecord, OptimizerRecord,
};
use crate::collective::Collective;
use crate::config::{Config, RawConfig};
use crate::data::{DataIdentity, RunData};
use crate::error::TrainError;
use crate::groups::EMBED;
use crate::method::Method;
use crate::observer::{EvalReport, Event, Observer, PassMetrics};
use crate::trainer::{CheckpointData, Trainer};

/// What `meta.json` records about the process that started a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunMeta {
    /// The crate's version.
    pub noprop_version: &'static str,
    /// The git commit the binary was built from, if known.
    pub git_sha: Option<&'static str>,
    /// The device, as candle prints it.
    pub device: String,
    /// CPU worker threads.
    pub threads: usize,
    /// The root seed.
    pub seed: u64,
    /// Every random stream derived from it, name and number.
    pub seed_streams: BTreeMap<&'static str, u64>,
    /// The command line.
    pub command: Vec<String>,
    /// Trainable parameters, BatchNorm buffers and the class embedding excluded.
    pub parameters: usize,
    /// What the run trains and tests on, compared on `--resume`.
    pub data: Option<DataIdentity>,
    /// On the CPU, the GEMM micro-kernels this build runs
    /// ([`noprop_kernels::gemm_isa`]): runs on different ones are not
    /// bit-identical. `None` on a GPU.
    pub cpu_gemm: Option<&'static str>,
}

impl RunMeta {
    /// The metadata of a run of `trainer` started by `command`.
    pub fn new<M: Method>(trainer: &Trainer<M>, threads: usize, command: Vec<String>) -> Self {
        let parameters = trainer
            .named_tensors()
            .iter()
            .filter(|(k, _)| !noprop_models::layers::is_buffer(k) && k.as_str() != EMBED)
            .map(|(_, v)| v.elem_count())
            .sum();
        RunMeta {
            noprop_version: env!("CARGO_PKG_VERSION"),
            git_sha: option_env!("NOPROP_GIT_SHA"),
            device: format!("{:?}", trainer.device()),
            threads,
            seed: trainer.config().train.seed,
            seed_streams: Stream::ALL.iter().map(|s| (s.name(), s.id())).collect(),
            command,
            parameters,
            data: None,
            cpu_gemm: trainer.device().is_cpu().then(noprop_kernels::gemm_isa),
        }
    }

    /// The same, recording the identity of the run's data.
    pub fn with_data(mut self, data: DataIdentity) -> Self {
        self.data = Some(data);
        self
    }
}

/// A run folder on disk. One made by [`RunDir::create`] or
/// [`RunDir::resume`] holds an exclusive lock on `RUN/.lock` for as long as
/// it (or a clone) lives, so a second process cannot train into it.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
    _lock: Option<std::sync::Arc<fs::File>>,
}

/// The files noprop writes while creating a run folder, before `config.json`
/// (written last) marks the creation as complete.
const CREATION_FILES: &[&str] = &[
    ".lock",
    "meta.json",
    ".meta.json.tmp",
    "metrics.jsonl",
    ".config.json.tmp",
    "embed-init.safetensors",
    "embed-init.safetensors.tmp",
    "checkpoints",
];

/// Takes the exclusive lock of the run folder `root` (which must exist) and
/// writes this process's id into it.
fn lock(root: &Path) -> Result<std::sync::Arc<fs::File>, TrainError> {
    let path = root.join(".lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let pid = fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            return Err(TrainError::RunLocked {
                path: root.to_path_buf(),
                pid,
            });
        }
        Err(fs::TryLockError::Error(source)) => return Err(TrainError::Io { path, source }),
    }
    f.set_len(0)
        .and_then(|_| write!(f, "{}", std::process::id()))
        .map_err(io_err(&path))?;
    Ok(std::sync::Arc::new(f))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl RunDir {
    /// Creates a new run folder (it must not exist, or be empty) for
    /// `trainer` and writes its configuration, `meta` and, for a learned
    /// embedding, the initial embedding into it.
    pub fn create<M: Method>(
        root: &Path,
        trainer: &Trainer<M>,
        meta: &RunMeta,
    ) -> Result<Self, TrainError> {
        let meta = serde_json::to_value(meta).map_err(|e| TrainError::Json {
            path: root.join("meta.json"),
            reason: e.to_string(),
        })?;
        let initial = trainer
            .config()
            .model
            .embedding
            .kind()
            .is_learned()
            .then(|| trainer.method().embed().clone());
        Self::create_inner(root, trainer.config(), &meta, initial)
    }

    fn create_inner(
        root: &Path,
        config: &Config,
        meta: &Value,
        initial: Option<Tensor>,
    ) -> Result<Self, TrainError> {
        let run = Self::create_with(root, config, meta)?;
        if let Some(embed) = initial {
            let mut t = BTreeMap::new();
            t.insert(EMBED.to_string(), embed);
            save_safetensors(
                &run.root.join("embed-init.safetensors"),
                &t,
                Default::default(),
            )?;
        }
        Ok(run)
    }

    /// Creates a new run folder with `config` and `meta` (a JSON object).
    ///
    /// The folder must not exist, be empty, or hold only what an earlier
    /// creation killed before it finished wrote (no `config.json`). The lock
    /// is taken before anything is checked, so of two processes creating
    /// the same folder one gets [`TrainError::RunLocked`] or
    /// [`TrainError::RunExists`]. `config.json` is written last: its
    /// presence marks a complete run folder.
    pub fn create_with(root: &Path, config: &Config, meta: &Value) -> Result<Self, TrainError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let lock = lock(root)?;
        for entry in fs::read_dir(root).map_err(io_err(root))? {
            let name = entry.map_err(io_err(root))?.file_name();
            if !CREATION_FILES.iter().any(|f| name == *f) || root.join("config.json").exists() {
                return Err(TrainError::RunExists {
                    path: root.to_path_buf(),
                });
            }
        }
        // Leftovers of a creation that was killed: nothing of value (no config, no checkpoint).
        let ckpts = root.join("checkpoints");
        if ckpts.is_dir()
            && fs::read_dir(&ckpts)
                .map_err(io_err(&ckpts))?
                .next()
                .is_some()
        {
            return Err(TrainError::RunExists {
                path: root.to_path_buf(),
            });
        }
        fs::create_dir_all(&ckpts).map_err(io_err(root))?;
        let run = Self {
            root: root.to_path_buf(),
            _lock: Some(lock),
        };
        run.write_json("meta.json", meta)?;
        fs::write(run.metrics_path(), b"").map_err(io_err(&run.metrics_path()))?;
        let raw = serde_json::to_value(config.raw()).map_err(|e| TrainError::Json {
            path: root.join("config.json"),
            reason: e.to_string(),
        })?;
        run.write_json("config.json", &raw)?;
        Ok(run)
    }

    /// Opens an existing run folder to read it (no lock: a run may be
    /// evaluated or inspected while it trains).
    pub fn open(root: &Path) -> Result<Self, TrainError> {
        if !root.join("config.json").is_file() {
            return Err(TrainError::NotARun {
                path: root.to_path_buf(),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            _lock: None,
        })
    }

    /// Opens an existing run folder to continue training it, holding its lock.
    pub fn resume(root: &Path) -> Result<Self, TrainError> {
        let mut run = Self::open(root)?;
        run._lock = Some(lock(root)?);
        Ok(run)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The configuration the run was started with (or last extended to).
    pub fn config(&self) -> Result<RawConfig, TrainError> {
        let path = self.root.join("config.json");
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| TrainError::Json {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        RawConfig::from_json_value(value).map_err(|e| TrainError::Json {
            path,
            reason: e.to_string(),
        })
    }

    /// Records a change of the number of epochs (`--resume --epochs N`) in `config.json`.
    pub fn set_epochs(&self, epochs: usize) -> Result<(), TrainError> {
        let mut raw = self.config()?;
        raw.train.epochs = epochs;
        let value = serde_json::to_value(raw).map_err(|e| TrainError::Json {
            path: self.root.join("config.json"),
            reason: e.to_string(),
        })?;
        self.write_json("config.json", &value)
    }

    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    fn write_json(&self, name: &str, v: &Value) -> Result<(), TrainError> {
        let path = self.root.join(name);
        let tmp = self.root.join(format!(".{name}.tmp"));
        let text = serde_json::to_string_pretty(v).map_err(|e| TrainError::Json {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_synced(&tmp, (text + "\n").as_bytes())?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.root)
    }

    /// Reads `meta.json`.
    pub fn meta(&self) -> Result<Value, TrainError> {
        let path = self.root.join("meta.json");
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|e| TrainError::Json {
            path,
            reason: e.to_string(),
        })
    }

    /// Records a resume in `meta.json` (`resumes`: list of `{from_epoch,
    /// command, noprop_version, git_sha}`, with the changes accepted and the
    /// CPU's GEMM kernels where there are any).
    pub fn record_resume(
        &self,
        from_epoch: usize,
        command: &[String],
        accepted_changes: &[String],
        cpu_gemm: Option<&str>,
    ) -> Result<(), TrainError> {
        let mut meta = self.meta()?;
        let mut entry = json!({
            "from_epoch": from_epoch,
            "command": command,
            "noprop_version": env!("CARGO_PKG_VERSION"),
            "git_sha": option_env!("NOPROP_GIT_SHA"),
        });
        if !accepted_changes.is_empty() {
            entry["accepted_changes"] = json!(accepted_changes);
        }
        if let Some(isa) = cpu_gemm {
            entry["cpu_gemm"] = json!(isa);
        }
        match meta.get_mut("resumes").and_then(Value::as_array_mut) {
            Some(list) => list.push(entry),
            None => meta["resumes"] = json!([entry]),
        }
        self.write_json("meta.json", &meta)
    }

    /// The CPU GEMM kernels the run last trained with, as `meta.json`
    /// records them: the newest resume that names them, else the start. A
    /// CPU run recorded before noprop kept them ran a build without the
    /// `avx512` feature, whose kernels are `fma` on any CPU since 2013;
    /// `None` for a run that never trained on the CPU.
    pub fn recorded_cpu_gemm(&self) -> Result<Option<String>, TrainError> {
        let meta = self.meta()?;
        let resumes = meta.get("resumes").and_then(Value::as_array);
        let recorded = resumes
            .into_iter()
            .flatten()
            .rev()
            .chain(std::iter::once(&meta))
            .find_map(|entry| entry.get("cpu_gemm").and_then(Value::as_str));
        let before_the_field = || {
            (meta.get("cpu_gemm").is_none()
                && meta.get("device").and_then(Value::as_str) == Some("Cpu"))
            .then_some("fma")
        };
        Ok(recorded.or_else(before_the_field).map(str::to_owned))
    }

    /// Appends one event to `metrics.jsonl`.
    pub fn append_metric(&self, v: &Value) -> Result<(), TrainError> {
        let path = self.metrics_path();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        writeln!(f, "{v}")
            .and_then(|_| f.sync_data())
            .map_err(io_err(&path))
    }

    /// All events of `metrics.jsonl`, in order.
    pub fn metrics(&self) -> Result<Vec<Value>, TrainError> {
        let path = self.metrics_path();
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| TrainError::Json {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Makes `metrics.jsonl` hold exactly the events of epochs `1..=epoch`,
    /// the epochs with a committed checkpoint: events of later epochs (work
    /// a killed run did after its last checkpoint) are dropped, and if the
    /// run was killed after epoch `epoch`'s checkpoint was committed but
    /// before its events reached `metrics.jsonl`, they are restored from the
    /// copy committed with the checkpoint (`events.jsonl`). A resumed run
    /// thus neither loses nor repeats an epoch's events.
    pub fn reconcile_metrics(&self, epoch: usize) -> Result<(), TrainError> {
        let path = self.metrics_path();
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        let mut kept: Vec<&str> = vec![];
        let mut committed = false;
        for line in text.lines() {
            // A torn last line (killed mid-write) is not valid JSON: drop it.
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let e = v.get("epoch").and_then(Value::as_u64).map(|e| e as usize);
            if e.is_some_and(|e| e <= epoch) {
                kept.push(line);
                committed |= e == Some(epoch) && v["event"] == "epoch";
            }
        }
        let mut out: Vec<String> = kept.iter().map(|l| l.to_string()).collect();
        if epoch > 0 && !committed {
            let journal = self.checkpoint_dir(epoch).join("events.jsonl");
            let events = fs::read_to_string(&journal).map_err(io_err(&journal))?;
            out.retain(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["epoch"].as_u64())
                    != Some(epoch as u64)
            });
            out.extend(
                events
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string),
            );
        }
        let tmp = self.root.join(".metrics.jsonl.tmp");
        let mut text = out.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        write_synced(&tmp, text.as_bytes())?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.root)
    }

    fn checkpoint_dir(&self, epoch: usize) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(format!("epoch-{epoch:04}"))
    }

    /// The epochs with a complete checkpoint, ascending.
    pub fn checkpoint_epochs(&self) -> Result<Vec<usize>, TrainError> {
        let dir = self.root.join("checkpoints");
        if !dir.is_dir() {
            return Ok(vec![]);
        }
        let mut out = vec![];
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(e) = name
                .strip_prefix("epoch-")
                .and_then(|e| e.parse::<usize>().ok())
            {
                if entry.path().join("model.safetensors").is_file() {
                    out.push(e);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The newest model checkpoint, if any.
    pub fn latest_model(&self) -> Result<Option<PathBuf>, TrainError> {
        Ok(self
            .checkpoint_epochs()?
            .last()
            .map(|&e| self.checkpoint_dir(e).join("model.safetensors")))
    }

    /// The initial class embedding, if the run saved one.
    pub fn initial_embedding(&self, device: &Device) -> Result<Option<Tensor>, TrainError> {
        let path = self.root.join("embed-init.safetensors");
        if !path.is_file() {
            return Ok(None);
        }
        let (mut t, _) = load_safetensors(&path, device)?;
        t.remove(EMBED)
            .map(Some)
            .ok_or_else(|| TrainError::Checkpoint {
                path,
                reason: format!("no `{EMBED}` tensor"),
            })
    }

    /// Writes the trainer's state as the checkpoint of its current epoch,
    /// with the epoch's `events` (appended to `metrics.jsonl` once the
    /// checkpoint is committed), and prunes old ones down to `keep_last` (0
    /// keeps all). The rename of the epoch folder is the commit point.
    pub fn commit_epoch<M: Method>(
        &self,
        trainer: &Trainer<M>,
        keep_last: usize,
        events: &[Value],
    ) -> Result<PathBuf, TrainError> {
        let dir = self.save_checkpoint(trainer, events)?;
        failpoint("after-commit");
        for v in events {
            self.append_metric(v)?;
        }
        failpoint("after-events");
        self.prune(keep_last)?;
        Ok(dir)
    }

    /// Removes the oldest checkpoints beyond `keep_last` (0 keeps all):
    /// only the files noprop wrote, and the folder if nothing else is in it.
    fn prune(&self, keep_last: usize) -> Result<(), TrainError> {
        if keep_last == 0 {
            return Ok(());
        }
        let epochs = self.checkpoint_epochs()?;
        for &old in epochs.iter().take(epochs.len().saturating_sub(keep_last)) {
            let dir = self.checkpoint_dir(old);
            for f in CHECKPOINT_FILES {
                let p = dir.join(f);
                if p.exists() {
                    fs::remove_file(&p).map_err(io_err(&p))?;
                }
            }
            // A user's own files keep the folder (and it no longer counts as a checkpoint).
            let _ = fs::remove_dir(&dir);
        }
        Ok(())
    }

    /// Writes the trainer's state as the checkpoint of its current epoch.
    fn save_checkpoint<M: Method>(
        &self,
        trainer: &Trainer<M>,
        events: &[Value],
    ) -> Result<PathBuf, TrainError> {
        let epoch = trainer.epochs_done();
        let final_dir = self.checkpoint_dir(epoch);
        let tmp = self
            .root
            .join("checkpoints")
            .join(format!(".epoch-{epoch:04}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let ckpt = trainer.checkpoint();
        save_safetensors(
            &tmp.join("model.safetensors"),
            &ckpt.model,
            ckpt.record.to_metadata()?,
        )?;
        save_safetensors(
            &tmp.join("optimizer.safetensors"),
            &ckpt.optimizer,
            ckpt.optimizer_record.to_metadata(),
        )?;
        let journal: String = events.iter().map(|v| format!("{v}\n")).collect();
        write_synced(&tmp.join("events.jsonl"), journal.as_bytes())?;
        sync_dir(&tmp)?;
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
        }
        fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
        sync_dir(&self.root.join("checkpoints"))?;
        Ok(final_dir)
    }

    /// Restores `trainer` from the newest checkpoint; returns its epoch (0 if
    /// none). A trainer whose configuration differs from the checkpoint's
    /// (`train.epochs` aside) is refused with [`TrainError::ResumeMismatch`];
    /// [`Self::restore_latest_checked`] can accept the changes.
    pub fn restore_latest<M: Method>(&self, trainer: &mut Trainer<M>) -> Result<usize, TrainError> {
        Ok(self.restore_latest_checked(trainer, false)?.0)
    }

    /// [`Self::restore_latest`], refusing (unless `accept_changes`) a
    /// trainer whose configuration differs from the one the checkpoint was
    /// trained under, `train.epochs` aside; returns the epoch and the differences.
    pub fn restore_latest_checked<M: Method>(
        &self,
        trainer: &mut Trainer<M>,
        accept_changes: bool,
    ) -> Result<(usize, Vec<String>), TrainError> {
        let Some(&epoch) = self.checkpoint_epochs()?.last() else {
            return Ok((0, vec![]));
        };
        let dir = self.checkpoint_dir(epoch);
        let (model_path, optim_path) = (
            dir.join("model.safetensors"),
            dir.join("optimizer.safetensors"),
        );
        let (model, model_meta) = load_safetensors(&model_path, trainer.device())?;
        let (optimizer, optim_meta) = load_safetensors(&optim_path, trainer.device())?;
        let record = ModelRecord::from_metadata(&model_path, &model_meta)?;
        if record.epoch != epoch {
            return Err(TrainError::Checkpoint {
                path: model_path,
                reason: format!(
                    "its metadata says epoch {} but its folder epoch {epoch}",
                    record.epoch
                ),
            });
        }
        let differences = crate::config::config_differences(&record.config, &trainer.raw_config());
        if !differences.is_empty() && !accept_changes {
            return Err(TrainError::ResumeMismatch {
                path: self.root.clone(),
                what: "config",
                differences,
            });
        }
        let ckpt = CheckpointData {
            model,
            record,
            optimizer,
            optimizer_record: OptimizerRecord::from_metadata(&optim_path, &optim_meta)?,
        };
        trainer.restore(&ckpt)?;
        Ok((epoch, differences))
    }

    /// Compares the data a resume would train on with what the run recorded
    /// in `meta.json` (nothing to compare for a run that recorded none);
    /// refuses a difference unless `accept_changes`. Returns the differences.
    pub fn check_data(
        &self,
        data: &DataIdentity,
        accept_changes: bool,
    ) -> Result<Vec<String>, TrainError> {
        let meta = self.meta()?;
        let Some(recorded) = meta.get("data").filter(|v| !v.is_null()) else {
            return Ok(vec![]);
        };
        let now = serde_json::to_value(data).map_err(|e| TrainError::Json {
            path: self.root.join("meta.json"),
            reason: e.to_string(),
        })?;
        let differences: Vec<String> = ["dataset", "train", "test", "digest"]
            .iter()
            .filter(|k| recorded.get(**k) != now.get(**k))
            .map(|k| {
                format!(
                    "data.{k} {} -> {}",
                    recorded.get(*k).unwrap_or(&Value::Null),
                    now[*k]
                )
            })
            .collect();
        if !differences.is_empty() && !accept_changes {
            return Err(TrainError::ResumeMismatch {
                path: self.root.clone(),
                what: "data",
                differences,
            });
        }
        Ok(differences)
    }
}

/// The files of a checkpoint folder, all written by noprop.
const CHECKPOINT_FILES: &[&str] = &[
    "model.safetensors",
    "optimizer.safetensors",
    "events.jsonl",
    "model.safetensors.tmp",
    "optimizer.safetensors.tmp",
];

/// A test hook: when the environment variable `NOPROP_FAILPOINT` names
/// this point, the process exits here at once (status 86), without running
/// destructors or writing anything more, as a kill at this instruction would
/// leave the folder. The kill-window tests use it.
fn failpoint(name: &str) {
    if std::env::var_os("NOPROP_FAILPOINT").is_some_and(|v| v == name) {
        std::process::exit(86);
    }
}

/// One `metrics.jsonl` event: `v`'s fields, `event`, and `extra`.
fn event<T: Serialize>(name: &str, v: &T, extra: &[(&str, Value)]) -> Result<Value, TrainError> {
    let mut v = serde_json::to_value(v).map_err(|e| TrainError::Json {
        path: "metrics.jsonl".into(),
        reason: e.to_string(),
    })?;
    v["event"] = json!(name);
    for (k, x) in extra {
        v[*k] = x.clone();
    }
    Ok(v)
}

/// Writes `bytes` to `path` and flushes it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(path))
}

/// Trains from `trainer.epochs_done() + 1` to the configured number of epochs,
/// evaluating, logging to `run` and checkpointing after every epoch. Returns
/// the last evaluation.
pub fn fit<M: Method>(
    trainer: &mut Trainer<M>,
    data: &RunData,
    run: Option<&RunDir>,
    observer: &mut dyn Observer,
) -> Result<Option<EvalReport>, TrainError> {
    fit_on(trainer, data, run, observer, None)
}

/// [`fit`] as one worker of a parallel run (see [`crate::collective`]).
///
/// Every worker starts from worker 0's state (its newest checkpoint when
/// resuming), so a run can resume with any number of workers. Each trains
/// its own blocks and replays the head's updates for the others' blocks;
/// at the end of an epoch worker 0 gathers every block's state and the
/// pass records, then evaluates and commits the epoch as [`fit`] does,
/// alone. `run` is worker 0's run folder (`None` on the others). A worker
/// that fails tells the others, which stop with an error naming it.
pub fn fit_parallel<M: Method>(
    trainer: &mut Trainer<M>,
    data: &RunData,
    run: Option<&RunDir>,
    observer: &mut dyn Observer,
    comm: &dyn Collective,
) -> Result<Option<EvalReport>, TrainError> {
    // A worker that panics still releases the others.
    struct OnPanic<'a>(&'a dyn Collective);
    impl Drop for OnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.abort("panicked");
            }
        }
    }
    let _guard = OnPanic(comm);
    let out = start_parallel(trainer, comm)
        .and_then(|()| fit_on(trainer, data, run, observer, Some(comm)));
    if let Err(e) = &out {
        comm.abort(&e.to_string());
    }
    out
}

/// Checks that every worker has the same config and copies worker 0's
/// state (model, optimizers, clock) to all.
fn start_parallel<M: Method>(
    trainer: &mut Trainer<M>,
    comm: &dyn Collective,
) -> Result<(), TrainError> {
    let rank = comm.rank();
    trainer.set_worker(rank, comm.size())?;
    let config = serde_json::to_vec(&trainer.raw_config()).unwrap_or_default();
    let configs = comm.all_gather(config.clone())?;
    if let Some(w) = configs.iter().position(|c| **c != config) {
        return Err(TrainError::Worker {
            worker: w,
            reason: format!("its config differs from worker {rank}'s"),
        });
    }
    let state = if rank == 0 {
        let ckpt = trainer.checkpoint();
        let mut tensors: BTreeMap<String, Tensor> = ckpt
            .model
            .into_iter()
            .map(|(k, v)| (format!("model/{k}"), v))
            .collect();
        tensors.extend(
            ckpt.optimizer
                .into_iter()
                .map(|(k, v)| (format!("opt/{k}"), v)),
        );
        let mut meta = ckpt.record.to_metadata()?;
        meta.extend(
            ckpt.optimizer_record
                .to_metadata()
                .into_iter()
                .map(|(k, v)| (format!("opt/{k}"), v)),
        );
        checkpoint::to_bytes(&tensors, meta)?
    } else {
        vec![]
    };
    let state = comm.broadcast(0, state)?;
    if rank != 0 {
        let (tensors, meta) = checkpoint::from_bytes(&state, trainer.device())?;
        let part = |prefix: &str| -> BTreeMap<String, Tensor> {
            tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
                .collect()
        };
        let opt_meta = meta
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("opt/").map(|k| (k.to_string(), v.clone())))
            .collect();
        let from = Path::new("worker 0");
        trainer.restore(&CheckpointData {
            model: part("model/"),
            record: ModelRecord::from_metadata(from, &meta)?,
            optimizer: part("opt/"),
            optimizer_record: OptimizerRecord::from_metadata(from, &opt_meta)?,
        })?;
    }
    Ok(())
}

/// On worker 0, every block's state from the others and every worker's
/// pass records (with the worker's index), in block order, and the bytes
/// it received; on the others, nothing.
fn gather_epoch<M: Method>(
    trainer: &mut Trainer<M>,
    comm: &dyn Collective,
    passes: Vec<PassMetrics>,
    peak_rss: Option<u64>,
) -> Result<Gathered, TrainError> {
    let lanes: Vec<usize> = passes.iter().map(|p| p.block).collect();
    let mut tensors = BTreeMap::new();
    let rss = peak_rss.map_or(-1.0, |b| b as f64);
    tensors.insert(
        "peak_rss".to_string(),
        Tensor::from_vec(vec![rss], 1, &candle_core::Device::Cpu)?,
    );
    let numbers: Vec<f64> = passes.iter().flat_map(|p| p.to_numbers()).collect();
    tensors.insert(
        "passes".to_string(),
        Tensor::from_vec(numbers, (passes.len(), 8), &candle_core::Device::Cpu)?,
    );
    if comm.rank() != 0 {
        for &lane in &lanes {
            let state = trainer.lane_state(lane)?;
            tensors.insert(
                format!("lane{lane}"),
                Tensor::from_vec(state.clone(), state.len(), &candle_core::Device::Cpu)?,
            );
        }
    }
    let mut out = Gathered::default();
    let Some(all) = comm.gather(0, checkpoint::to_bytes(&tensors, HashMap::new())?)? else {
        return Ok(out);
    };
    out.received = all.iter().skip(1).map(|b| b.len() as u64).sum();
    for (w, blob) in all.iter().enumerate() {
        let (tensors, _) = checkpoint::from_bytes(blob, &candle_core::Device::Cpu)?;
        let rss = tensors
            .get("peak_rss")
            .and_then(|t| t.to_vec1::<f64>().ok());
        out.peak_rss.push(
            rss.and_then(|r| r.first().copied())
                .filter(|&r| r >= 0.0)
                .map(|r| r as u64),
        );
        let theirs: Vec<PassMetrics> = tensors
            .get("passes")
            .and_then(|t| t.to_vec2::<f64>().ok())
            .ok_or_else(|| TrainError::Worker {
                worker: w,
                reason: "sent no pass records".into(),
            })?
            .into_iter()
            .map(|row| {
                let mut n = [0.0; 8];
                n.iter_mut().zip(row).for_each(|(a, b)| *a = b);
                PassMetrics::from_numbers(n)
            })
            .collect();
        if w != 0 {
            for p in &theirs {
                let state = tensors
                    .get(&format!("lane{}", p.block))
                    .ok_or_else(|| TrainError::Worker {
                        worker: w,
                        reason: format!("sent no state for block {}", p.block),
                    })?
                    .to_vec1::<u8>()?;
                trainer.set_lane_state(p.block, &state)?;
            }
        }
        out.passes.extend(theirs.into_iter().map(|p| (w, p)));
    }
    out.passes.sort_by_key(|(_, p)| p.block);
    Ok(out)
}

/// What worker 0 gathers at the end of an epoch.
#[derive(Default)]
struct Gathered {
    /// Every pass record with the worker that trained it, in block order.
    passes: Vec<(usize, PassMetrics)>,
    /// The bytes received.
    received: u64,
    /// Each worker's peak resident set in the epoch (its process's).
    peak_rss: Vec<Option<u64>>,
}

fn fit_on<M: Method>(
    trainer: &mut Trainer<M>,
    data: &RunData,
    run: Option<&RunDir>,
    observer: &mut dyn Observer,
    comm: Option<&dyn Collective>,
) -> Result<Option<EvalReport>, TrainError> {
    let cfg = trainer.config().clone();
    let epochs = cfg.train.epochs;
    let batches = data.train.len().div_ceil(cfg.train.batch_size);
    let passes = trainer
        .method()
        .epoch_plan()?
        .iter()
        .map(|p| p.lanes.len())
        .sum();
    observer.on_event(&Event::Start {
        first_epoch: trainer.epochs_done() + 1,
        epochs,
        blocks: passes,
        batches,
    });
    let mut last = None;
    while trainer.epochs_done() < epochs {
        crate::memory::reset_peak_rss();
        trainer.take_peak_device_bytes();
        let (clock, started) = (trainer.train_seconds(), Instant::now());
        let mut passes = trainer.train_epoch_on(&data.train, observer, comm)?;
        let train_peak_rss = crate::memory::peak_rss_bytes();
        let train_peak_device = trainer.take_peak_device_bytes();
        let mut workers = None;
        if let Some(comm) = comm {
            let g = gather_epoch(trainer, comm, passes, train_peak_rss)?;
            if comm.rank() != 0 {
                continue;
            }
            passes = g.passes.iter().map(|(_, p)| p.clone()).collect();
            let received = g.received + trainer.take_received_bytes();
            workers = Some((
                g.passes.into_iter().map(|(w, _)| w).collect::<Vec<_>>(),
                received,
                g.peak_rss,
            ));
            // The epoch took as long as its slowest worker.
            trainer.set_train_seconds(clock + started.elapsed().as_secs_f64());
        }
        let epoch = trainer.epochs_done();
        // A loss can stay finite while a BatchNorm statistic or a moment
        // overflows; such a state is never evaluated or saved.
        if let Some((tensor, count)) = trainer.first_non_finite()? {
            return Err(TrainError::NonFiniteState {
                epoch,
                tensor,
                count,
            });
        }
        let mut events = passes
            .iter()
            .enumerate()
            .map(|(i, p)| match &workers {
                Some((w, _, _)) => event("pass", p, &[("worker", json!(w[i]))]),
                None => event("pass", p, &[]),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let epoch_seconds = match comm {
            Some(_) => trainer.train_seconds() - clock,
            None => passes.iter().map(|p| p.seconds).sum(),
        };
        if epoch.is_multiple_of(cfg.eval.every) || epoch == epochs {
            observer.on_event(&Event::EvalStart { epoch });
            let report = trainer.evaluate(&data.test, data.train_subset.as_ref(), epoch)?;
            observer.on_event(&Event::EvalEnd(&report));
            events.push(event(
                "eval",
                &report,
                &[("train_seconds", json!(trainer.train_seconds()))],
            )?);
            last = Some(report);
        }
        if let Some(run) = run {
            // The epoch line comes last: its presence marks a finished, saved epoch.
            let rel = Path::new("checkpoints").join(format!("epoch-{epoch:04}"));
            let mut line = json!({
                "event": "epoch",
                "epoch": epoch,
                "epoch_seconds": epoch_seconds,
                "train_seconds": trainer.train_seconds(),
                "train_peak_rss_bytes": train_peak_rss,
                "train_peak_device_bytes": train_peak_device,
                "checkpoint": rel,
            });
            if let (Some(comm), Some((_, received, rss))) = (comm, &workers) {
                if comm.own_process() {
                    line["worker_peak_rss_bytes"] = json!(rss);
                }
                line["workers"] = json!(comm.size());
                // What worker 0 received: the blocks' state and pass records
                // at the epoch's end, and with order = "synchronous" the
                // shared gradients of every step.
                line["exchanged_bytes"] = json!(received);
            }
            events.push(line);
            let path = run.commit_epoch(trainer, cfg.checkpoint.keep_last, &events)?;
            observer.on_event(&Event::Checkpoint { epoch, path: &path });
        }
    }
    Ok(last)
}

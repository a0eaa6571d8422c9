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

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use noprop_core::Stream;
use serde::Serialize;
use serde_json::{json, Value};

use crate::checkpoint::{load_safetensors, save_safetensors, ModelRecord, OptimizerRecord};
use crate::config::{Config, RawConfig};
use crate::data::RunData;
use crate::error::TrainError;
use crate::groups::EMBED;
use crate::method::Method;
use crate::observer::{EvalReport, Event, Observer};
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
            seed: trainer.config().train().seed,
            seed_streams: Stream::ALL.iter().map(|s| (s.name(), s.id())).collect(),
            command,
            parameters,
        }
    }
}

/// A run folder on disk.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

impl RunDir {
    /// Creates a new run folder (it must not exist, or be empty) for
    /// `trainer` and writes its configuration, `meta` and, for a learned
    /// embedding, the initial embedding into it.
    pub fn create<M: Method>(root: &Path, trainer: &Trainer<M>, meta: &RunMeta) -> Result<Self, TrainError> {
        let run = Self::create_with(root, trainer.config(), &serde_json::to_value(meta).map_err(|e| TrainError::Json { path: root.join("meta.json"), reason: e.to_string() })?)?;
        if trainer.config().model().embedding.is_learned() {
            let mut t = BTreeMap::new();
            t.insert(EMBED.to_string(), trainer.method().embed().clone());
            save_safetensors(&run.root.join("embed-init.safetensors"), &t, Default::default())?;
        }
        Ok(run)
    }

    /// Creates a new run folder with `config` and `meta` (a JSON object).
    pub fn create_with(root: &Path, config: &Config, meta: &Value) -> Result<Self, TrainError> {
        if root.exists() && fs::read_dir(root).map_err(io_err(root))?.next().is_some() {
            return Err(TrainError::RunExists { path: root.to_path_buf() });
        }
        fs::create_dir_all(root.join("checkpoints")).map_err(io_err(root))?;
        let run = Self { root: root.to_path_buf() };
        let raw = serde_json::to_value(config.to_raw()).map_err(|e| TrainError::Json { path: root.join("config.json"), reason: e.to_string() })?;
        run.write_json("config.json", &raw)?;
        run.write_json("meta.json", meta)?;
        fs::write(run.metrics_path(), b"").map_err(io_err(&run.metrics_path()))?;
        Ok(run)
    }

    /// Opens an existing run folder.
    pub fn open(root: &Path) -> Result<Self, TrainError> {
        if !root.join("config.json").is_file() {
            return Err(TrainError::NotARun { path: root.to_path_buf() });
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The configuration the run was started with (or last extended to).
    pub fn config(&self) -> Result<RawConfig, TrainError> {
        let path = self.root.join("config.json");
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| TrainError::Json { path: path.clone(), reason: e.to_string() })?;
        RawConfig::from_json_value(value).map_err(|e| TrainError::Json { path, reason: e.to_string() })
    }

    /// Records a change of the number of epochs (`--resume --epochs N`) in `config.json`.
    pub fn set_epochs(&self, epochs: usize) -> Result<(), TrainError> {
        let mut raw = self.config()?;
        raw.train.epochs = epochs;
        let value = serde_json::to_value(raw).map_err(|e| TrainError::Json { path: self.root.join("config.json"), reason: e.to_string() })?;
        self.write_json("config.json", &value)
    }

    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    fn write_json(&self, name: &str, v: &Value) -> Result<(), TrainError> {
        let path = self.root.join(name);
        let tmp = self.root.join(format!(".{name}.tmp"));
        let text = serde_json::to_string_pretty(v).map_err(|e| TrainError::Json { path: path.clone(), reason: e.to_string() })?;
        fs::write(&tmp, text + "\n").map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Reads `meta.json`.
    pub fn meta(&self) -> Result<Value, TrainError> {
        let path = self.root.join("meta.json");
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|e| TrainError::Json { path, reason: e.to_string() })
    }

    /// Records a resume in `meta.json` (`resumes`: list of `{from_epoch, command}`).
    pub fn record_resume(&self, from_epoch: usize, command: &[String]) -> Result<(), TrainError> {
        let mut meta = self.meta()?;
        let entry = json!({"from_epoch": from_epoch, "command": command});
        match meta.get_mut("resumes").and_then(Value::as_array_mut) {
            Some(list) => list.push(entry),
            None => meta["resumes"] = json!([entry]),
        }
        self.write_json("meta.json", &meta)
    }

    /// Appends one event to `metrics.jsonl`.
    pub fn append_metric(&self, v: &Value) -> Result<(), TrainError> {
        let path = self.metrics_path();
        let mut f = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        writeln!(f, "{v}").map_err(io_err(&path))
    }

    fn append_event<T: Serialize>(&self, event: &str, v: &T, extra: &[(&str, Value)]) -> Result<(), TrainError> {
        let mut v = serde_json::to_value(v).map_err(|e| TrainError::Json { path: self.metrics_path(), reason: e.to_string() })?;
        v["event"] = json!(event);
        for (k, x) in extra {
            v[*k] = x.clone();
        }
        self.append_metric(&v)
    }

    /// All events of `metrics.jsonl`, in order.
    pub fn metrics(&self) -> Result<Vec<Value>, TrainError> {
        let path = self.metrics_path();
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| TrainError::Json { path: path.clone(), reason: e.to_string() }))
            .collect()
    }

    /// Drops every event of an epoch after `epoch` (work a killed run did
    /// after its last checkpoint), so a resumed run neither loses nor repeats epochs.
    pub fn truncate_metrics_after(&self, epoch: usize) -> Result<(), TrainError> {
        let path = self.metrics_path();
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        let mut kept = String::new();
        for line in text.lines() {
            // A torn last line (killed mid-write) is not valid JSON: drop it.
            let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
            if v.get("epoch").and_then(Value::as_u64).is_some_and(|e| e as usize <= epoch) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        let tmp = self.root.join(".metrics.jsonl.tmp");
        fs::write(&tmp, kept).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    fn checkpoint_dir(&self, epoch: usize) -> PathBuf {
        self.root.join("checkpoints").join(format!("epoch-{epoch:04}"))
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
            if let Some(e) = name.strip_prefix("epoch-").and_then(|e| e.parse::<usize>().ok()) {
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
        Ok(self.checkpoint_epochs()?.last().map(|&e| self.checkpoint_dir(e).join("model.safetensors")))
    }

    /// The initial class embedding, if the run saved one.
    pub fn initial_embedding(&self, device: &Device) -> Result<Option<Tensor>, TrainError> {
        let path = self.root.join("embed-init.safetensors");
        if !path.is_file() {
            return Ok(None);
        }
        let (mut t, _) = load_safetensors(&path, device)?;
        t.remove(EMBED).map(Some).ok_or_else(|| TrainError::Checkpoint { path, reason: format!("no `{EMBED}` tensor") })
    }

    /// Writes the trainer's state as the checkpoint of its current epoch and
    /// prunes old ones down to `keep_last` (0 keeps all).
    pub fn save_checkpoint<M: Method>(&self, trainer: &Trainer<M>, keep_last: usize) -> Result<PathBuf, TrainError> {
        let epoch = trainer.epochs_done();
        let final_dir = self.checkpoint_dir(epoch);
        let tmp = self.root.join("checkpoints").join(format!(".epoch-{epoch:04}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let ckpt = trainer.checkpoint();
        save_safetensors(&tmp.join("model.safetensors"), &ckpt.model, ckpt.record.to_metadata()?)?;
        save_safetensors(&tmp.join("optimizer.safetensors"), &ckpt.optimizer, ckpt.optimizer_record.to_metadata())?;
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
        }
        fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
        if keep_last > 0 {
            let epochs = self.checkpoint_epochs()?;
            for &old in epochs.iter().take(epochs.len().saturating_sub(keep_last)) {
                let dir = self.checkpoint_dir(old);
                fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
        Ok(final_dir)
    }

    /// Restores `trainer` from the newest checkpoint; returns its epoch (0 if none).
    pub fn restore_latest<M: Method>(&self, trainer: &mut Trainer<M>) -> Result<usize, TrainError> {
        let Some(&epoch) = self.checkpoint_epochs()?.last() else { return Ok(0) };
        let dir = self.checkpoint_dir(epoch);
        let (model_path, optim_path) = (dir.join("model.safetensors"), dir.join("optimizer.safetensors"));
        let (model, model_meta) = load_safetensors(&model_path, trainer.device())?;
        let (optimizer, optim_meta) = load_safetensors(&optim_path, trainer.device())?;
        let ckpt = CheckpointData {
            model,
            record: ModelRecord::from_metadata(&model_path, &model_meta)?,
            optimizer,
            optimizer_record: OptimizerRecord::from_metadata(&optim_path, &optim_meta)?,
        };
        trainer.restore(&ckpt)?;
        Ok(epoch)
    }
}

/// Trains from `trainer.epochs_done() + 1` to the configured number of epochs,
/// evaluating, logging to `run` and checkpointing after every epoch. Returns
/// the last evaluation.
pub fn fit<M: Method>(trainer: &mut Trainer<M>, data: &RunData, run: Option<&RunDir>, observer: &mut dyn Observer) -> Result<Option<EvalReport>, TrainError> {
    let cfg = trainer.config().clone();
    let epochs = cfg.train().epochs;
    let batches = data.train.len().div_ceil(cfg.train().batch_size);
    let passes = trainer.method().epoch_plan(&cfg).iter().map(|p| p.lanes.len()).sum();
    observer.on_event(&Event::Start { first_epoch: trainer.epochs_done() + 1, epochs, blocks: passes, batches });
    let mut last = None;
    while trainer.epochs_done() < epochs {
        crate::memory::reset_peak_rss();
        let passes = trainer.train_epoch(&data.train, observer)?;
        let train_peak_rss = crate::memory::peak_rss_bytes();
        let epoch = trainer.epochs_done();
        if let Some(run) = run {
            for p in &passes {
                run.append_event("pass", p, &[])?;
            }
        }
        let epoch_seconds: f64 = passes.iter().map(|p| p.seconds).sum();
        if epoch % cfg.eval().every == 0 || epoch == epochs {
            observer.on_event(&Event::EvalStart { epoch });
            let report = trainer.evaluate(&data.test, data.train_subset.as_ref(), epoch)?;
            observer.on_event(&Event::EvalEnd(&report));
            if let Some(run) = run {
                run.append_event("eval", &report, &[("train_seconds", json!(trainer.train_seconds()))])?;
            }
            last = Some(report);
        }
        if let Some(run) = run {
            let path = run.save_checkpoint(trainer, cfg.keep_last())?;
            // The epoch line comes last: its presence marks a finished, saved epoch.
            let rel = path.strip_prefix(run.path()).map(Path::to_path_buf).unwrap_or_else(|_| path.clone());
            run.append_metric(&json!({
                "event": "epoch",
                "epoch": epoch,
                "epoch_seconds": epoch_seconds,
                "train_seconds": trainer.train_seconds(),
                "train_peak_rss_bytes": train_peak_rss,
                "checkpoint": rel,
            }))?;
            observer.on_event(&Event::Checkpoint { epoch, path: &path });
        }
    }
    Ok(last)
}

//! The run folder and the epoch loop that fills it.
//!
//! ```text
//! RUN/config.json            the resolved configuration, written before the first step
//! RUN/meta.json              version, device, seeds, command line, resumes
//! RUN/metrics.jsonl          one JSON object per event (pass, eval, epoch)
//! RUN/checkpoints/epoch-NNNN/model.safetensors      weights + metadata
//! RUN/checkpoints/epoch-NNNN/optimizer.safetensors  AdamW moments, for --resume
//! ```
//!
//! An epoch folder is written under a temporary name and renamed into place,
//! so a killed run leaves either a whole checkpoint or none.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::checkpoint::{load_safetensors, save_safetensors};
use crate::config::Config;
use crate::dt::DeviceData;
use crate::trainer::Trainer;
use crate::observer::{EvalReport, Event, Observer};
use crate::TrainError;

/// A run folder on disk.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

impl RunDir {
    /// Creates a new run folder (it must not exist, or be empty) and writes
    /// the configuration and `meta` into it.
    pub fn create(root: &Path, config: &Config, meta: Value) -> Result<Self, TrainError> {
        if root.exists() && fs::read_dir(root).map_err(io_err(root))?.next().is_some() {
            return Err(TrainError::RunExists { path: root.to_path_buf() });
        }
        fs::create_dir_all(root.join("checkpoints")).map_err(io_err(root))?;
        let run = Self { root: root.to_path_buf() };
        run.write_json("config.json", &serde_json::to_value(config).map_err(|e| TrainError::Json { path: root.join("config.json"), reason: e.to_string() })?)?;
        run.write_json("meta.json", &meta)?;
        fs::write(run.metrics_path(), b"").map_err(io_err(&run.metrics_path()))?;
        Ok(run)
    }

    /// Opens an existing run folder.
    pub fn open(root: &Path) -> Result<Self, TrainError> {
        let cfg = root.join("config.json");
        if !cfg.is_file() {
            return Err(TrainError::NotARun { path: root.to_path_buf() });
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The configuration the run was started with.
    pub fn config(&self) -> Result<Config, TrainError> {
        let path = self.root.join("config.json");
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|e| TrainError::Json { path, reason: e.to_string() })
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

    /// Writes the trainer's state as the checkpoint of its current epoch and
    /// prunes old ones down to `keep_last` (0 keeps all).
    pub fn save_checkpoint(&self, trainer: &dyn Trainer, keep_last: usize) -> Result<PathBuf, TrainError> {
        let epoch = trainer.epochs_done();
        let final_dir = self.checkpoint_dir(epoch);
        let tmp = self.root.join("checkpoints").join(format!(".epoch-{epoch:04}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let (model, model_meta) = trainer.model_checkpoint();
        save_safetensors(&tmp.join("model.safetensors"), &model, model_meta)?;
        let (optim, optim_meta) = trainer.optimizer_checkpoint();
        save_safetensors(&tmp.join("optimizer.safetensors"), &optim, optim_meta)?;
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
    pub fn restore_latest(&self, trainer: &mut dyn Trainer) -> Result<usize, TrainError> {
        let Some(&epoch) = self.checkpoint_epochs()?.last() else { return Ok(0) };
        let dir = self.checkpoint_dir(epoch);
        let (model, model_meta) = load_safetensors(&dir.join("model.safetensors"), trainer.device())?;
        let (optim, optim_meta) = load_safetensors(&dir.join("optimizer.safetensors"), trainer.device())?;
        trainer.restore(&model, &model_meta, &optim, &optim_meta)?;
        Ok(epoch)
    }
}

/// Data for a run: the training set, the test set, and the fixed training
/// subset on which train accuracy is measured.
pub struct RunData {
    /// Training set.
    pub train: DeviceData,
    /// Test set.
    pub test: DeviceData,
    /// First examples of the training set, for train accuracy.
    pub train_subset: Option<DeviceData>,
}

/// Trains from `trainer.epochs_done() + 1` to the configured number of epochs,
/// evaluating, logging to `run` and checkpointing after every epoch. Returns
/// the last evaluation.
pub fn fit(
    trainer: &mut dyn Trainer,
    data: &RunData,
    run: Option<&RunDir>,
    observer: &mut dyn Observer,
) -> Result<Option<EvalReport>, TrainError> {
    let raw = trainer.config().raw().clone();
    let epochs = raw.train.epochs;
    let batches = data.train.len().div_ceil(raw.train.batch_size);
    // NoProp-DT makes one pass per block; the other methods one pass per epoch.
    let passes = if raw.model.method == crate::config::Method::Dt { raw.model.blocks } else { 1 };
    observer.on_event(&Event::Start { first_epoch: trainer.epochs_done() + 1, epochs, blocks: passes, batches });
    let mut last = None;
    while trainer.epochs_done() < epochs {
        crate::memory::reset_peak_rss();
        let passes = trainer.train_epoch(&data.train, observer)?;
        let train_peak_rss = crate::memory::peak_rss_bytes();
        let epoch = trainer.epochs_done();
        if let Some(run) = run {
            for p in &passes {
                let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
                v["event"] = json!("pass");
                run.append_metric(&v)?;
            }
        }
        let epoch_seconds: f64 = passes.iter().map(|p| p.seconds).sum();
        if epoch % raw.eval.every == 0 || epoch == epochs {
            observer.on_event(&Event::EvalStart { epoch });
            let report = trainer.evaluate(&data.test, data.train_subset.as_ref(), epoch)?;
            observer.on_event(&Event::EvalEnd(&report));
            if let Some(run) = run {
                let mut v = serde_json::to_value(&report).unwrap_or(Value::Null);
                v["event"] = json!("eval");
                v["train_seconds"] = json!(trainer.train_seconds());
                run.append_metric(&v)?;
            }
            last = Some(report);
        }
        if let Some(run) = run {
            let path = run.save_checkpoint(trainer, raw.checkpoint.keep_last)?;
            // The epoch line comes last: its presence marks a finished, saved epoch.
            run.append_metric(&json!({
                "event": "epoch",
                "epoch": epoch,
                "epoch_seconds": epoch_seconds,
                "train_seconds": trainer.train_seconds(),
                "train_peak_rss_bytes": train_peak_rss,
                "checkpoint": path.strip_prefix(run.path()).unwrap_or(&path),
            }))?;
            observer.on_event(&Event::Checkpoint { epoch, path: &path });
        }
    }
    Ok(last)
}

//! safetensors files with metadata, written atomically, and the typed
//! records a checkpoint's metadata holds.
//!
//! A model checkpoint (`model.safetensors`) holds every tensor of the model
//! under its checkpoint name and a [`ModelRecord`] as string metadata, so a
//! reader in another framework needs nothing else:
//!
//! | key | value |
//! | --- | --- |
//! | `format` | `noprop/2` |
//! | `method` | `dt`, `ct`, `fm`, `backprop` or `adjoint` |
//! | `epoch`, `train_seconds` | the training clock |
//! | `config` | the resolved configuration, as JSON |
//! | `schedule` | NoProp-DT: the `alpha_bar_0..=T` table as a JSON list (CT's learnable schedule is in the tensors `schedule.*`) |
//! | `normalization` | `{"mean": [...], "std": [...]}` per channel: a pixel `p` in `[0, 255]` enters as `(p / 255 - mean) / std` |
//! | `seed_streams` | the run's random streams, `{name: number}` |
//! | `blocks` | how blocks are numbered: `blocks.{t}` for `t = 1..=T` maps `z_{t-1}` to `uhat_t` |
//!
//! An optimizer checkpoint (`optimizer.safetensors`) holds the moments of
//! every trainable variable (`{name}.m`, `{name}.v`) and an
//! [`OptimizerRecord`] (epoch and step counts).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{safetensors::Load, Device, Tensor};
use serde_json::json;

use crate::config::RawConfig;
use crate::error::TrainError;

/// The metadata format this version writes.
pub const FORMAT: &str = "noprop/2";

/// What a model checkpoint's metadata says.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRecord {
    /// Epochs trained.
    pub epoch: usize,
    /// Seconds spent in training steps (across resumes).
    pub train_seconds: f64,
    /// The configuration.
    pub config: RawConfig,
    /// NoProp-DT's `alpha_bar_0..=T`.
    pub schedule: Option<Vec<f64>>,
    /// Per-channel mean and standard deviation of the input normalisation.
    pub normalization: (Vec<f32>, Vec<f32>),
    /// The random streams, name and number.
    pub seed_streams: BTreeMap<String, u64>,
}

impl ModelRecord {
    /// The record as safetensors metadata.
    pub fn to_metadata(&self) -> Result<HashMap<String, String>, TrainError> {
        let json_err = |e: serde_json::Error| TrainError::Checkpoint {
            path: "metadata".into(),
            reason: e.to_string(),
        };
        let mut m = HashMap::new();
        m.insert("format".into(), FORMAT.into());
        m.insert("method".into(), self.config.method.kind().into());
        m.insert("epoch".into(), self.epoch.to_string());
        m.insert("train_seconds".into(), format!("{:.3}", self.train_seconds));
        m.insert(
            "config".into(),
            serde_json::to_string(&self.config).map_err(json_err)?,
        );
        if let Some(s) = &self.schedule {
            m.insert(
                "schedule".into(),
                serde_json::to_string(s).map_err(json_err)?,
            );
        }
        m.insert(
            "normalization".into(),
            json!({"mean": self.normalization.0, "std": self.normalization.1}).to_string(),
        );
        m.insert(
            "seed_streams".into(),
            serde_json::to_string(&self.seed_streams).map_err(json_err)?,
        );
        m.insert(
            "blocks".into(),
            "blocks.{t} for t = 1..=T maps z_{t-1} to uhat_t; z_0 is noise, z_T the label".into(),
        );
        Ok(m)
    }

    /// Reads the record from the metadata of the checkpoint at `path`.
    pub fn from_metadata(path: &Path, m: &HashMap<String, String>) -> Result<Self, TrainError> {
        let bad = |reason: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let get = |key: &str| {
            m.get(key)
                .ok_or_else(|| bad(format!("no {key} in its metadata (not written by noprop?)")))
        };
        let format = get("format")?;
        if format != FORMAT {
            return Err(bad(format!("metadata format {format:?}, this noprop reads {FORMAT:?} (written by an older version: retrain, or evaluate it with the version that wrote it)")));
        }
        let epoch: usize = get("epoch")?
            .parse()
            .map_err(|_| bad("epoch is not a number".into()))?;
        if epoch > crate::config::limits::EPOCHS {
            return Err(bad(format!(
                "epoch {epoch} is above the {} a run can train (edited?)",
                crate::config::limits::EPOCHS
            )));
        }
        let train_seconds: f64 = get("train_seconds")?
            .parse()
            .map_err(|_| bad("train_seconds is not a number".into()))?;
        let value: serde_json::Value = serde_json::from_str(get("config")?)
            .map_err(|e| bad(format!("config in metadata: {e}")))?;
        let config = RawConfig::from_json_value(value)
            .map_err(|e| bad(format!("config in metadata: {e}")))?;
        // The table is derived from the config, and written as the shortest
        // decimals of its values; one that reads otherwise was edited, and
        // would be shown (inspect) while the config's is used (eval). The
        // text is compared, since parsing decimals back may miss the last bit.
        let schedule = config.method.params().alpha_bars();
        let written = schedule
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| bad(format!("schedule: {e}")))?;
        if m.get("schedule") != written.as_ref() {
            return Err(bad(
                "schedule in metadata disagrees with its config's method.schedule (edited?)".into(),
            ));
        }
        let norm: serde_json::Value = serde_json::from_str(get("normalization")?)
            .map_err(|e| bad(format!("normalization in metadata: {e}")))?;
        let channel = |key: &str| -> Result<Vec<f32>, TrainError> {
            serde_json::from_value(norm[key].clone())
                .map_err(|e| bad(format!("normalization.{key} in metadata: {e}")))
        };
        let normalization = (channel("mean")?, channel("std")?);
        let seed_streams = serde_json::from_str(get("seed_streams")?)
            .map_err(|e| bad(format!("seed_streams in metadata: {e}")))?;
        let method = get("method")?;
        if method != config.method.kind() {
            return Err(bad(format!(
                "metadata names method {method:?} but its config is a {} config",
                config.method.kind()
            )));
        }
        Ok(Self {
            epoch,
            train_seconds,
            config,
            schedule,
            normalization,
            seed_streams,
        })
    }
}

/// What an optimizer checkpoint's metadata says.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerRecord {
    /// Epochs trained (must equal the model checkpoint's).
    pub epoch: usize,
    /// Steps taken by each parameter group's optimizer.
    pub steps: Vec<u64>,
}

impl OptimizerRecord {
    /// The record as safetensors metadata.
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("format".into(), FORMAT.into());
        m.insert("epoch".into(), self.epoch.to_string());
        m.insert("steps".into(), json!(self.steps).to_string());
        m
    }

    /// Reads the record from the metadata of the checkpoint at `path`.
    pub fn from_metadata(path: &Path, m: &HashMap<String, String>) -> Result<Self, TrainError> {
        let bad = |reason: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let epoch = m
            .get("epoch")
            .and_then(|e| e.parse().ok())
            .ok_or_else(|| bad("no epoch in its metadata".into()))?;
        let steps = m
            .get("steps")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no step counts in its metadata".into()))?;
        Ok(Self { epoch, steps })
    }
}

/// The largest checkpoint file read (a CIFAR-100 prototype model with its
/// optimizer state is a few hundred MB).
pub const MAX_CHECKPOINT_BYTES: u64 = 16 << 30;

/// Writes `tensors` with `metadata` to `path` through a temporary file in the
/// same folder and a rename, so a reader never sees a half-written file.
pub fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<(), TrainError> {
    let tmp = path.with_extension("safetensors.tmp");
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    // safetensors reads CPU memory; move tensors off other devices first.
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    safetensors::serialize_to_file(cpu, Some(metadata), &tmp).map_err(|e| {
        TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    // The rename is atomic, but only a synced file and folder survive a power loss.
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Flushes a folder's entries (new and renamed files) to disk.
pub fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    // Opening a folder to sync it works on Unix; elsewhere it is not needed
    // (or possible), so only a failure to sync an opened folder is an error.
    match std::fs::File::open(dir) {
        Ok(f) => f
            .sync_all()
            .or_else(|e| if cfg!(unix) { Err(e) } else { Ok(()) })
            .map_err(|source| TrainError::Io {
                path: dir.to_path_buf(),
                source,
            }),
        Err(_) if !cfg!(unix) => Ok(()),
        Err(source) => Err(TrainError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// The first tensor (in name order) holding NaN or infinite values: its
/// name and how many it holds.
pub fn first_non_finite(
    tensors: &BTreeMap<String, Tensor>,
) -> Result<Option<(String, usize)>, TrainError> {
    for (name, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        let values: Vec<f64> = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1()?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Ok(Some((name.clone(), bad)));
        }
    }
    Ok(None)
}

/// A safetensors file's string metadata.
pub type Metadata = HashMap<String, String>;

/// Reads every tensor of a safetensors file onto `device`, with its metadata.
pub fn load_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, Metadata), TrainError> {
    let meta = std::fs::metadata(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    if meta.len() > MAX_CHECKPOINT_BYTES {
        return Err(TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes, more than the {MAX_CHECKPOINT_BYTES} a checkpoint may have",
                meta.len()
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        // noprop writes F32 only; anything else would be converted silently.
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!(
                "tensor {name} has dtype {:?}; noprop checkpoints hold F32",
                view.dtype()
            )));
        }
        let t = view
            .load(device)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        out.insert(name, t);
    }
    if let Some((name, count)) = first_non_finite(&out)? {
        return Err(bad(format!(
            "tensor {name} holds {count} non-finite values"
        )));
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// `tensors` with `metadata` as the bytes of a safetensors file (to send
/// between the workers of a parallel run).
pub fn to_bytes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, TrainError> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    safetensors::serialize(cpu, Some(metadata)).map_err(|e| TrainError::Worker {
        worker: 0,
        reason: format!("cannot serialise a state: {e}"),
    })
}

/// The tensors (onto `device`) and metadata of [`to_bytes`]'s output.
pub fn from_bytes(
    bytes: &[u8],
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, Metadata), TrainError> {
    let bad = |e: String| TrainError::Worker {
        worker: 0,
        reason: format!("a state received from another worker is unreadable: {e}"),
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| bad(e.to_string()))?
        .into_iter()
        .collect();
    Ok((tensors, meta))
}

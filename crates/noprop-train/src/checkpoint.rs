//! safetensors files with metadata, written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{safetensors::Load, Device, Tensor};

use crate::TrainError;

/// Writes `tensors` with `metadata` to `path` through a temporary file in the
/// same folder and a rename, so a reader never sees a half-written file.
pub fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<(), TrainError> {
    let tmp = path.with_extension("safetensors.tmp");
    let io = |source| TrainError::Io { path: path.to_path_buf(), source };
    // safetensors reads CPU memory; move tensors off other devices first.
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    safetensors::serialize_to_file(cpu, Some(metadata), &tmp).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Reads every tensor of a safetensors file onto `device`, with its metadata.
pub fn load_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>), TrainError> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
    let bad = |reason: String| TrainError::Checkpoint { path: path.to_path_buf(), reason };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = view.load(device).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        out.insert(name, t);
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

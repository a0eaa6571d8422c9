//! Data on the training device: [`DeviceData`] (images and labels moved to
//! the device once) and [`RunData`] (the three sets a run uses), loaded as
//! a [`Config`] asks.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use noprop_data::{Dataset, Split};

use crate::config::Config;
use crate::error::TrainError;

/// A data set moved to the device once: images `[N, C, H, W]` and labels `[N]`.
pub struct DeviceData {
    images: Tensor,
    labels: Tensor,
    host_labels: Vec<u32>,
}

impl DeviceData {
    /// The same examples on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self, TrainError> {
        Ok(Self {
            images: self.images.to_device(device)?,
            labels: self.labels.to_device(device)?,
            host_labels: self.host_labels.clone(),
        })
    }

    /// Copies `ds` to `device` in `dtype`.
    pub fn new(ds: &Dataset, dtype: DType, device: &Device) -> Result<Self, TrainError> {
        let n = ds.len();
        let images = Tensor::from_slice(&ds.images, (n, ds.channels, ds.height, ds.width), device)?
            .to_dtype(dtype)?;
        let labels = Tensor::from_slice(&ds.labels, n, device)?;
        Ok(Self {
            images,
            labels,
            host_labels: ds.labels.clone(),
        })
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.host_labels.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.host_labels.is_empty()
    }

    /// The first `n` examples.
    pub fn head(&self, n: usize) -> Result<Self, TrainError> {
        let n = n.min(self.len());
        Ok(Self {
            images: self.images.narrow(0, 0, n)?,
            labels: self.labels.narrow(0, 0, n)?,
            host_labels: self.host_labels[..n].to_vec(),
        })
    }

    /// Images `[N, C, H, W]` on the device.
    pub fn images(&self) -> &Tensor {
        &self.images
    }

    /// Labels on the host.
    pub fn labels_host(&self) -> &[u32] {
        &self.host_labels
    }

    /// The examples at `idx`: images and labels on the device.
    pub fn batch(&self, idx: &[usize]) -> Result<(Tensor, Tensor), TrainError> {
        let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        let ids = Tensor::from_vec(ids, idx.len(), self.images.device())?;
        Ok((
            self.images.index_select(&ids, 0)?,
            self.labels.index_select(&ids, 0)?,
        ))
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

impl RunData {
    /// The training set on `device`, for a worker of a parallel run on a
    /// device of its own (it never evaluates: the test set stays where it is).
    pub fn for_worker(&self, device: &Device) -> Result<Self, TrainError> {
        Ok(Self {
            train: self.train.to_device(device)?,
            test: self.test.to_device(&self.test.images.device().clone())?,
            train_subset: None,
        })
    }
}

/// What identifies a run's data: the data set, the sizes used, and a digest
/// of every image and label (FNV-1a, 64 bit, over the normalised `f32`
/// values and the labels of both sets, in order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataIdentity {
    /// The data set's name.
    pub dataset: String,
    /// Training examples used.
    pub train: usize,
    /// Test examples used.
    pub test: usize,
    /// The digest, 16 hex digits.
    pub digest: String,
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The data of a run on the host and on the device.
pub struct LoadedData {
    /// The sets on the device.
    pub device: RunData,
    /// The training set on the host (prototype embeddings are initialised from it).
    pub host_train: Dataset,
}

impl LoadedData {
    /// The identity of this data (see [`DataIdentity`]).
    pub fn identity(&self, dataset: &str) -> Result<DataIdentity, TrainError> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for v in &self.host_train.images {
            h = fnv(h, &v.to_le_bytes());
        }
        for l in &self.host_train.labels {
            h = fnv(h, &l.to_le_bytes());
        }
        let test: Vec<f32> = self
            .device
            .test
            .images()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        for v in &test {
            h = fnv(h, &v.to_le_bytes());
        }
        for l in self.device.test.labels_host() {
            h = fnv(h, &l.to_le_bytes());
        }
        Ok(DataIdentity {
            dataset: dataset.to_string(),
            train: self.device.train.len(),
            test: self.device.test.len(),
            digest: format!("{h:016x}"),
        })
    }
}

impl RunData {
    /// Loads the config's data set from `dir` (or the folder the config, then
    /// `$NOPROP_DATA`, then `./data` name; see
    /// [`noprop_data::resolve_data_dir`]), downloading it first when
    /// `download` is set, applies the config's limits and moves it to `device`.
    pub fn load(
        cfg: &Config,
        dir: Option<&Path>,
        download: bool,
        device: &Device,
    ) -> Result<LoadedData, TrainError> {
        let kind = cfg.dataset();
        let dir = noprop_data::resolve_data_dir(kind, dir.or(cfg.data.dir.as_deref()));
        kind.ensure(&dir, download)?;
        let mut train = kind.load(&dir, Split::Train)?;
        let mut test = kind.load(&dir, Split::Test)?;
        if let Some(n) = cfg.data.train_limit {
            train = train.take(n);
        }
        if let Some(n) = cfg.data.test_limit {
            test = test.take(n);
        }
        // BatchNorm needs two examples in a minibatch; a smaller set would
        // train nothing and report a loss of 0 as if it had.
        if train.len() < 2 {
            return Err(TrainError::NotEnoughData {
                what: format!(
                    "{kind} in {}: {} training example(s); training needs at least 2",
                    dir.display(),
                    train.len()
                ),
            });
        }
        if test.is_empty() {
            return Err(TrainError::NotEnoughData {
                what: format!("{kind} in {}: no test examples", dir.display()),
            });
        }
        let train_dev = DeviceData::new(&train, DType::F32, device)?;
        let test = DeviceData::new(&test, DType::F32, device)?;
        let subset = match cfg.eval.train_subset {
            0 => None,
            n => Some(train_dev.head(n)?),
        };
        Ok(LoadedData {
            device: RunData {
                train: train_dev,
                test,
                train_subset: subset,
            },
            host_train: train,
        })
    }
}

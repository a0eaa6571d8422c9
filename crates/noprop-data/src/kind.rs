//! The three supported data sets, their splits, and where their files live.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{cifar, mnist, DataError, Dataset, Normalization};

/// The environment variable naming the data root: a folder holding `mnist/`,
/// `cifar10/` and `cifar100/`.
pub const DATA_ENV: &str = "NOPROP_DATA";

/// The training or the test part of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training examples (60,000 for MNIST, 50,000 for CIFAR).
    Train,
    /// The test examples (10,000 for each data set).
    Test,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

impl FromStr for Split {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(DataError::UnknownSplit { name: s.to_owned() }),
        }
    }
}

/// One of the supported data sets.
///
/// Its [`Display`](fmt::Display) form (`mnist`, `cifar10`, `cifar100`) is
/// also the name of its folder under the data root, and [`FromStr`] accepts
/// it in any case, as well as `cifar-10` and `cifar-100`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// MNIST: 28x28 grey handwritten digits, 10 classes.
    Mnist,
    /// CIFAR-10: 32x32 colour images, 10 classes.
    Cifar10,
    /// CIFAR-100: 32x32 colour images, 100 fine classes.
    Cifar100,
}

impl DatasetKind {
    /// All kinds, in a fixed order.
    pub const ALL: [DatasetKind; 3] = [
        DatasetKind::Mnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
    ];

    /// The short name, which is also the folder name under the data root.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
        }
    }

    /// The number of classes.
    pub fn num_classes(self) -> usize {
        match self {
            DatasetKind::Mnist | DatasetKind::Cifar10 => 10,
            DatasetKind::Cifar100 => 100,
        }
    }

    /// The shape of one image as (channels, height, width).
    pub fn shape(self) -> (usize, usize, usize) {
        match self {
            DatasetKind::Mnist => (1, 28, 28),
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => (3, 32, 32),
        }
    }

    /// The normalisation the loader applies: the training set's per-channel
    /// statistics.
    pub fn normalization(self) -> Normalization {
        match self {
            DatasetKind::Mnist => Normalization::mnist(),
            DatasetKind::Cifar10 => Normalization::cifar10(),
            DatasetKind::Cifar100 => Normalization::cifar100(),
        }
    }

    /// Loads one split from `dir` (see [`load_mnist`](crate::load_mnist),
    /// [`load_cifar10`](crate::load_cifar10) and
    /// [`load_cifar100`](crate::load_cifar100) for what `dir` may be).
    pub fn load(self, dir: &Path, split: Split) -> Result<Dataset, DataError> {
        match self {
            DatasetKind::Mnist => mnist::load_mnist(dir, split),
            DatasetKind::Cifar10 => cifar::load_cifar10(dir, split),
            DatasetKind::Cifar100 => cifar::load_cifar100(dir, split),
        }
    }

    /// Whether `dir` holds the files of both splits (not whether they are
    /// valid: loading checks that).
    pub fn is_present(self, dir: &Path) -> bool {
        match self {
            DatasetKind::Mnist => mnist::MNIST_FILES
                .iter()
                .all(|name| mnist::find_file(dir, name).is_some()),
            DatasetKind::Cifar10 => cifar_present(dir, &cifar::CIFAR10),
            DatasetKind::Cifar100 => cifar_present(dir, &cifar::CIFAR100),
        }
    }

    /// Makes sure `dir` holds the data set, downloading it when it is missing
    /// and `download` is true.
    ///
    /// Without the `download` feature, or with `download` false, missing
    /// files give [`DataError::MissingFile`] with a hint on how to get them.
    pub fn ensure(self, dir: &Path, download: bool) -> Result<(), DataError> {
        if self.is_present(dir) {
            return Ok(());
        }
        if download {
            return fetch(self, dir);
        }
        Err(DataError::MissingFile {
            path: dir.to_path_buf(),
            hint: format!(
                "no {self} data there; pass the folder with --data, set {DATA_ENV} to a \
                 folder holding {self}/, or enable downloading"
            ),
        })
    }

    /// Writes one split in the data set's canonical layout under `dir`, so
    /// that [`load`](Self::load) reads it back.
    ///
    /// This is meant for tests and demonstrations on small synthetic data.
    /// `pixels` holds the images one after another, channel-major, as 8-bit
    /// values; `labels` one class per image. MNIST is written as raw IDX
    /// files; CIFAR as the unpacked record files, with CIFAR-10's training
    /// split spread over its five files (so it needs at least five images).
    pub fn write(
        self,
        dir: &Path,
        split: Split,
        pixels: &[u8],
        labels: &[u32],
    ) -> Result<(), DataError> {
        match self {
            DatasetKind::Mnist => mnist::write(dir, split, pixels, labels),
            DatasetKind::Cifar10 => cifar::write(&cifar::CIFAR10, dir, split, pixels, labels),
            DatasetKind::Cifar100 => cifar::write(&cifar::CIFAR100, dir, split, pixels, labels),
        }
    }
}

fn cifar_present(dir: &Path, spec: &cifar::Spec) -> bool {
    let unpacked = dir.join(spec.folder);
    dir.join(spec.archive).is_file()
        || spec.all_files().all(|name| unpacked.join(name).is_file())
        || spec.all_files().all(|name| dir.join(name).is_file())
}

#[cfg(feature = "download")]
fn fetch(kind: DatasetKind, dir: &Path) -> Result<(), DataError> {
    use crate::download;
    match kind {
        DatasetKind::Mnist => download::download_mnist(dir, download::MNIST_BASE_URL),
        DatasetKind::Cifar10 => download::download_cifar10(dir, download::CIFAR10_URL),
        DatasetKind::Cifar100 => download::download_cifar100(dir, download::CIFAR100_URL),
    }
}

#[cfg(not(feature = "download"))]
fn fetch(kind: DatasetKind, dir: &Path) -> Result<(), DataError> {
    Err(DataError::MissingFile {
        path: dir.to_path_buf(),
        hint: format!(
            "no {kind} data there, and this build cannot download it (it was built \
             without the `download` feature); pass the folder with --data or set {DATA_ENV}"
        ),
    })
}

/// Makes sure the MNIST files are in `dir`, downloading them from the
/// default mirror when they are missing and `download` is true.
///
/// The same as [`DatasetKind::Mnist.ensure(dir, download)`](DatasetKind::ensure).
pub fn ensure_mnist(dir: &Path, download: bool) -> Result<(), DataError> {
    DatasetKind::Mnist.ensure(dir, download)
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "mnist" => Ok(DatasetKind::Mnist),
            "cifar10" | "cifar-10" => Ok(DatasetKind::Cifar10),
            "cifar100" | "cifar-100" => Ok(DatasetKind::Cifar100),
            _ => Err(DataError::UnknownDataset { name: s.to_owned() }),
        }
    }
}

/// Decides which folder a data set is read from.
///
/// In order of precedence:
///
/// 1. `explicit`, typically a `--data` argument, used as it is: it must be
///    the data set's own folder (for example `~/data/mnist`), not the root;
/// 2. `$NOPROP_DATA/<kind>` when the [`DATA_ENV`] variable is set and not
///    empty: the variable names a root holding `mnist/`, `cifar10/` and
///    `cifar100/`;
/// 3. `./data/<kind>`, relative to the working directory.
///
/// Nothing is checked on disk; the loaders report missing files.
pub fn resolve_data_dir(kind: DatasetKind, explicit: Option<&Path>) -> PathBuf {
    resolve_with_env(kind, explicit, std::env::var_os(DATA_ENV))
}

fn resolve_with_env(kind: DatasetKind, explicit: Option<&Path>, env: Option<OsString>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    match env {
        Some(root) if !root.is_empty() => PathBuf::from(root).join(kind.name()),
        _ => Path::new("data").join(kind.name()),
    }
}

/// Converts labels to the single bytes the file formats store, checking them
/// against the number of classes.
pub(crate) fn labels_as_bytes(labels: &[u32], classes: usize) -> Result<Vec<u8>, DataError> {
    labels
        .iter()
        .enumerate()
        .map(|(index, &label)| {
            u8::try_from(label)
                .ok()
                .filter(|&byte| usize::from(byte) < classes)
                .ok_or(DataError::InvalidLabel {
                    index,
                    label,
                    classes,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in DatasetKind::ALL {
            assert_eq!(kind.to_string().parse::<DatasetKind>().unwrap(), kind);
        }
        assert_eq!(
            "CIFAR-100".parse::<DatasetKind>().unwrap(),
            DatasetKind::Cifar100
        );
        assert!(matches!(
            "imagenet".parse::<DatasetKind>(),
            Err(DataError::UnknownDataset { name }) if name == "imagenet"
        ));
        assert_eq!("Test".parse::<Split>().unwrap(), Split::Test);
        assert_eq!(Split::Train.to_string(), "train");
        assert!("val".parse::<Split>().is_err());
    }

    #[test]
    fn facts_are_consistent() {
        for kind in DatasetKind::ALL {
            let (c, _, _) = kind.shape();
            assert!(kind.normalization().validate(c).is_ok());
        }
        assert_eq!(DatasetKind::Cifar100.num_classes(), 100);
        assert_eq!(DatasetKind::Mnist.shape(), (1, 28, 28));
    }

    #[test]
    fn data_dir_precedence() {
        let explicit = Path::new("/somewhere/mnist");
        assert_eq!(
            resolve_with_env(DatasetKind::Mnist, Some(explicit), Some("/root".into())),
            explicit
        );
        assert_eq!(
            resolve_with_env(DatasetKind::Cifar10, None, Some("/root".into())),
            Path::new("/root/cifar10")
        );
        assert_eq!(
            resolve_with_env(DatasetKind::Cifar100, None, Some("".into())),
            Path::new("data/cifar100")
        );
        assert_eq!(
            resolve_with_env(DatasetKind::Mnist, None, None),
            Path::new("data/mnist")
        );
    }

    #[test]
    fn missing_data_without_download_is_a_missing_file_error() {
        let dir = tempfile::tempdir().unwrap();
        for kind in DatasetKind::ALL {
            assert!(!kind.is_present(dir.path()));
            let err = kind.ensure(dir.path(), false).unwrap_err();
            assert!(matches!(err, DataError::MissingFile { .. }), "{err}");
            assert!(err.to_string().contains(DATA_ENV), "{err}");
        }
    }
}

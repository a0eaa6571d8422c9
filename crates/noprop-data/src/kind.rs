//! The dispatcher: loading, checking, fetching and writing a data set by
//! its [`DatasetKind`], and deciding where its files live.
//!
//! This is the top of the crate's module graph. It imports the catalog and
//! the format modules; none of them imports it, so the facts about a data set
//! live in the catalog and the code for a file format in its own module.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::catalog::{DatasetKind, Layout};
use crate::dataset::Dataset;
use crate::error::DataError;
use crate::split::Split;
use crate::{cifar, mnist, verify};

/// The environment variable naming the data root: a folder holding `mnist/`,
/// `cifar10/` and `cifar100/`.
pub const DATA_ENV: &str = "NOPROP_DATA";

impl DatasetKind {
    /// Loads one split from `dir` (see [`load_mnist`](crate::load_mnist),
    /// [`load_cifar10`](crate::load_cifar10) and
    /// [`load_cifar100`](crate::load_cifar100) for what `dir` may be).
    ///
    /// A split with no examples is an error naming the file, never an empty
    /// [`Dataset`].
    pub fn load(self, dir: &Path, split: Split) -> Result<Dataset, DataError> {
        let spec = self.spec();
        match &spec.layout {
            Layout::Idx(layout) => mnist::load(spec, layout, dir, split),
            Layout::Cifar(layout) => cifar::load(spec, layout, dir, split),
        }
    }

    /// Whether `dir` holds the files of both splits (not whether they are
    /// valid: loading checks that).
    pub fn is_present(self, dir: &Path) -> bool {
        match &self.spec().layout {
            Layout::Idx(layout) => mnist::is_present(layout, dir),
            Layout::Cifar(layout) => cifar::is_present(layout, dir),
        }
    }

    /// Makes sure `dir` holds the data set.
    ///
    /// With `download` false this only checks that the files are there
    /// ([`is_present`](Self::is_present)), and missing files give
    /// [`DataError::MissingFile`] with a hint on how to get them. It does not
    /// compare checksums: a data set written by [`write`](Self::write) (tests,
    /// demonstrations, a user's own data in the same format) is a valid input
    /// to training but can never match the published files, and loading
    /// checks every header, length and label anyway. Hashing itself would be
    /// cheap: MNIST's four files decompress and hash in about a quarter of a
    /// second.
    ///
    /// With `download` true it makes sure `dir` holds the *official* data
    /// set: every published file already there is verified against the
    /// catalog's checksum (the SHA-256 of MNIST's decompressed content, the
    /// MD5 of a CIFAR archive; unpacked CIFAR files, which have no published
    /// checksum, must have the official sizes), and a corrupt one is a
    /// [`DataError::Checksum`] (or size) error naming it, never replaced.
    /// Missing files are then downloaded when the `download` feature is on,
    /// and reported as [`DataError::MissingFile`] when it is off.
    pub fn ensure(self, dir: &Path, download: bool) -> Result<(), DataError> {
        if !download {
            if self.is_present(dir) {
                return Ok(());
            }
            return Err(DataError::MissingFile {
                path: dir.to_path_buf(),
                hint: format!(
                    "no {self} data there; pass the folder with --data, set {DATA_ENV} to a \
                     folder holding {self}/, or enable downloading"
                ),
            });
        }
        let missing = verify::verify_present(self.spec(), dir)?;
        if missing.is_empty() {
            return Ok(());
        }
        fetch(self, dir, &missing)
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
        let spec = self.spec();
        match &spec.layout {
            Layout::Idx(layout) => mnist::write(spec, layout, dir, split, pixels, labels),
            Layout::Cifar(layout) => cifar::write(spec, layout, dir, split, pixels, labels),
        }
    }
}

#[cfg(feature = "download")]
fn fetch(kind: DatasetKind, dir: &Path, _missing: &[String]) -> Result<(), DataError> {
    crate::download::download(kind, dir)
}

#[cfg(not(feature = "download"))]
fn fetch(kind: DatasetKind, dir: &Path, missing: &[String]) -> Result<(), DataError> {
    Err(DataError::MissingFile {
        path: verify::missing_paths(dir, missing),
        hint: format!(
            "{} of the {kind} files missing, and this build cannot download them (it was \
             built without the `download` feature); pass the folder with --data or set {DATA_ENV}",
            missing.len()
        ),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// `ensure(dir, true)` is what `noprop data download` calls: files that
    /// are present must be verified, not trusted because they exist.
    #[test]
    fn ensure_with_download_reports_a_corrupt_present_file_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let pixels = vec![0u8; 2 * 784];
        for split in Split::ALL {
            DatasetKind::Mnist
                .write(dir.path(), split, &pixels, &[1, 2])
                .unwrap();
        }
        // Present and well-formed, so training may use them...
        DatasetKind::Mnist.ensure(dir.path(), false).unwrap();
        // ...but they are not the published files.
        let err = DatasetKind::Mnist.ensure(dir.path(), true).unwrap_err();
        assert!(
            matches!(&err, DataError::Checksum { location, .. } if location.ends_with("train-images-idx3-ubyte")),
            "{err}"
        );

        // A CIFAR archive that is not the published one.
        let cifar = tempfile::tempdir().unwrap();
        std::fs::write(cifar.path().join("cifar-10-binary.tar.gz"), b"not it").unwrap();
        let err = DatasetKind::Cifar10.ensure(cifar.path(), true).unwrap_err();
        assert!(
            matches!(&err, DataError::Checksum { location, .. } if location.ends_with("cifar-10-binary.tar.gz")),
            "{err}"
        );

        // Unpacked CIFAR files have no published checksum, but a file cut
        // short is caught by its size.
        let unpacked = tempfile::tempdir().unwrap();
        let pixels = vec![0u8; 5 * 3072];
        for split in Split::ALL {
            DatasetKind::Cifar10
                .write(unpacked.path(), split, &pixels, &[0, 1, 2, 3, 4])
                .unwrap();
        }
        let err = DatasetKind::Cifar10
            .ensure(unpacked.path(), true)
            .unwrap_err();
        assert!(
            matches!(&err, DataError::Truncated { path, .. } if path.ends_with("data_batch_1.bin")),
            "{err}"
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

//! CIFAR-10 and CIFAR-100 in their canonical binary versions.
//!
//! Both are files of fixed-size records. A CIFAR-10 record is one label byte
//! and 3,072 pixel bytes: the 32x32 red plane, then green, then blue, each row
//! by row. A CIFAR-100 record has two label bytes, the coarse (20 classes)
//! and then the fine (100 classes) label, before the same 3,072 pixel bytes.
//! The official files hold 10,000 records each (CIFAR-100's `train.bin`
//! 50,000), but any whole number of records is accepted so that small test
//! files work the same way.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::PixelTable;
use crate::files::open_maybe_gz;
use crate::{DataError, Dataset, Normalization, Split};

/// The side of a CIFAR image in pixels.
const SIDE: usize = 32;
/// The number of pixel bytes in one record.
const PIXELS: usize = 3 * SIDE * SIDE;

/// What tells the two CIFAR variants apart.
pub(crate) struct Spec {
    /// The name used in messages.
    name: &'static str,
    /// The folder name used by the NOPROP_DATA layout, for hints.
    data_subdir: &'static str,
    /// The folder the official archive unpacks to.
    pub(crate) folder: &'static str,
    /// The official archive's file name.
    pub(crate) archive: &'static str,
    train: &'static [&'static str],
    test: &'static [&'static str],
    /// The number of coarse classes, for CIFAR-100's extra label byte.
    coarse_classes: Option<usize>,
    /// The number of classes of the label that is kept.
    classes: usize,
}

/// CIFAR-10's layout.
pub(crate) const CIFAR10: Spec = Spec {
    name: "CIFAR-10",
    data_subdir: "cifar10",
    folder: "cifar-10-batches-bin",
    archive: "cifar-10-binary.tar.gz",
    train: &[
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ],
    test: &["test_batch.bin"],
    coarse_classes: None,
    classes: 10,
};

/// CIFAR-100's layout.
pub(crate) const CIFAR100: Spec = Spec {
    name: "CIFAR-100",
    data_subdir: "cifar100",
    folder: "cifar-100-binary",
    archive: "cifar-100-binary.tar.gz",
    train: &["train.bin"],
    test: &["test.bin"],
    coarse_classes: Some(20),
    classes: 100,
};

impl Spec {
    fn files(&self, split: Split) -> &'static [&'static str] {
        match split {
            Split::Train => self.train,
            Split::Test => self.test,
        }
    }

    /// Every file of both splits.
    pub(crate) fn all_files(&self) -> impl Iterator<Item = &'static str> {
        self.train.iter().chain(self.test).copied()
    }

    fn label_bytes(&self) -> usize {
        if self.coarse_classes.is_some() {
            2
        } else {
            1
        }
    }

    fn record_len(&self) -> usize {
        self.label_bytes() + PIXELS
    }

    fn normalization(&self) -> Normalization {
        if self.coarse_classes.is_some() {
            Normalization::cifar100()
        } else {
            Normalization::cifar10()
        }
    }
}

/// Where the files of one data set are.
pub(crate) enum Source {
    /// A folder holding the record files themselves.
    Dir(PathBuf),
    /// The official `.tar.gz` archive (or an uncompressed `.tar`).
    Archive(PathBuf),
}

/// Finds the data: `dir` may be an archive, a folder holding the unpacked
/// folder, the unpacked folder itself, or a folder holding the archive, tried
/// in that order.
pub(crate) fn locate(dir: &Path, spec: &Spec, split: Split) -> Result<Source, DataError> {
    if dir.is_file() {
        return Ok(Source::Archive(dir.to_path_buf()));
    }
    let unpacked = dir.join(spec.folder);
    if unpacked.is_dir() {
        return Ok(Source::Dir(unpacked));
    }
    if spec
        .files(split)
        .iter()
        .all(|name| dir.join(name).is_file())
    {
        return Ok(Source::Dir(dir.to_path_buf()));
    }
    let archive = dir.join(spec.archive);
    if archive.is_file() {
        return Ok(Source::Archive(archive));
    }
    Err(DataError::MissingFile {
        path: unpacked,
        hint: format!(
            "expected {}/ or {} in {}; pass the folder with --data, set NOPROP_DATA \
             to a folder holding {}/, or enable downloading",
            spec.folder,
            spec.archive,
            dir.display(),
            spec.data_subdir
        ),
    })
}

/// Reads the named files from a source, in the order given, each with the
/// path that errors should name.
fn read_files(
    source: &Source,
    spec: &Spec,
    names: &[&str],
) -> Result<Vec<(PathBuf, Vec<u8>)>, DataError> {
    match source {
        Source::Dir(dir) => names
            .iter()
            .map(|name| {
                let path = dir.join(name);
                if !path.is_file() {
                    return Err(DataError::MissingFile {
                        hint: format!(
                            "the {} folder {} is incomplete; unpack {} again",
                            spec.name,
                            dir.display(),
                            spec.archive
                        ),
                        path,
                    });
                }
                let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
                Ok((path, bytes))
            })
            .collect(),
        Source::Archive(archive) => {
            let mut found = read_members(archive, spec.folder, names)?;
            names
                .iter()
                .zip(found.iter_mut())
                .map(|(name, bytes)| {
                    let path = archive.join(spec.folder).join(name);
                    match bytes.take() {
                        Some(bytes) => Ok((path, bytes)),
                        None => Err(DataError::MissingFile {
                            path,
                            hint: format!(
                                "the archive has no member {}/{name}; is it the official {} archive?",
                                spec.folder, spec.archive
                            ),
                        }),
                    }
                })
                .collect()
        }
    }
}

/// Reads the members `folder/name` of a tar archive, gzip-compressed or not,
/// stopping as soon as all are found.
pub(crate) fn read_members(
    archive: &Path,
    folder: &str,
    names: &[&str],
) -> Result<Vec<Option<Vec<u8>>>, DataError> {
    let io_err = |e| DataError::io(archive, e);
    let reader = open_maybe_gz(archive).map_err(io_err)?;
    let wanted: Vec<PathBuf> = names
        .iter()
        .map(|name| Path::new(folder).join(name))
        .collect();
    let mut found: Vec<Option<Vec<u8>>> = vec![None; names.len()];
    let mut tar = tar::Archive::new(reader);
    for entry in tar.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(io_err)?.into_owned();
        let Some(slot) = wanted.iter().position(|w| path.ends_with(w)) else {
            continue;
        };
        // The size comes from the archive, so it only guides the first
        // allocation up to a sane bound.
        let size = usize::try_from(entry.size()).unwrap_or(0).min(1 << 30);
        let mut bytes = Vec::with_capacity(size);
        entry.read_to_end(&mut bytes).map_err(io_err)?;
        found[slot] = Some(bytes);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    Ok(found)
}

/// Loads one split of CIFAR-10 from its binary version.
///
/// `dir` may be the folder that holds `cifar-10-batches-bin/`, that folder
/// itself, a folder holding the official `cifar-10-binary.tar.gz`, or the
/// path of that archive; the archive is read directly, without unpacking it
/// to disk. The training split is `data_batch_1.bin` to `data_batch_5.bin`
/// in that order, the test split `test_batch.bin`. Pixels are normalised
/// with CIFAR-10's training statistics ([`Normalization::cifar10`]).
pub fn load_cifar10(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    load(dir, split, &CIFAR10)
}

/// Loads one split of CIFAR-100 from its binary version, with its 100 fine
/// labels.
///
/// `dir` may be the folder that holds `cifar-100-binary/`, that folder
/// itself, a folder holding the official `cifar-100-binary.tar.gz`, or the
/// path of that archive. The training split is `train.bin`, the test split
/// `test.bin`. The coarse labels are checked (below 20) and then dropped.
/// Pixels are normalised with CIFAR-100's training statistics
/// ([`Normalization::cifar100`]).
pub fn load_cifar100(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    load(dir, split, &CIFAR100)
}

fn load(dir: &Path, split: Split, spec: &Spec) -> Result<Dataset, DataError> {
    let source = locate(dir, spec, split)?;
    let files = read_files(&source, spec, spec.files(split))?;
    let record_len = spec.record_len();
    for (path, bytes) in &files {
        if bytes.is_empty() {
            return Err(DataError::NoRecords { path: path.clone() });
        }
        if bytes.len() % record_len != 0 {
            return Err(DataError::PartialRecord {
                path: path.clone(),
                len: bytes.len() as u64,
                record_len,
            });
        }
    }

    let count: usize = files
        .iter()
        .map(|(_, bytes)| bytes.len() / record_len)
        .sum();
    let table = PixelTable::new(&spec.normalization(), 3)?;
    let mut images = Vec::with_capacity(count * PIXELS);
    let mut labels = Vec::with_capacity(count);
    let label_at = spec.label_bytes() - 1;
    for (path, bytes) in &files {
        for (index, record) in bytes.chunks_exact(record_len).enumerate() {
            let out_of_range = |label: u8, classes: usize| DataError::LabelOutOfRange {
                path: path.clone(),
                index,
                label: u32::from(label),
                classes,
            };
            if let Some(coarse) = spec.coarse_classes {
                if usize::from(record[0]) >= coarse {
                    return Err(out_of_range(record[0], coarse));
                }
            }
            let label = record[label_at];
            if usize::from(label) >= spec.classes {
                return Err(out_of_range(label, spec.classes));
            }
            labels.push(u32::from(label));
            table.extend(&mut images, &record[label_at + 1..]);
        }
    }
    Ok(Dataset {
        images,
        labels,
        channels: 3,
        height: SIDE,
        width: SIDE,
        num_classes: spec.classes,
    })
}

/// Writes one split in the unpacked binary layout under `dir/<folder>/`.
///
/// The training split of CIFAR-10 is spread over its five files as evenly as
/// possible, so it needs at least five examples. CIFAR-100's coarse label is
/// written as `fine / 5`, a stand-in for the real grouping, which the loader
/// checks for range and otherwise ignores.
pub(crate) fn write(
    spec: &Spec,
    dir: &Path,
    split: Split,
    pixels: &[u8],
    labels: &[u32],
) -> Result<(), DataError> {
    let n = labels.len();
    if pixels.len() != n * PIXELS {
        return Err(DataError::ShapeMismatch {
            pixels: pixels.len(),
            labels: n,
            image_len: PIXELS,
        });
    }
    let labels = crate::kind::labels_as_bytes(labels, spec.classes)?;
    let folder = dir.join(spec.folder);
    std::fs::create_dir_all(&folder).map_err(|e| DataError::io(&folder, e))?;
    let names = spec.files(split);
    for (k, name) in names.iter().enumerate() {
        let path = folder.join(name);
        let range = k * n / names.len()..(k + 1) * n / names.len();
        if range.is_empty() {
            return Err(DataError::NoRecords { path });
        }
        let mut bytes = Vec::with_capacity(range.len() * spec.record_len());
        for i in range {
            if spec.coarse_classes.is_some() {
                bytes.push(labels[i] / 5);
            }
            bytes.push(labels[i]);
            bytes.extend_from_slice(&pixels[i * PIXELS..(i + 1) * PIXELS]);
        }
        std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))?;
    }
    Ok(())
}

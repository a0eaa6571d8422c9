//! MNIST in its canonical IDX files.

use std::path::{Path, PathBuf};

use crate::dataset::PixelTable;
use crate::files::read_maybe_gz;
use crate::{idx, DataError, Dataset, Normalization, Split};

/// The side of an MNIST image in pixels.
const SIDE: usize = 28;
/// The number of MNIST classes (the digits).
const CLASSES: usize = 10;

/// The canonical names of the four MNIST files, without `.gz`: train images,
/// train labels, test images, test labels.
pub const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// The image and label file names of a split, without `.gz`.
pub(crate) fn file_names(split: Split) -> (&'static str, &'static str) {
    match split {
        Split::Train => (MNIST_FILES[0], MNIST_FILES[1]),
        Split::Test => (MNIST_FILES[2], MNIST_FILES[3]),
    }
}

/// Finds `name` or `name.gz` in `dir`, preferring the uncompressed file,
/// which loads faster.
pub(crate) fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Some(raw);
    }
    let gz = dir.join(format!("{name}.gz"));
    gz.is_file().then_some(gz)
}

fn locate(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    find_file(dir, name).ok_or_else(|| DataError::MissingFile {
        path: dir.join(format!("{name}.gz")),
        hint: format!(
            "expected {name} or {name}.gz in {}; pass the folder with --data, set \
             NOPROP_DATA to a folder holding mnist/, or enable downloading",
            dir.display()
        ),
    })
}

/// Loads one split of MNIST from a folder holding the canonical IDX files.
///
/// Each of `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` may be raw or
/// gzip-compressed (`.gz` appended); where both exist the raw file is read.
/// The files are checked: magic numbers, 28x28 images, as many labels as
/// images, and labels below 10. Pixels are normalised with MNIST's training
/// statistics ([`Normalization::mnist`]).
pub fn load_mnist(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let (images_name, labels_name) = file_names(split);
    let images_path = locate(dir, images_name)?;
    let labels_path = locate(dir, labels_name)?;

    let label_bytes = read_maybe_gz(&labels_path)?;
    let (label_dims, labels) = idx::parse(&label_bytes, &labels_path, idx::LABELS_MAGIC)?;
    let image_bytes = read_maybe_gz(&images_path)?;
    let (image_dims, pixels) = idx::parse(&image_bytes, &images_path, idx::IMAGES_MAGIC)?;

    // The magic numbers already fixed the number of dimensions, so only the
    // image size remains to check.
    if image_dims[1..] != [SIDE, SIDE] {
        return Err(DataError::BadDims {
            path: images_path,
            expected: vec![image_dims[0], SIDE, SIDE],
            found: image_dims,
        });
    }
    if image_dims[0] != label_dims[0] {
        return Err(DataError::CountMismatch {
            images_path,
            images: image_dims[0],
            labels_path,
            labels: label_dims[0],
        });
    }
    let labels = checked_labels(labels, &labels_path)?;

    let table = PixelTable::new(&Normalization::mnist(), 1)?;
    let mut images = Vec::with_capacity(pixels.len());
    table.extend(&mut images, pixels);
    Ok(Dataset {
        images,
        labels,
        channels: 1,
        height: SIDE,
        width: SIDE,
        num_classes: CLASSES,
    })
}

fn checked_labels(labels: &[u8], path: &Path) -> Result<Vec<u32>, DataError> {
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= CLASSES)
    {
        return Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label: u32::from(label),
            classes: CLASSES,
        });
    }
    Ok(labels.iter().map(|&l| u32::from(l)).collect())
}

/// Writes one split in the canonical uncompressed IDX layout that
/// [`load_mnist`] reads.
pub(crate) fn write(
    dir: &Path,
    split: Split,
    pixels: &[u8],
    labels: &[u32],
) -> Result<(), DataError> {
    let n = labels.len();
    if pixels.len() != n * SIDE * SIDE {
        return Err(DataError::ShapeMismatch {
            pixels: pixels.len(),
            labels: n,
            image_len: SIDE * SIDE,
        });
    }
    let labels = crate::kind::labels_as_bytes(labels, CLASSES)?;
    let (images_name, labels_name) = file_names(split);
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let write = |name: &str, bytes: Vec<u8>| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))
    };
    write(images_name, idx::encode(&[n, SIDE, SIDE], pixels))?;
    write(labels_name, idx::encode(&[n], &labels))
}

//! Data sets stored as IDX files, like MNIST: one image file and one label
//! file per split, each raw or gzip-compressed.
//!
//! Everything specific to a data set (file names, image size, classes,
//! normalisation) comes from its [`DatasetSpec`] in the catalog.

use std::path::{Path, PathBuf};

use crate::catalog::{DatasetKind, DatasetSpec, IdxLayout, MNIST_LAYOUT};
use crate::dataset::Dataset;
use crate::error::DataError;
use crate::files::find_raw_or_gz;
use crate::idx;
use crate::labels::{labels_as_bytes, labels_from_bytes};
use crate::normalization::{Normalization, PixelTable};
use crate::split::Split;

fn locate(dir: &Path, name: &str, spec: &DatasetSpec) -> Result<PathBuf, DataError> {
    find_raw_or_gz(dir, name).ok_or_else(|| DataError::MissingFile {
        path: dir.join(format!("{name}.gz")),
        hint: format!(
            "expected {name} or {name}.gz in {}; pass the folder with --data, set \
             NOPROP_DATA to a folder holding {}/, or enable downloading",
            dir.display(),
            spec.name
        ),
    })
}

/// Whether `dir` holds both files of both splits, raw or gzipped (not
/// whether they are valid: loading checks that).
pub(crate) fn is_present(layout: &IdxLayout, dir: &Path) -> bool {
    layout
        .files
        .iter()
        .all(|file| find_raw_or_gz(dir, file.stem).is_some())
}

/// Loads one split of MNIST from a folder holding the canonical IDX files.
///
/// Each of `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` may be raw or
/// gzip-compressed (`.gz` appended); where both exist the raw file is read.
/// The files are checked: magic numbers, 28x28 images, as many labels as
/// images, at least one image, and labels below 10. Pixels are normalised
/// with MNIST's training statistics ([`Normalization::mnist`]).
pub fn load_mnist(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    load(DatasetKind::Mnist.spec(), &MNIST_LAYOUT, dir, split)
}

/// Loads one split of an IDX data set.
pub(crate) fn load(
    spec: &DatasetSpec,
    layout: &IdxLayout,
    dir: &Path,
    split: Split,
) -> Result<Dataset, DataError> {
    let (images_file, labels_file) = layout.split_files(split);
    let images_path = locate(dir, images_file.stem, spec)?;
    let labels_path = locate(dir, labels_file.stem, spec)?;

    let (label_dims, labels) = idx::read(&labels_path, idx::LABELS_MAGIC)?;
    let (image_dims, pixels) = idx::read(&images_path, idx::IMAGES_MAGIC)?;

    // The magic numbers already fixed the number of dimensions, and MNIST's
    // images are grey, so only the image size remains to check.
    if spec.channels != 1 || image_dims[1..] != [spec.height, spec.width] {
        return Err(DataError::BadDims {
            path: images_path,
            expected: vec![image_dims[0], spec.height, spec.width],
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
    // A data set of no images would only fail later, far from its cause (a
    // division by zero in an epoch's mean loss, an empty batch loop).
    if image_dims[0] == 0 {
        return Err(DataError::NoRecords { path: images_path });
    }
    let labels = labels_from_bytes(&labels, spec.num_classes, &labels_path)?;

    let table = PixelTable::new(&Normalization::of(spec), 1)?;
    let mut images = Vec::with_capacity(pixels.len());
    table.extend(&mut images, &pixels);
    Ok(Dataset {
        images,
        labels,
        channels: 1,
        height: spec.height,
        width: spec.width,
        num_classes: spec.num_classes,
    })
}

/// Writes one split in the canonical uncompressed IDX layout that [`load`]
/// reads.
pub(crate) fn write(
    spec: &DatasetSpec,
    layout: &IdxLayout,
    dir: &Path,
    split: Split,
    pixels: &[u8],
    labels: &[u32],
) -> Result<(), DataError> {
    let n = labels.len();
    let image_len = spec.image_len();
    if Some(pixels.len()) != n.checked_mul(image_len) {
        return Err(DataError::ShapeMismatch {
            pixels: pixels.len(),
            labels: n,
            image_len,
        });
    }
    let labels = labels_as_bytes(labels, spec.num_classes)?;
    let (images_file, labels_file) = layout.split_files(split);
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let write = |name: &str, bytes: Vec<u8>| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))
    };
    write(
        images_file.stem,
        idx::encode(&[n, spec.height, spec.width], pixels),
    )?;
    write(labels_file.stem, idx::encode(&[n], &labels))
}

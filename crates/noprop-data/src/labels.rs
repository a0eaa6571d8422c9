//! Checking labels against a number of classes, shared by the format
//! readers and writers.
//!
//! This is a leaf module so that the IDX and CIFAR modules can share it
//! without importing each other or the dispatcher.

use std::path::Path;

use crate::error::DataError;

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

/// Converts label bytes read from `path` to class indices, checking each
/// against the number of classes.
pub(crate) fn labels_from_bytes(
    labels: &[u8],
    classes: usize,
    path: &Path,
) -> Result<Vec<u32>, DataError> {
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= classes)
    {
        return Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label: u32::from(label),
            classes,
        });
    }
    Ok(labels.iter().map(|&l| u32::from(l)).collect())
}

//! Verifying the files already on disk against the catalog's checksums.
//!
//! Hashing streams the content through a fixed buffer, so a corrupt or
//! hostile file costs time in proportion to its size but no memory. MNIST's
//! four files decompress to 55 MB, which hashes in well under a second.

use std::fmt::Display;
use std::fs::File;
use std::path::{Path, PathBuf};

use md5::Md5;
use sha2::{Digest, Sha256};

use crate::catalog::{CifarLayout, DatasetSpec, IdxLayout, Layout};
use crate::error::DataError;
use crate::files::{check_claim, find_raw_or_gz, open_maybe_gz};
use crate::split::Split;

/// Verifies every file of `spec` that is present in `dir`, and returns the
/// published files that are missing (by their published name), so that a
/// caller can fetch them or report them.
///
/// A file that is present but wrong is an error naming it, whatever else is
/// missing: it is never silently replaced or trusted.
pub(crate) fn verify_present(spec: &DatasetSpec, dir: &Path) -> Result<Vec<String>, DataError> {
    match &spec.layout {
        Layout::Idx(layout) => verify_idx(layout, dir),
        Layout::Cifar(layout) => verify_cifar(spec, layout, dir),
    }
}

fn verify_idx(layout: &IdxLayout, dir: &Path) -> Result<Vec<String>, DataError> {
    let mut missing = Vec::new();
    for file in &layout.files {
        match find_raw_or_gz(dir, file.stem) {
            Some(path) => check(path.display(), file.sha256, sha256_of_content(&path)?)?,
            None => missing.push(format!("{}.gz", file.stem)),
        }
    }
    Ok(missing)
}

/// CIFAR publishes a checksum for its archive only. An archive on disk is
/// checked against it; unpacked record files, which have no published
/// checksum, are checked to have exactly the official size, which catches
/// truncated and concatenated files though not flipped bits.
fn verify_cifar(
    spec: &DatasetSpec,
    layout: &CifarLayout,
    dir: &Path,
) -> Result<Vec<String>, DataError> {
    let archive = dir.join(layout.archive);
    let archive_present = archive.is_file();
    if archive_present {
        check(archive.display(), layout.md5, md5_of(&archive)?)?;
    }
    let unpacked = [dir.join(layout.folder), dir.to_path_buf()]
        .into_iter()
        .find(|folder| layout.all_files().all(|name| folder.join(name).is_file()));
    if let Some(folder) = &unpacked {
        verify_record_sizes(spec, layout, folder)?;
    }
    if archive_present || unpacked.is_some() {
        Ok(Vec::new())
    } else {
        Ok(vec![layout.archive.to_owned()])
    }
}

/// Checks that each unpacked record file has the official number of records.
pub(crate) fn verify_record_sizes(
    spec: &DatasetSpec,
    layout: &CifarLayout,
    folder: &Path,
) -> Result<(), DataError> {
    let record_len = (layout.label_bytes() + spec.image_len()) as u64;
    for split in Split::ALL {
        let official = layout.records_per_file(split) as u64 * record_len;
        for name in layout.split_files(split) {
            let path = folder.join(name);
            let len = std::fs::metadata(&path)
                .map_err(|e| DataError::io(&path, e))?
                .len();
            check_claim(&path, official, len, false)?;
        }
    }
    Ok(())
}

/// The SHA-256 of a file's content, decompressed first if it is gzip.
pub(crate) fn sha256_of_content(path: &Path) -> Result<String, DataError> {
    let mut opened = open_maybe_gz(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut opened.reader, &mut hasher).map_err(|e| DataError::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

/// The MD5 of a file's bytes as they are.
pub(crate) fn md5_of(path: &Path) -> Result<String, DataError> {
    let io_err = |e| DataError::io(path, e);
    let mut hasher = Md5::new();
    std::io::copy(&mut File::open(path).map_err(io_err)?, &mut hasher).map_err(io_err)?;
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares a computed checksum with the expected one, naming `location` (a
/// file or a URL) when they differ.
pub(crate) fn check(
    location: impl Display,
    expected: &str,
    found: String,
) -> Result<(), DataError> {
    if found.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(DataError::Checksum {
            location: location.to_string(),
            expected: expected.to_ascii_lowercase(),
            found,
        })
    }
}

/// The path a missing-files error names: the first missing file's, or the
/// folder's when the list is empty.
#[cfg_attr(feature = "download", allow(dead_code))]
pub(crate) fn missing_paths(dir: &Path, missing: &[String]) -> PathBuf {
    missing
        .first()
        .map_or_else(|| dir.to_path_buf(), |name| dir.join(name))
}

//! Data sets stored like CIFAR-10 and CIFAR-100's binary versions.
//!
//! Both are files of fixed-size records. A CIFAR-10 record is one label byte
//! and 3,072 pixel bytes: the 32x32 red plane, then green, then blue, each row
//! by row. A CIFAR-100 record has two label bytes, the coarse (20 classes)
//! and then the fine (100 classes) label, before the same 3,072 pixel bytes.
//! The official files hold 10,000 records each (CIFAR-100's `train.bin`
//! 50,000), but any whole, non-zero number of records is accepted so that
//! small test files work the same way. Everything specific to a data set
//! comes from its [`DatasetSpec`] in the catalog.

use std::path::{Path, PathBuf};

use crate::catalog::{CifarLayout, DatasetKind, DatasetSpec, CIFAR100_LAYOUT, CIFAR10_LAYOUT};
use crate::dataset::Dataset;
use crate::error::DataError;
use crate::files::{
    check_claim, content_bound, open_maybe_gz, read_exact_vec, Bounded, MAX_FILE_LEN,
};
use crate::labels::labels_as_bytes;
use crate::normalization::{Normalization, PixelTable};
use crate::split::Split;

/// The number of bytes in one record of `layout` for images of `spec`.
fn record_len(spec: &DatasetSpec, layout: &CifarLayout) -> usize {
    layout.label_bytes() + spec.image_len()
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
pub(crate) fn locate(
    dir: &Path,
    spec: &DatasetSpec,
    layout: &CifarLayout,
    split: Split,
) -> Result<Source, DataError> {
    if dir.is_file() {
        return Ok(Source::Archive(dir.to_path_buf()));
    }
    let unpacked = dir.join(layout.folder);
    if unpacked.is_dir() {
        return Ok(Source::Dir(unpacked));
    }
    if layout
        .split_files(split)
        .iter()
        .all(|name| dir.join(name).is_file())
    {
        return Ok(Source::Dir(dir.to_path_buf()));
    }
    let archive = dir.join(layout.archive);
    if archive.is_file() {
        return Ok(Source::Archive(archive));
    }
    Err(DataError::MissingFile {
        path: unpacked,
        hint: format!(
            "expected {}/ or {} in {}; pass the folder with --data, set NOPROP_DATA \
             to a folder holding {}/, or enable downloading",
            layout.folder,
            layout.archive,
            dir.display(),
            spec.name
        ),
    })
}

/// Whether `dir` holds the archive or every record file of both splits (not
/// whether they are valid: loading checks that).
pub(crate) fn is_present(layout: &CifarLayout, dir: &Path) -> bool {
    let unpacked = dir.join(layout.folder);
    dir.join(layout.archive).is_file()
        || layout.all_files().all(|name| unpacked.join(name).is_file())
        || layout.all_files().all(|name| dir.join(name).is_file())
}

/// Checks a record file's size, as a folder entry or an archive header gives
/// it, before anything is allocated for it.
fn check_records(path: &Path, len: u64, record_len: usize) -> Result<(), DataError> {
    if len == 0 {
        return Err(DataError::NoRecords {
            path: path.to_path_buf(),
        });
    }
    if len > MAX_FILE_LEN {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            claimed: len,
            limit: MAX_FILE_LEN,
        });
    }
    if !len.is_multiple_of(record_len as u64) {
        return Err(DataError::PartialRecord {
            path: path.to_path_buf(),
            len,
            record_len,
        });
    }
    Ok(())
}

/// Reads one record file from a folder, checking its size first.
fn read_record_file(path: &Path, record_len: usize) -> Result<Vec<u8>, DataError> {
    let io_err = |e| DataError::io(path, e);
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    check_records(path, len, record_len)?;
    // The file could change between the size check and the read; reading
    // exactly `len` bytes keeps the buffer to the size just checked.
    read_exact_vec(&mut file, path, len, 0)
}

/// Reads the named files from a source, in the order given, each with the
/// path that errors should name.
fn read_files(
    source: &Source,
    spec: &DatasetSpec,
    layout: &CifarLayout,
    names: &[&str],
) -> Result<Vec<(PathBuf, Vec<u8>)>, DataError> {
    let record_len = record_len(spec, layout);
    match source {
        Source::Dir(dir) => names
            .iter()
            .map(|name| {
                let path = dir.join(name);
                if !path.is_file() {
                    return Err(DataError::MissingFile {
                        hint: format!(
                            "the {} folder {} is incomplete; unpack {} again",
                            spec.title,
                            dir.display(),
                            layout.archive
                        ),
                        path,
                    });
                }
                let bytes = read_record_file(&path, record_len)?;
                Ok((path, bytes))
            })
            .collect(),
        Source::Archive(archive) => {
            let mut found = read_members(archive, spec, layout, names)?;
            names
                .iter()
                .zip(found.iter_mut())
                .map(|(name, bytes)| {
                    let path = archive.join(layout.folder).join(name);
                    match bytes.take() {
                        Some(bytes) => Ok((path, bytes)),
                        None => Err(DataError::MissingFile {
                            path,
                            hint: format!(
                                "the archive has no member {}/{name}; is it the official {} archive?",
                                layout.folder, layout.archive
                            ),
                        }),
                    }
                })
                .collect()
        }
    }
}

/// Reads the record files `folder/name` of a tar archive, gzip-compressed or
/// not, checking each member's size before allocating for it, and reading
/// the archive to its very end.
///
/// Reading to the end matters for a `.tar.gz`: the gzip stream's CRC and
/// length are only checked when the decoder reaches its trailer, so an
/// archive cut short after the wanted members would otherwise load without
/// complaint.
pub(crate) fn read_members(
    archive: &Path,
    spec: &DatasetSpec,
    layout: &CifarLayout,
    names: &[&str],
) -> Result<Vec<Option<Vec<u8>>>, DataError> {
    let record_len = record_len(spec, layout);
    let opened = open_maybe_gz(archive)?;
    let (file_len, gzip) = (opened.file_len, opened.gzip);
    let limit = content_bound(file_len, gzip);
    let (reader, exceeded) = Bounded::new(opened.reader, limit);
    let io_err = |e| {
        if exceeded.get() {
            DataError::ArchiveTooLarge {
                path: archive.to_path_buf(),
                limit,
            }
        } else {
            DataError::io(archive, e)
        }
    };
    let wanted: Vec<PathBuf> = names
        .iter()
        .map(|name| Path::new(layout.folder).join(name))
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
        if found[slot].is_some() {
            // A repeated member is skipped (the tar reader still reads past
            // it), so the first copy wins, as when the archive is unpacked
            // without overwriting.
            continue;
        }
        let member = archive.join(layout.folder).join(names[slot]);
        // The size comes from the archive's header, so it is checked
        // against the limit, against what the archive could hold, and
        // against the record size before it sizes a buffer.
        let size = entry.size();
        check_records(&member, size, record_len)?;
        match check_claim(&member, size, file_len, gzip) {
            // An uncompressed archive holds headers too, so a member is only
            // implausible when it claims more than the whole file.
            Err(DataError::TrailingBytes { .. }) => {}
            other => other?,
        }
        let bytes = read_exact_vec(&mut entry, &member, size, 0).map_err(|e| match e {
            DataError::Io { source, .. } if exceeded.get() => io_err(source),
            other => other,
        })?;
        found[slot] = Some(bytes);
    }
    let mut rest = tar.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(io_err)?;
    Ok(found)
}

/// Loads one split of CIFAR-10 from its binary version.
///
/// `dir` may be the folder that holds `cifar-10-batches-bin/`, that folder
/// itself, a folder holding the official `cifar-10-binary.tar.gz`, or the
/// path of that archive; the archive is read directly, without unpacking it
/// to disk, and read to its end so that its gzip checksum is verified. The
/// training split is `data_batch_1.bin` to `data_batch_5.bin` in that order,
/// the test split `test_batch.bin`. Pixels are normalised with CIFAR-10's
/// training statistics ([`Normalization::cifar10`]).
pub fn load_cifar10(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    load(DatasetKind::Cifar10.spec(), &CIFAR10_LAYOUT, dir, split)
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
    load(DatasetKind::Cifar100.spec(), &CIFAR100_LAYOUT, dir, split)
}

/// Loads one split of a record-file data set.
pub(crate) fn load(
    spec: &DatasetSpec,
    layout: &CifarLayout,
    dir: &Path,
    split: Split,
) -> Result<Dataset, DataError> {
    let source = locate(dir, spec, layout, split)?;
    let files = read_files(&source, spec, layout, layout.split_files(split))?;
    let record_len = record_len(spec, layout);
    let image_len = spec.image_len();
    // Every file was checked to hold a whole, non-zero number of records.
    let count: usize = files
        .iter()
        .map(|(_, bytes)| bytes.len() / record_len)
        .sum();
    let table = PixelTable::new(&Normalization::of(spec), spec.channels)?;
    let mut images = Vec::with_capacity(count * image_len);
    let mut labels = Vec::with_capacity(count);
    let label_at = layout.label_bytes() - 1;
    for (path, bytes) in &files {
        for (index, record) in bytes.chunks_exact(record_len).enumerate() {
            let out_of_range = |label: u8, classes: usize| DataError::LabelOutOfRange {
                path: path.clone(),
                index,
                label: u32::from(label),
                classes,
            };
            if let Some(coarse) = layout.coarse_classes {
                if usize::from(record[0]) >= coarse {
                    return Err(out_of_range(record[0], coarse));
                }
            }
            let label = record[label_at];
            if usize::from(label) >= spec.num_classes {
                return Err(out_of_range(label, spec.num_classes));
            }
            labels.push(u32::from(label));
            table.extend(&mut images, &record[label_at + 1..]);
        }
    }
    Ok(Dataset {
        images,
        labels,
        channels: spec.channels,
        height: spec.height,
        width: spec.width,
        num_classes: spec.num_classes,
    })
}

/// Writes one split in the unpacked binary layout under `dir/<folder>/`.
///
/// The training split of CIFAR-10 is spread over its five files as evenly as
/// possible, so it needs at least five examples. CIFAR-100's coarse label is
/// written as `fine / 5`, a stand-in for the real grouping, which the loader
/// checks for range and otherwise ignores.
pub(crate) fn write(
    spec: &DatasetSpec,
    layout: &CifarLayout,
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
    let folder = dir.join(layout.folder);
    std::fs::create_dir_all(&folder).map_err(|e| DataError::io(&folder, e))?;
    let names = layout.split_files(split);
    for (k, name) in names.iter().enumerate() {
        let path = folder.join(name);
        let range = k * n / names.len()..(k + 1) * n / names.len();
        if range.is_empty() {
            return Err(DataError::NoRecords { path });
        }
        let mut bytes = Vec::with_capacity(range.len() * record_len(spec, layout));
        for i in range {
            if layout.coarse_classes.is_some() {
                bytes.push(labels[i] / 5);
            }
            bytes.push(labels[i]);
            bytes.extend_from_slice(&pixels[i * image_len..(i + 1) * image_len]);
        }
        std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))?;
    }
    Ok(())
}

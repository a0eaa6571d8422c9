//! CIFAR-10 and CIFAR-100 loading on small record files written by hand, in
//! folders and in archives.

use std::io::Write;
use std::path::{Path, PathBuf};

use noprop_data::{
    load_cifar10, load_cifar100, DataError, DatasetKind, Split, CIFAR100_MEAN, CIFAR100_STD,
    CIFAR10_MEAN, CIFAR10_STD,
};

const TRAIN10: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];

/// The value of channel `c`, row `y`, column `x` of the `k`-th image.
fn pixel(k: usize, c: usize, y: usize, x: usize) -> u8 {
    ((k * 37 + c * 101 + y * 3 + x) % 256) as u8
}

/// One record: the label bytes, then the red, green and blue planes, each
/// 32 rows of 32 bytes.
fn record(labels: &[u8], k: usize) -> Vec<u8> {
    let mut out = labels.to_vec();
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                out.push(pixel(k, c, y, x));
            }
        }
    }
    out
}

/// The CIFAR-10 files: one list of labels per file, with a different number
/// of records in each, and images numbered across files.
fn cifar10_files() -> Vec<(&'static str, Vec<u8>)> {
    let per_file: [&[u8]; 6] = [&[0, 1], &[2], &[3, 4, 5], &[6], &[7, 8], &[9, 0, 3, 1]];
    let mut k = 0;
    TRAIN10
        .iter()
        .copied()
        .chain(["test_batch.bin"])
        .zip(per_file)
        .map(|(name, labels)| {
            let mut bytes = Vec::new();
            for &label in labels {
                bytes.extend(record(&[label], k));
                k += 1;
            }
            (name, bytes)
        })
        .collect()
}

/// CIFAR-100 files: (coarse, fine) label pairs per file.
fn cifar100_files() -> Vec<(&'static str, Vec<u8>)> {
    let per_file: [&[(u8, u8)]; 2] = [&[(19, 99), (0, 0), (7, 57)], &[(3, 42), (11, 5)]];
    let mut k = 0;
    ["train.bin", "test.bin"]
        .into_iter()
        .zip(per_file)
        .map(|(name, labels)| {
            let mut bytes = Vec::new();
            for &(coarse, fine) in labels {
                bytes.extend(record(&[coarse, fine], k));
                k += 1;
            }
            (name, bytes)
        })
        .collect()
}

fn write_folder(root: &Path, folder: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = root.join(folder);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    dir
}

fn tar_archive(folder: &str, files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    // A directory entry first, as the official archives have.
    let mut dir_header = tar::Header::new_gnu();
    dir_header.set_entry_type(tar::EntryType::Directory);
    dir_header.set_size(0);
    dir_header.set_mode(0o755);
    dir_header.set_cksum();
    builder
        .append_data(&mut dir_header, format!("{folder}/"), std::io::empty())
        .unwrap();
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("{folder}/{name}"), bytes.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn close(got: f32, p: u8, mean: f32, std: f32) -> bool {
    let expected = (f64::from(p) / 255.0 - f64::from(mean)) / f64::from(std);
    (f64::from(got) - expected).abs() < 1e-6
}

fn check_cifar10(dir: &Path) {
    let train = load_cifar10(dir, Split::Train).unwrap();
    assert_eq!(train.labels, vec![0, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        (train.channels, train.height, train.width, train.num_classes),
        (3, 32, 32, 10)
    );
    assert_eq!(train.images.len(), 9 * 3072);
    for k in [0, 4, 8] {
        for (c, y, x) in [(0, 0, 0), (0, 5, 31), (1, 17, 2), (2, 31, 31)] {
            let got = train.image(k)[c * 1024 + y * 32 + x];
            assert!(
                close(got, pixel(k, c, y, x), CIFAR10_MEAN[c], CIFAR10_STD[c]),
                "image {k} at ({c}, {y}, {x})"
            );
        }
    }
    let test = load_cifar10(dir, Split::Test).unwrap();
    assert_eq!(test.labels, vec![9, 0, 3, 1]);
    let last = test.image(3)[2 * 1024 + 31 * 32 + 31];
    assert!(close(
        last,
        pixel(12, 2, 31, 31),
        CIFAR10_MEAN[2],
        CIFAR10_STD[2]
    ));
}

#[test]
fn cifar10_from_the_parent_folder() {
    let root = tempfile::tempdir().unwrap();
    write_folder(root.path(), "cifar-10-batches-bin", &cifar10_files());
    check_cifar10(root.path());
}

#[test]
fn cifar10_from_the_batches_folder_itself() {
    let root = tempfile::tempdir().unwrap();
    let dir = write_folder(root.path(), "cifar-10-batches-bin", &cifar10_files());
    check_cifar10(&dir);
}

#[test]
fn cifar10_from_the_official_archive() {
    let root = tempfile::tempdir().unwrap();
    let archive = root.path().join("cifar-10-binary.tar.gz");
    std::fs::write(
        &archive,
        gzip(&tar_archive("cifar-10-batches-bin", &cifar10_files())),
    )
    .unwrap();
    // Both the folder holding the archive and the archive's own path work.
    check_cifar10(root.path());
    check_cifar10(&archive);
}

#[test]
fn cifar10_from_an_uncompressed_tar() {
    let root = tempfile::tempdir().unwrap();
    let archive = root.path().join("cifar.tar");
    std::fs::write(
        &archive,
        tar_archive("cifar-10-batches-bin", &cifar10_files()),
    )
    .unwrap();
    check_cifar10(&archive);
}

#[test]
fn cifar100_uses_fine_labels() {
    let root = tempfile::tempdir().unwrap();
    write_folder(root.path(), "cifar-100-binary", &cifar100_files());
    let train = load_cifar100(root.path(), Split::Train).unwrap();
    assert_eq!(train.labels, vec![99, 0, 57]);
    assert_eq!(train.num_classes, 100);
    let got = train.image(2)[1024 + 32 + 1];
    assert!(close(
        got,
        pixel(2, 1, 1, 1),
        CIFAR100_MEAN[1],
        CIFAR100_STD[1]
    ));
    let test = load_cifar100(root.path(), Split::Test).unwrap();
    assert_eq!(test.labels, vec![42, 5]);
    assert!(close(
        test.image(1)[0],
        pixel(4, 0, 0, 0),
        CIFAR100_MEAN[0],
        CIFAR100_STD[0]
    ));
}

#[test]
fn cifar100_from_the_official_archive() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(
        root.path().join("cifar-100-binary.tar.gz"),
        gzip(&tar_archive("cifar-100-binary", &cifar100_files())),
    )
    .unwrap();
    assert_eq!(
        load_cifar100(root.path(), Split::Test).unwrap().labels,
        vec![42, 5]
    );
    assert_eq!(
        DatasetKind::Cifar100
            .load(root.path(), Split::Train)
            .unwrap()
            .len(),
        3
    );
}

/// Writes the CIFAR-10 files after `edit` and returns the training split's
/// loading error and its message.
fn cifar10_error(edit: impl FnOnce(&mut Vec<(&'static str, Vec<u8>)>)) -> (DataError, String) {
    let root = tempfile::tempdir().unwrap();
    let mut files = cifar10_files();
    edit(&mut files);
    write_folder(root.path(), "cifar-10-batches-bin", &files);
    let err = load_cifar10(root.path(), Split::Train).unwrap_err();
    let message = err.to_string();
    (err, message)
}

#[test]
fn a_partial_record_names_the_file() {
    let (err, message) = cifar10_error(|files| {
        files[2].1.pop();
    });
    assert!(
        matches!(
            err,
            DataError::PartialRecord {
                len: 9218,
                record_len: 3073,
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("data_batch_3.bin"), "{message}");
}

#[test]
fn a_label_out_of_range_names_the_file_and_record() {
    let (err, message) = cifar10_error(|files| {
        files[4].1[3073] = 10;
    });
    assert!(
        matches!(
            err,
            DataError::LabelOutOfRange {
                index: 1,
                label: 10,
                classes: 10,
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("data_batch_5.bin"), "{message}");
}

#[test]
fn an_empty_file_has_no_records() {
    let (err, message) = cifar10_error(|files| files[1].1.clear());
    assert!(matches!(err, DataError::NoRecords { .. }), "{message}");
    assert!(message.contains("data_batch_2.bin"), "{message}");
}

#[test]
fn a_missing_batch_file_is_reported() {
    let (err, message) = cifar10_error(|files| {
        files.remove(3);
    });
    assert!(matches!(err, DataError::MissingFile { .. }), "{message}");
    assert!(message.contains("data_batch_4.bin"), "{message}");
}

#[test]
fn cifar100_labels_out_of_range() {
    for (coarse, fine, classes) in [(3, 100, 100), (20, 5, 20)] {
        let root = tempfile::tempdir().unwrap();
        let mut files = cifar100_files();
        files[1].1[3074] = coarse;
        files[1].1[3075] = fine;
        write_folder(root.path(), "cifar-100-binary", &files);
        let err = load_cifar100(root.path(), Split::Test).unwrap_err();
        assert!(
            matches!(err, DataError::LabelOutOfRange { index: 1, classes: c, .. } if c == classes),
            "{err}"
        );
        assert!(err.to_string().contains("test.bin"), "{err}");
    }
}

#[test]
fn corrupt_archive_members_are_reported_by_member_name() {
    let root = tempfile::tempdir().unwrap();
    let mut files = cifar10_files();
    files[5].1.truncate(100);
    std::fs::write(
        root.path().join("cifar-10-binary.tar.gz"),
        gzip(&tar_archive("cifar-10-batches-bin", &files)),
    )
    .unwrap();
    let err = load_cifar10(root.path(), Split::Test).unwrap_err();
    assert!(
        matches!(err, DataError::PartialRecord { len: 100, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("cifar-10-binary.tar.gz"), "{err}");
    assert!(err.to_string().contains("test_batch.bin"), "{err}");

    // An archive without the test batch.
    files.pop();
    std::fs::write(
        root.path().join("cifar-10-binary.tar.gz"),
        gzip(&tar_archive("cifar-10-batches-bin", &files)),
    )
    .unwrap();
    let err = load_cifar10(root.path(), Split::Test).unwrap_err();
    assert!(matches!(err, DataError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("test_batch.bin"), "{err}");
}

#[test]
fn nothing_there_says_how_to_get_the_data() {
    let root = tempfile::tempdir().unwrap();
    let err = load_cifar10(root.path(), Split::Train).unwrap_err();
    assert!(matches!(err, DataError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("cifar-10-binary.tar.gz"), "{err}");
    assert!(err.to_string().contains("NOPROP_DATA"), "{err}");
    let err = load_cifar100(root.path(), Split::Train).unwrap_err();
    assert!(err.to_string().contains("cifar100/"), "{err}");
}

#[test]
fn the_kind_writers_round_trip() {
    let root = tempfile::tempdir().unwrap();
    let n = 7;
    let pixels: Vec<u8> = (0..n)
        .flat_map(|k| (0..3).flat_map(move |c| (0..1024).map(move |j| pixel(k, c, j / 32, j % 32))))
        .collect();
    let labels: Vec<u32> = (0..n as u32).map(|k| k % 10).collect();
    DatasetKind::Cifar10
        .write(root.path(), Split::Train, &pixels, &labels)
        .unwrap();
    let train = DatasetKind::Cifar10
        .load(root.path(), Split::Train)
        .unwrap();
    assert_eq!(train.labels, labels);
    assert!(close(
        train.image(6)[2048 + 33],
        pixel(6, 2, 1, 1),
        CIFAR10_MEAN[2],
        CIFAR10_STD[2]
    ));
    // Five training files need five images.
    assert!(matches!(
        DatasetKind::Cifar10.write(root.path(), Split::Train, &pixels[..4 * 3072], &labels[..4]),
        Err(DataError::NoRecords { .. })
    ));

    let fine: Vec<u32> = vec![99, 0, 50, 1, 2, 3, 4];
    DatasetKind::Cifar100
        .write(root.path(), Split::Test, &pixels, &fine)
        .unwrap();
    assert_eq!(
        DatasetKind::Cifar100
            .load(root.path(), Split::Test)
            .unwrap()
            .labels,
        fine
    );
}

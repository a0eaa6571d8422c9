//! MNIST loading on small IDX files written by hand, byte by byte.

use std::io::Write;
use std::path::Path;

use noprop_data::{load_mnist, DataError, DatasetKind, Split, MNIST_MEAN, MNIST_STD};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// An IDX file built from its definition, independently of the crate's own
/// encoder: magic, big-endian dimensions, data.
fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// The value of pixel `j` of image `i` in the test files.
fn pixel(i: usize, j: usize) -> u8 {
    ((i * 31 + j * 7) % 256) as u8
}

fn images(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (0..784).map(move |j| pixel(i, j)))
        .collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8], gz: bool) {
    if gz {
        std::fs::write(dir.join(format!("{name}.gz")), gzip(bytes)).unwrap();
    } else {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Writes one split with the given labels and matching images.
fn write_split(dir: &Path, split: Split, labels: &[u8], gz: bool) {
    let (images_name, labels_name) = names(split);
    let n = labels.len();
    write(
        dir,
        images_name,
        &idx(IMAGES_MAGIC, &[n as u32, 28, 28], &images(n)),
        gz,
    );
    write(
        dir,
        labels_name,
        &idx(LABELS_MAGIC, &[n as u32], labels),
        gz,
    );
}

fn names(split: Split) -> (&'static str, &'static str) {
    match split {
        Split::Train => ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        Split::Test => ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
}

fn normalised(p: u8) -> f64 {
    (f64::from(p) / 255.0 - f64::from(MNIST_MEAN[0])) / f64::from(MNIST_STD[0])
}

fn assert_round_trip(gz: bool) {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Train, &[0, 9, 5], gz);
    write_split(dir.path(), Split::Test, &[7, 2], gz);

    let train = load_mnist(dir.path(), Split::Train).unwrap();
    assert_eq!(train.labels, vec![0, 9, 5]);
    assert_eq!(
        (train.channels, train.height, train.width, train.num_classes),
        (1, 28, 28, 10)
    );
    assert_eq!(train.images.len(), 3 * 784);
    for i in 0..3 {
        for j in [0, 1, 27, 28, 400, 783] {
            let got = f64::from(train.image(i)[j]);
            assert!(
                (got - normalised(pixel(i, j))).abs() < 1e-6,
                "image {i} pixel {j}"
            );
        }
    }
    let test = load_mnist(dir.path(), Split::Test).unwrap();
    assert_eq!(test.labels, vec![7, 2]);
}

#[test]
fn raw_idx_round_trip() {
    assert_round_trip(false);
}

#[test]
fn gzip_idx_round_trip() {
    assert_round_trip(true);
}

#[test]
fn raw_files_are_preferred_over_gzip() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Train, &[1, 1], true);
    write_split(dir.path(), Split::Train, &[2, 2], false);
    assert_eq!(
        load_mnist(dir.path(), Split::Train).unwrap().labels,
        vec![2, 2]
    );
}

#[test]
fn a_raw_file_under_a_gz_name_still_loads() {
    // What a client that decompressed a download in transit leaves behind.
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Train, &[4], false);
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        std::fs::rename(dir.path().join(name), dir.path().join(format!("{name}.gz"))).unwrap();
    }
    assert_eq!(
        load_mnist(dir.path(), Split::Train).unwrap().labels,
        vec![4]
    );
}

/// Loads the training split and returns the error with its message.
fn load_err(dir: &Path) -> (DataError, String) {
    let err = load_mnist(dir, Split::Train).unwrap_err();
    let message = err.to_string();
    (err, message)
}

#[test]
fn bad_magic_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Train, &[1, 2], false);
    // A label file where the image file should be.
    write(
        dir.path(),
        "train-images-idx3-ubyte",
        &idx(LABELS_MAGIC, &[2], &[1, 2]),
        false,
    );
    let (err, message) = load_err(dir.path());
    assert!(
        matches!(
            err,
            DataError::BadMagic {
                found: LABELS_MAGIC,
                expected: IMAGES_MAGIC,
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("train-images-idx3-ubyte"), "{message}");
}

#[test]
fn truncated_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Train, &[1, 2], false);
    let mut bytes = idx(IMAGES_MAGIC, &[2, 28, 28], &images(2));
    bytes.pop();
    write(dir.path(), "train-images-idx3-ubyte", &bytes, false);
    let (err, message) = load_err(dir.path());
    assert!(
        matches!(
            err,
            DataError::Truncated {
                expected_len: 1584,
                found_len: 1583,
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("train-images-idx3-ubyte"), "{message}");
}

#[test]
fn truncated_gzip_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Train, &[1, 2], true);
    let path = dir.path().join("train-labels-idx1-ubyte.gz");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&path, bytes).unwrap();
    let (err, message) = load_err(dir.path());
    assert!(
        matches!(err, DataError::Io { .. } | DataError::Truncated { .. }),
        "{message}"
    );
    assert!(message.contains("train-labels-idx1-ubyte.gz"), "{message}");
}

#[test]
fn count_mismatch_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Train, &[1, 2, 3], false);
    write(
        dir.path(),
        "train-labels-idx1-ubyte",
        &idx(LABELS_MAGIC, &[2], &[1, 2]),
        false,
    );
    let (err, message) = load_err(dir.path());
    assert!(
        matches!(
            err,
            DataError::CountMismatch {
                images: 3,
                labels: 2,
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("train-images-idx3-ubyte"), "{message}");
    assert!(message.contains("train-labels-idx1-ubyte"), "{message}");
}

#[test]
fn label_out_of_range_names_the_file_and_example() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Train, &[1, 2, 10], false);
    let (err, message) = load_err(dir.path());
    assert!(
        matches!(
            err,
            DataError::LabelOutOfRange {
                index: 2,
                label: 10,
                classes: 10,
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("train-labels-idx1-ubyte"), "{message}");
}

#[test]
fn wrong_image_size_is_bad_dims() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Train, &[1], false);
    write(
        dir.path(),
        "train-images-idx3-ubyte",
        &idx(IMAGES_MAGIC, &[1, 27, 28], &[0; 27 * 28]),
        false,
    );
    let (err, message) = load_err(dir.path());
    match err {
        DataError::BadDims {
            found, expected, ..
        } => {
            assert_eq!(found, vec![1, 27, 28]);
            assert_eq!(expected, vec![1, 28, 28]);
        }
        other => panic!("expected BadDims, got {other}"),
    }
    assert!(message.contains("train-images-idx3-ubyte"), "{message}");
}

#[test]
fn missing_files_say_how_to_get_them() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), Split::Test, &[1], false);
    let (err, message) = load_err(dir.path());
    assert!(matches!(err, DataError::MissingFile { .. }), "{message}");
    assert!(message.contains("train-images-idx3-ubyte"), "{message}");
    assert!(message.contains("NOPROP_DATA"), "{message}");
}

#[test]
fn the_kind_writer_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let pixels = images(5);
    DatasetKind::Mnist
        .write(dir.path(), Split::Test, &pixels, &[0, 1, 2, 3, 9])
        .unwrap();
    let test = DatasetKind::Mnist.load(dir.path(), Split::Test).unwrap();
    let expected = noprop_data::Dataset::from_u8(
        &pixels,
        vec![0, 1, 2, 3, 9],
        1,
        28,
        28,
        10,
        &DatasetKind::Mnist.normalization(),
    )
    .unwrap();
    assert_eq!(test, expected);
    assert!(matches!(
        DatasetKind::Mnist.write(dir.path(), Split::Test, &pixels, &[0, 1, 2, 3, 10]),
        Err(DataError::InvalidLabel {
            index: 4,
            label: 10,
            ..
        })
    ));
}

/// An empty data set would only fail later, far from its cause, so loading
/// one is an error naming the image file.
#[test]
fn a_file_of_zero_images_is_an_error_naming_it() {
    for gz in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), Split::Train, &[], gz);
        let (err, message) = load_err(dir.path());
        assert!(matches!(err, DataError::NoRecords { .. }), "{message}");
        assert!(message.contains("train-images-idx3-ubyte"), "{message}");
    }
}

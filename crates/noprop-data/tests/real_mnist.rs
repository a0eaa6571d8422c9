//! The real MNIST files, when they are at hand.
//!
//! Run with
//! `NOPROP_DATA=/path/to/data cargo test -p noprop-data --all-features -- --ignored`.
//! The files are found in `$NOPROP_DATA/mnist`, else in the shared data
//! folder beside the workspace (`<workspace>/../shared/data/mnist`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use noprop_data::{load_mnist, Split, DATA_ENV};

fn mnist_dir() -> PathBuf {
    match std::env::var_os(DATA_ENV) {
        Some(root) if !root.is_empty() => PathBuf::from(root).join("mnist"),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist"),
    }
}

#[test]
#[ignore = "needs real MNIST: set NOPROP_DATA or have ../shared/data"]
fn real_mnist_loads_completely() {
    let dir = mnist_dir();
    let start = Instant::now();
    let train = load_mnist(&dir, Split::Train).unwrap();
    let train_time = start.elapsed();
    let test = load_mnist(&dir, Split::Test).unwrap();
    eprintln!(
        "loaded 60,000 training images in {train_time:?} from {}",
        dir.display()
    );

    assert_eq!(train.len(), 60_000);
    assert_eq!(test.len(), 10_000);
    assert_eq!(train.images.len(), 60_000 * 784);
    assert_eq!(train.labels[..10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]);
    assert_eq!(test.labels[..10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]);
    assert_eq!(
        test.class_counts(),
        vec![980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );

    // The constants are the training set's statistics, so the normalised
    // training pixels have mean about 0 and standard deviation about 1.
    let n = train.images.len() as f64;
    let mean = train.images.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = train
        .images
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    assert!(mean.abs() < 1e-3, "mean {mean}");
    assert!((var.sqrt() - 1.0).abs() < 1e-3, "std {}", var.sqrt());
}

/// `ensure(dir, true)`, what `noprop data download` calls, verifies the
/// files already there: the real ones pass, and a copy with one corrupt file
/// is reported by that file's name.
#[test]
#[ignore = "needs real MNIST: set NOPROP_DATA or have ../shared/data"]
fn ensure_verifies_real_mnist_and_names_a_corrupt_file() {
    use noprop_data::{DataError, DatasetKind};

    let dir = mnist_dir();
    let start = Instant::now();
    DatasetKind::Mnist.ensure(&dir, true).unwrap();
    eprintln!("verified the four MNIST files in {:?}", start.elapsed());

    let copy = tempfile::tempdir().unwrap();
    for name in noprop_data::MNIST_FILES {
        let gz = format!("{name}.gz");
        std::fs::copy(dir.join(&gz), copy.path().join(&gz)).unwrap();
    }
    DatasetKind::Mnist.ensure(copy.path(), true).unwrap();
    // A raw file takes precedence over the `.gz`; make it the real test
    // labels with one label changed, so that only its checksum is wrong.
    let mut labels = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(
            std::fs::File::open(dir.join("t10k-labels-idx1-ubyte.gz")).unwrap(),
        ),
        &mut labels,
    )
    .unwrap();
    labels[100] = (labels[100] + 1) % 10;
    std::fs::write(copy.path().join("t10k-labels-idx1-ubyte"), &labels).unwrap();
    // It still loads (it is well-formed), but it is not the published file.
    assert_eq!(load_mnist(copy.path(), Split::Test).unwrap().len(), 10_000);
    let err = DatasetKind::Mnist.ensure(copy.path(), true).unwrap_err();
    assert!(
        matches!(&err, DataError::Checksum { location, .. } if location.ends_with("t10k-labels-idx1-ubyte")),
        "{err}"
    );
}

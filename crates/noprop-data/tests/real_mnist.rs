//! The real MNIST files, when they are at hand.
//!
//! Run with `cargo test -p noprop-data --release -- --ignored`. The files are
//! found in `$NOPROP_DATA/mnist`, else in the shared data folder beside the
//! workspace (`<workspace>/../shared/data/mnist`).

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

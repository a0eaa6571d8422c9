//! MNIST, CIFAR-10 and CIFAR-100 for NoProp training, read from their
//! canonical files into host memory.
//!
//! What this crate does:
//!
//! - parses MNIST's IDX files (raw or gzip) and the binary versions of
//!   CIFAR-10 and CIFAR-100 (unpacked, or straight from the official
//!   `.tar.gz`), checking every header, length, count and label, and naming
//!   the offending file in every [`DataError`];
//! - normalises pixels per channel with each data set's training statistics
//!   ([`Normalization`]) into a [`Dataset`] of `f32` images in NCHW order;
//! - cuts shuffled passes into batches with a seeded ChaCha8 stream
//!   ([`Batcher`]), so that a run resumed mid-training sees the same batches;
//! - never trusts a size read from a file: every header count, dimension and
//!   archive member size is checked against [`MAX_FILE_LEN`] and against what
//!   the file on disk can hold before any memory is reserved for it, gzip
//!   content is decompressed only as far as its header promises, and a
//!   `.tar.gz` is read to its end so that its CRC is verified;
//! - keeps every fact about a data set (names, shape, classes, normalisation,
//!   files, URLs, checksums) in one table, [`DatasetKind::spec`], which other
//!   crates enumerate through [`DatasetKind::ALL`] instead of keeping lists of
//!   their own;
//! - verifies files already on disk against the published checksums when
//!   asked to make sure of the official data ([`DatasetKind::ensure`] with
//!   `download` true), and with the `download` feature fetches the missing
//!   ones (`download` module).
//!
//! What it deliberately does not do: it has no tensor library dependency
//! (batches are plain `Vec<f32>` that the trainer copies to its device), no
//! data augmentation, no logging, and it never touches the network unless the
//! `download` feature is on and a download function is called.
//!
//! Where the files are looked for is decided by [`resolve_data_dir`]: an
//! explicit folder, else `$NOPROP_DATA/<kind>`, else `./data/<kind>`.
//!
//! # Tests
//!
//! `cargo test -p noprop-data --all-features` runs everything that needs no
//! data, including a property-based fuzz suite (`tests/hostile.rs`) that
//! feeds the IDX and CIFAR readers arbitrary bytes and mutated valid files
//! (raw, gzipped, and as `.tar.gz`) and asserts that they never panic and
//! never attempt a large allocation. It runs a few hundred cases per
//! property by default; set `NOPROP_FUZZ_CASES` (for example
//! `NOPROP_FUZZ_CASES=100000`) for a longer run. The tests on the real MNIST
//! files are ignored by default; run them with
//! `NOPROP_DATA=/path/to/data cargo test -p noprop-data --all-features -- --ignored`.
//!
//! ```
//! use noprop_data::{Batcher, DatasetKind, Split};
//!
//! // Write four tiny 28x28 images in MNIST's IDX layout, then load them.
//! let dir = tempfile::tempdir()?;
//! let pixels: Vec<u8> = (0..4 * 784).map(|i| (i % 256) as u8).collect();
//! DatasetKind::Mnist.write(dir.path(), Split::Train, &pixels, &[3, 1, 4, 1])?;
//! let train = DatasetKind::Mnist.load(dir.path(), Split::Train)?;
//! assert_eq!((train.len(), train.image_len()), (4, 784));
//!
//! // One reproducible shuffled pass in batches of two.
//! let mut images = Vec::new();
//! let mut labels = Vec::new();
//! for batch in Batcher::new(train.len(), 2, 42, 0)?.batches() {
//!     noprop_data::gather_into(&train, batch, &mut images, &mut labels);
//!     assert_eq!(images.len(), 2 * 784);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

// The modules form a layered graph, each importing only modules listed
// before it: error; split; catalog; normalization; dataset; labels; files;
// idx; mnist and cifar (the formats); verify; download; kind (the
// dispatcher); batch.
mod batch;
mod catalog;
mod cifar;
mod dataset;
#[cfg(feature = "download")]
pub mod download;
mod error;
mod files;
pub mod idx;
mod kind;
mod labels;
mod mnist;
mod normalization;
mod split;
mod verify;

pub use batch::{gather, gather_into, pass_stream, Batcher};
pub use catalog::{
    Checksum, CifarLayout, DatasetKind, DatasetSpec, IdxFile, IdxLayout, Layout, PublishedFile,
    CIFAR100_MEAN, CIFAR100_STD, CIFAR10_MEAN, CIFAR10_STD, MNIST_FILES, MNIST_MEAN, MNIST_STD,
};
pub use cifar::{load_cifar10, load_cifar100};
pub use dataset::Dataset;
pub use error::DataError;
pub use files::MAX_FILE_LEN;
pub use kind::{resolve_data_dir, DATA_ENV};
pub use mnist::load_mnist;
pub use normalization::Normalization;
pub use split::Split;

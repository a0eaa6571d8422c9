//! The catalog of supported data sets: the one table that knows each data
//! set's name, image shape, classes, normalisation, files and checksums.
//!
//! Everything else in the crate (the loaders, the presence and checksum
//! checks, the downloads) reads these facts from here, and other crates
//! enumerate them through [`DatasetKind::ALL`] and [`DatasetKind::spec`], so
//! adding a data set in an existing file format means adding a variant and a
//! [`DatasetSpec`] here, and nowhere else.
//!
//! This is a leaf module: it imports only the error type and [`Split`].

use std::fmt;
use std::str::FromStr;

use crate::error::DataError;
use crate::split::Split;

/// MNIST's per-channel mean of the training images, with pixels scaled to
/// `[0, 1]`.
pub const MNIST_MEAN: [f32; 1] = [0.1307];
/// MNIST's per-channel standard deviation of the training images, with
/// pixels scaled to `[0, 1]`.
pub const MNIST_STD: [f32; 1] = [0.3081];
/// CIFAR-10's per-channel (R, G, B) mean of the training images, with pixels
/// scaled to `[0, 1]`.
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// CIFAR-10's per-channel (R, G, B) standard deviation of the training
/// images, with pixels scaled to `[0, 1]`.
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// CIFAR-100's per-channel (R, G, B) mean of the training images, with
/// pixels scaled to `[0, 1]`.
pub const CIFAR100_MEAN: [f32; 3] = [0.5071, 0.4865, 0.4409];
/// CIFAR-100's per-channel (R, G, B) standard deviation of the training
/// images, with pixels scaled to `[0, 1]`.
pub const CIFAR100_STD: [f32; 3] = [0.2673, 0.2564, 0.2762];

/// The canonical names of the four MNIST files, without `.gz`: train images,
/// train labels, test images, test labels.
pub const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// One of the supported data sets.
///
/// Its [`Display`](fmt::Display) form (`mnist`, `cifar10`, `cifar100`) is
/// also the name of its folder under the data root, and [`FromStr`] accepts
/// it in any case, as well as the aliases of its [`DatasetSpec`] (`cifar-10`,
/// `cifar-100`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DatasetKind {
    /// MNIST: 28x28 grey handwritten digits, 10 classes.
    Mnist,
    /// CIFAR-10: 32x32 colour images, 10 classes.
    Cifar10,
    /// CIFAR-100: 32x32 colour images, 100 fine classes.
    Cifar100,
}

/// Everything this crate knows about one data set.
#[derive(Debug)]
#[non_exhaustive]
pub struct DatasetSpec {
    /// The short name, which is also the folder name under the data root.
    pub name: &'static str,
    /// Other names [`FromStr`] accepts, in lowercase.
    pub aliases: &'static [&'static str],
    /// The name used in messages, as its authors write it.
    pub title: &'static str,
    /// One line saying what the data set is.
    pub description: &'static str,
    /// Channels per image.
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// The number of classes.
    pub num_classes: usize,
    /// The examples of the published training and test splits.
    pub examples: [usize; 2],
    /// The per-channel mean of the training images on the `[0, 1]` scale.
    pub mean: &'static [f32],
    /// The per-channel standard deviation of the training images on the
    /// `[0, 1]` scale.
    pub std: &'static [f32],
    /// How the data set is stored and published.
    pub layout: Layout,
}

/// The file format and published files of a data set.
#[derive(Debug)]
#[non_exhaustive]
pub enum Layout {
    /// MNIST-style: one IDX image file and one IDX label file per split.
    Idx(IdxLayout),
    /// CIFAR-style: files of fixed-size records, published in one archive.
    Cifar(CifarLayout),
}

/// A data set published as four IDX files, each as `<stem>.gz`.
#[derive(Debug)]
pub struct IdxLayout {
    /// The folder URL the files are fetched from by default.
    pub base_url: &'static str,
    /// Train images, train labels, test images, test labels, in that order.
    pub files: [IdxFile; 4],
}

/// One published IDX file.
#[derive(Debug)]
pub struct IdxFile {
    /// The file name without `.gz`; the loader accepts it raw or gzipped.
    pub stem: &'static str,
    /// The SHA-256 of the file's content *after* decompression, in lowercase
    /// hex, so that re-compressed mirrors and raw files unpacked by hand
    /// verify the same way.
    pub sha256: &'static str,
}

/// A data set of fixed-size records, published as one `.tar.gz` archive.
#[derive(Debug)]
pub struct CifarLayout {
    /// Where the archive is published.
    pub url: &'static str,
    /// The archive's file name.
    pub archive: &'static str,
    /// The archive's MD5, as published, in lowercase hex.
    pub md5: &'static str,
    /// The folder the archive unpacks to.
    pub folder: &'static str,
    /// The record files of the training split, in loading order.
    pub train: &'static [&'static str],
    /// The record files of the test split, in loading order.
    pub test: &'static [&'static str],
    /// The number of records in each official training file.
    pub train_records_per_file: usize,
    /// The number of records in each official test file.
    pub test_records_per_file: usize,
    /// The number of coarse classes when each record carries a coarse label
    /// byte before the kept one (CIFAR-100), else `None`.
    pub coarse_classes: Option<usize>,
}

/// How a published file is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// The SHA-256 of the file's content after any gzip decompression.
    Sha256OfContent(&'static str),
    /// The MD5 of the file's bytes as published.
    Md5(&'static str),
}

/// One file as its data set publishes it: what a download fetches and
/// verifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedFile {
    /// The file's name once downloaded.
    pub name: String,
    /// The default URL it is fetched from.
    pub url: String,
    /// How it is verified.
    pub checksum: Checksum,
}

pub(crate) const MNIST_LAYOUT: IdxLayout = IdxLayout {
    base_url: "https://ossci-datasets.s3.amazonaws.com/mnist/",
    files: [
        IdxFile {
            stem: MNIST_FILES[0],
            sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        },
        IdxFile {
            stem: MNIST_FILES[1],
            sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        },
        IdxFile {
            stem: MNIST_FILES[2],
            sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        },
        IdxFile {
            stem: MNIST_FILES[3],
            sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ],
};

const MNIST_SPEC: DatasetSpec = DatasetSpec {
    name: "mnist",
    aliases: &[],
    title: "MNIST",
    description: "28x28 grey handwritten digits, 60,000 training and 10,000 test images",
    channels: 1,
    height: 28,
    width: 28,
    num_classes: 10,
    examples: [60_000, 10_000],
    mean: &MNIST_MEAN,
    std: &MNIST_STD,
    layout: Layout::Idx(MNIST_LAYOUT),
};

pub(crate) const CIFAR10_LAYOUT: CifarLayout = CifarLayout {
    url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    archive: "cifar-10-binary.tar.gz",
    md5: "c32a1d4ab5d03f1284b67883e8d87530",
    folder: "cifar-10-batches-bin",
    train: &[
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ],
    test: &["test_batch.bin"],
    train_records_per_file: 10_000,
    test_records_per_file: 10_000,
    coarse_classes: None,
};

const CIFAR10_SPEC: DatasetSpec = DatasetSpec {
    name: "cifar10",
    aliases: &["cifar-10"],
    title: "CIFAR-10",
    description: "32x32 colour images in 10 classes, 50,000 training and 10,000 test images",
    channels: 3,
    height: 32,
    width: 32,
    num_classes: 10,
    examples: [50_000, 10_000],
    mean: &CIFAR10_MEAN,
    std: &CIFAR10_STD,
    layout: Layout::Cifar(CIFAR10_LAYOUT),
};

pub(crate) const CIFAR100_LAYOUT: CifarLayout = CifarLayout {
    url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    archive: "cifar-100-binary.tar.gz",
    md5: "03b5dce01913d631647c71ecec9e9cb8",
    folder: "cifar-100-binary",
    train: &["train.bin"],
    test: &["test.bin"],
    train_records_per_file: 50_000,
    test_records_per_file: 10_000,
    coarse_classes: Some(20),
};

const CIFAR100_SPEC: DatasetSpec = DatasetSpec {
    name: "cifar100",
    aliases: &["cifar-100"],
    title: "CIFAR-100",
    description: "32x32 colour images in 100 fine classes, 50,000 training and 10,000 test images",
    channels: 3,
    height: 32,
    width: 32,
    num_classes: 100,
    examples: [50_000, 10_000],
    mean: &CIFAR100_MEAN,
    std: &CIFAR100_STD,
    layout: Layout::Cifar(CIFAR100_LAYOUT),
};

/// The catalogue: each line is a kind and its spec. [`DatasetKind::ALL`]
/// and [`DatasetKind::spec`] are generated from it, so a kind added to the
/// enum and not here does not compile.
macro_rules! catalog {
    ($($kind:ident => $spec:ident,)*) => {
        impl DatasetKind {
            /// All kinds, in a fixed order.
            pub const ALL: [DatasetKind; [$(stringify!($kind)),*].len()] = [$(DatasetKind::$kind),*];

            /// Everything this crate knows about the data set.
            pub fn spec(self) -> &'static DatasetSpec {
                match self {
                    $(DatasetKind::$kind => &$spec,)*
                }
            }
        }
    };
}

catalog! {
    Mnist => MNIST_SPEC,
    Cifar10 => CIFAR10_SPEC,
    Cifar100 => CIFAR100_SPEC,
}

impl DatasetKind {
    /// The short name, which is also the folder name under the data root.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The name used in messages, tables and figures, as its authors write it.
    pub fn title(self) -> &'static str {
        self.spec().title
    }

    /// One line saying what the data set is.
    pub fn description(self) -> &'static str {
        self.spec().description
    }

    /// The examples of the published `split`.
    pub fn examples(self, split: crate::Split) -> usize {
        self.spec().examples[match split {
            crate::Split::Train => 0,
            crate::Split::Test => 1,
        }]
    }

    /// The number of classes.
    pub fn num_classes(self) -> usize {
        self.spec().num_classes
    }

    /// The shape of one image as (channels, height, width).
    pub fn shape(self) -> (usize, usize, usize) {
        let spec = self.spec();
        (spec.channels, spec.height, spec.width)
    }

    /// The files the data set is published as, each with its default URL and
    /// checksum: what `ensure(dir, true)` verifies or fetches.
    pub fn files(self) -> Vec<PublishedFile> {
        self.spec().published_files()
    }
}

impl DatasetSpec {
    /// The files the data set is published as, with their default URLs and
    /// checksums.
    pub fn published_files(&self) -> Vec<PublishedFile> {
        match &self.layout {
            Layout::Idx(idx) => idx
                .files
                .iter()
                .map(|file| PublishedFile {
                    name: format!("{}.gz", file.stem),
                    url: format!("{}/{}.gz", idx.base_url.trim_end_matches('/'), file.stem),
                    checksum: Checksum::Sha256OfContent(file.sha256),
                })
                .collect(),
            Layout::Cifar(cifar) => vec![PublishedFile {
                name: cifar.archive.to_owned(),
                url: cifar.url.to_owned(),
                checksum: Checksum::Md5(cifar.md5),
            }],
        }
    }

    /// The number of values in one image: channels x height x width.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

impl IdxLayout {
    /// The image and label files of a split.
    pub fn split_files(&self, split: Split) -> (&IdxFile, &IdxFile) {
        match split {
            Split::Train => (&self.files[0], &self.files[1]),
            Split::Test => (&self.files[2], &self.files[3]),
        }
    }
}

impl CifarLayout {
    /// The record files of a split, in loading order.
    pub fn split_files(&self, split: Split) -> &'static [&'static str] {
        match split {
            Split::Train => self.train,
            Split::Test => self.test,
        }
    }

    /// Every record file of both splits.
    pub fn all_files(&self) -> impl Iterator<Item = &'static str> {
        self.train.iter().chain(self.test).copied()
    }

    /// The number of label bytes before the pixels of each record.
    pub fn label_bytes(&self) -> usize {
        if self.coarse_classes.is_some() {
            2
        } else {
            1
        }
    }

    /// The number of records in each official file of a split.
    pub fn records_per_file(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train_records_per_file,
            Split::Test => self.test_records_per_file,
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        DatasetKind::ALL
            .into_iter()
            .find(|kind| {
                let spec = kind.spec();
                spec.name == lower || spec.aliases.contains(&lower.as_str())
            })
            .ok_or_else(|| DataError::UnknownDataset { name: s.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in DatasetKind::ALL {
            assert_eq!(kind.to_string().parse::<DatasetKind>().unwrap(), kind);
        }
        assert_eq!(
            "CIFAR-100".parse::<DatasetKind>().unwrap(),
            DatasetKind::Cifar100
        );
        assert!(matches!(
            "imagenet".parse::<DatasetKind>(),
            Err(DataError::UnknownDataset { name }) if name == "imagenet"
        ));
        assert_eq!("Test".parse::<Split>().unwrap(), Split::Test);
        assert_eq!(Split::Train.to_string(), "train");
        assert!("val".parse::<Split>().is_err());
    }

    #[test]
    fn the_table_is_consistent() {
        for kind in DatasetKind::ALL {
            let spec = kind.spec();
            assert_eq!(spec.mean.len(), spec.channels, "{kind}");
            assert_eq!(spec.std.len(), spec.channels, "{kind}");
            assert!(spec.num_classes <= 256, "labels are stored as bytes");
            for file in kind.files() {
                let hex = match file.checksum {
                    Checksum::Sha256OfContent(h) => (h, 64),
                    Checksum::Md5(h) => (h, 32),
                };
                assert_eq!(hex.0.len(), hex.1, "{}", file.name);
                assert!(hex
                    .0
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                assert!(file.url.ends_with(&file.name), "{}", file.url);
            }
        }
        // The one list of names outside this table is the error message for
        // an unknown name (the error type cannot import the catalog without
        // a cycle), so a new data set must show up there too.
        let message = "?".parse::<DatasetKind>().unwrap_err().to_string();
        for kind in DatasetKind::ALL {
            assert!(message.contains(kind.name()), "{message}");
        }
        assert_eq!(DatasetKind::Cifar100.num_classes(), 100);
        assert_eq!(DatasetKind::Mnist.shape(), (1, 28, 28));
        assert_eq!(DatasetKind::Mnist.files().len(), 4);
        assert_eq!(
            DatasetKind::Mnist.files()[0].url,
            "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
        );
    }
}

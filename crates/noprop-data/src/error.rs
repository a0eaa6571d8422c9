//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while finding, reading, checking or fetching
/// a data set.
///
/// Every variant that concerns a file names it, so that a message printed at
/// the top of a program tells the user which file to look at. Underlying I/O
/// errors are exposed through [`std::error::Error::source`] rather than
/// repeated in the message, so print the whole chain (`{:#}` with anyhow).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file could not be opened, read, written or decompressed.
    #[error("cannot read or write {}", path.display())]
    Io {
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file the loader needs is not there.
    #[error("missing data file {}: {hint}", path.display())]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// How to get the data.
        hint: String,
    },

    /// An IDX file starts with the wrong magic number, so it is not the kind
    /// of IDX file (images or labels, unsigned bytes) that was expected.
    #[error("{} has magic number {found:#010x}, expected {expected:#010x}", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The magic number read from the file.
        found: u32,
        /// The magic number the loader expected.
        expected: u32,
    },

    /// An IDX file has dimensions other than the data set's.
    #[error("{} has dimensions {found:?}, expected {expected:?}", path.display())]
    BadDims {
        /// The file.
        path: PathBuf,
        /// The dimensions read from the header.
        found: Vec<usize>,
        /// The dimensions the loader expected.
        expected: Vec<usize>,
    },

    /// A file is shorter than its header (or the format) says it must be.
    #[error("{} is truncated: {found_len} bytes, expected {expected_len}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The length implied by the header.
        expected_len: u64,
        /// The actual length.
        found_len: u64,
    },

    /// A file is longer than its header says, which suggests a corrupt header
    /// or two files concatenated.
    #[error("{} has trailing bytes: {found_len} bytes, expected {expected_len}", path.display())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// The length implied by the header.
        expected_len: u64,
        /// The actual length.
        found_len: u64,
    },

    /// A compressed file decompresses to more than its header describes.
    ///
    /// How much more is not measured: reading on to count could mean
    /// inflating a decompression bomb.
    #[error("{} holds more data than the {expected_len} bytes its header describes", path.display())]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// The length implied by the header.
        expected_len: u64,
    },

    /// A header claims more data than this crate accepts in one file
    /// ([`MAX_FILE_LEN`](crate::MAX_FILE_LEN)), so it is corrupt or forged.
    #[error("{} claims {claimed} bytes of data, more than the limit of {limit}", path.display())]
    TooLarge {
        /// The file (or archive member).
        path: PathBuf,
        /// The size the header claims.
        claimed: u64,
        /// The largest size accepted.
        limit: u64,
    },

    /// An archive decompresses to more than this crate reads from one file
    /// ([`MAX_FILE_LEN`](crate::MAX_FILE_LEN)) or more than its compressed
    /// length can hold.
    #[error("{} decompresses to more than {limit} bytes, more than it can hold", path.display())]
    ArchiveTooLarge {
        /// The archive.
        path: PathBuf,
        /// The most it could hold.
        limit: u64,
    },

    /// A header claims more data than a compressed file of this length could
    /// hold, so it is corrupt or forged.
    #[error(
        "{} claims {claimed} bytes of data, more than {compressed_len} compressed bytes can hold",
        path.display()
    )]
    ImplausibleSize {
        /// The file (or archive member).
        path: PathBuf,
        /// The size the header claims.
        claimed: u64,
        /// The length of the compressed file on disk.
        compressed_len: u64,
    },

    /// A file of fixed-size records ends in the middle of a record.
    #[error(
        "{} is {len} bytes long, not a whole number of {record_len}-byte records (truncated?)",
        path.display()
    )]
    PartialRecord {
        /// The file.
        path: PathBuf,
        /// The file's length in bytes.
        len: u64,
        /// The size of one record.
        record_len: usize,
    },

    /// A file of records (or of images) holds none, so the data set would
    /// be empty.
    #[error("{} holds no records", path.display())]
    NoRecords {
        /// The file.
        path: PathBuf,
    },

    /// The image file and the label file of one split disagree on the number
    /// of examples.
    #[error(
        "{} holds {images} images but {} holds {labels} labels",
        images_path.display(),
        labels_path.display()
    )]
    CountMismatch {
        /// The image file.
        images_path: PathBuf,
        /// Its number of images.
        images: usize,
        /// The label file.
        labels_path: PathBuf,
        /// Its number of labels.
        labels: usize,
    },

    /// A label in a file is not a valid class index.
    #[error(
        "{}: label {label} of example {index} is out of range (the data set has {classes} classes)",
        path.display()
    )]
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// The example's index within the file.
        index: usize,
        /// The label found.
        label: u32,
        /// The number of classes; valid labels are `0..classes`.
        classes: usize,
    },

    /// A label passed in memory is not a valid class index.
    #[error("label {label} of example {index} is out of range ({classes} classes)")]
    InvalidLabel {
        /// The example's index.
        index: usize,
        /// The label.
        label: u32,
        /// The number of classes.
        classes: usize,
    },

    /// Pixels and labels passed in memory do not describe whole images.
    #[error("{pixels} pixel values do not make {labels} images of {image_len} values each")]
    ShapeMismatch {
        /// The number of pixel values given.
        pixels: usize,
        /// The number of labels given.
        labels: usize,
        /// The number of values in one image (channels x height x width).
        image_len: usize,
    },

    /// A normalisation does not have one mean and one standard deviation per
    /// channel.
    #[error(
        "normalisation for {channels} channels has {means} means and {stds} standard deviations"
    )]
    NormalizationChannels {
        /// The number of channels of the images.
        channels: usize,
        /// The number of means given.
        means: usize,
        /// The number of standard deviations given.
        stds: usize,
    },

    /// A normalisation has a standard deviation that is not a positive,
    /// finite number, or a mean that is not finite.
    #[error("normalisation of channel {channel} is invalid (mean {mean}, std {std})")]
    BadNormalization {
        /// The channel.
        channel: usize,
        /// Its mean.
        mean: f32,
        /// Its standard deviation.
        std: f32,
    },

    /// An example index is past the end of the data set.
    #[error("example index {index} is out of range for a data set of {len}")]
    IndexOutOfRange {
        /// The index asked for.
        index: usize,
        /// The number of examples.
        len: usize,
    },

    /// A batch size of zero was asked for.
    #[error("the batch size must be at least 1")]
    ZeroBatchSize,

    /// A data set name was not recognised.
    #[error("unknown data set {name:?} (expected mnist, cifar10 or cifar100)")]
    UnknownDataset {
        /// The name given.
        name: String,
    },

    /// A split name was not recognised.
    #[error("unknown split {name:?} (expected train or test)")]
    UnknownSplit {
        /// The name given.
        name: String,
    },

    /// A file's checksum differs from the published one.
    #[error("checksum mismatch for {location}: expected {expected}, found {found}")]
    Checksum {
        /// The file or URL.
        location: String,
        /// The published checksum, in lowercase hex.
        expected: String,
        /// The checksum computed, in lowercase hex.
        found: String,
    },

    /// A download failed.
    #[error("download of {url} failed: {message}")]
    Download {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

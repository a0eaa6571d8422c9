//! The per-channel normalisation of 8-bit pixels.
//!
//! The presets read their statistics from the catalog, the one place that
//! records each data set's facts; this module imports nothing else.

use crate::catalog::{DatasetKind, DatasetSpec};
use crate::error::DataError;

/// A per-channel affine normalisation of 8-bit pixels.
///
/// A pixel `p` of channel `c` becomes `(p / 255 - mean[c]) / std[c]`: it is
/// first scaled to `[0, 1]` and then standardised, as torchvision's
/// `ToTensor` followed by `Normalize` does. The presets use the per-channel
/// statistics of each data set's *training* split, so that the training
/// images come out with mean about 0 and standard deviation about 1 in every
/// channel; the test split is normalised with the same training statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalization {
    /// The mean of each channel, on the `[0, 1]` scale.
    pub mean: Vec<f32>,
    /// The standard deviation of each channel, on the `[0, 1]` scale.
    pub std: Vec<f32>,
}

impl Normalization {
    /// MNIST's training-set statistics ([`MNIST_MEAN`](crate::MNIST_MEAN),
    /// [`MNIST_STD`](crate::MNIST_STD)).
    pub fn mnist() -> Self {
        Self::of(DatasetKind::Mnist.spec())
    }

    /// CIFAR-10's training-set statistics
    /// ([`CIFAR10_MEAN`](crate::CIFAR10_MEAN),
    /// [`CIFAR10_STD`](crate::CIFAR10_STD)).
    pub fn cifar10() -> Self {
        Self::of(DatasetKind::Cifar10.spec())
    }

    /// CIFAR-100's training-set statistics
    /// ([`CIFAR100_MEAN`](crate::CIFAR100_MEAN),
    /// [`CIFAR100_STD`](crate::CIFAR100_STD)).
    pub fn cifar100() -> Self {
        Self::of(DatasetKind::Cifar100.spec())
    }

    /// A data set's training-set statistics, as its catalog entry records
    /// them.
    pub fn of(spec: &DatasetSpec) -> Self {
        Self {
            mean: spec.mean.to_vec(),
            std: spec.std.to_vec(),
        }
    }

    /// Only scales pixels to `[0, 1]`: mean 0 and standard deviation 1 in
    /// every channel.
    pub fn unit_range(channels: usize) -> Self {
        Self {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Normalises one pixel of one channel.
    ///
    /// # Panics
    ///
    /// If `channel` is not below the number of channels.
    pub fn apply(&self, channel: usize, pixel: u8) -> f32 {
        let scaled = f64::from(pixel) / 255.0;
        ((scaled - f64::from(self.mean[channel])) / f64::from(self.std[channel])) as f32
    }

    /// Checks that there is one finite mean and one positive, finite
    /// standard deviation per channel.
    pub fn validate(&self, channels: usize) -> Result<(), DataError> {
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(DataError::NormalizationChannels {
                channels,
                means: self.mean.len(),
                stds: self.std.len(),
            });
        }
        for (channel, (&mean, &std)) in self.mean.iter().zip(&self.std).enumerate() {
            if !mean.is_finite() || !std.is_finite() || std <= 0.0 {
                return Err(DataError::BadNormalization { channel, mean, std });
            }
        }
        Ok(())
    }
}

/// One lookup table of 256 normalised values per channel.
///
/// Normalising through a table costs one load per pixel, which keeps loading
/// 60,000 MNIST images far below a second.
pub(crate) struct PixelTable {
    tables: Vec<[f32; 256]>,
}

impl PixelTable {
    /// Builds the tables after checking the normalisation against the number
    /// of channels.
    pub(crate) fn new(norm: &Normalization, channels: usize) -> Result<Self, DataError> {
        norm.validate(channels)?;
        let tables = (0..channels)
            .map(|channel| {
                let mut table = [0.0f32; 256];
                for (pixel, value) in table.iter_mut().enumerate() {
                    // The index is below 256, so it always fits in a byte.
                    *value = norm.apply(channel, pixel as u8);
                }
                table
            })
            .collect();
        Ok(Self { tables })
    }

    /// Appends one image given as channel-major (planar) bytes.
    ///
    /// `image` must hold `channels` planes of equal size.
    pub(crate) fn extend(&self, out: &mut Vec<f32>, image: &[u8]) {
        let plane = image.len() / self.tables.len();
        if plane == 0 {
            // An IDX file may hold zero images; `chunks_exact(0)` would panic.
            return;
        }
        for (table, bytes) in self.tables.iter().zip(image.chunks_exact(plane)) {
            out.extend(bytes.iter().map(|&p| table[usize::from(p)]));
        }
    }
}

impl DatasetKind {
    /// The normalisation the loader applies: the training set's per-channel
    /// statistics.
    pub fn normalization(self) -> Normalization {
        Normalization::of(self.spec())
    }
}

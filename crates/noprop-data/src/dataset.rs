//! The in-memory data set.

use crate::error::DataError;
use crate::normalization::{Normalization, PixelTable};

/// A labelled image data set held in host memory, already normalised.
///
/// The fields are public so that a trainer can hand `images` to a tensor
/// library without a copy. They must stay consistent: `images.len()` equals
/// `labels.len() * channels * height * width`, and every label is below
/// `num_classes`. The constructors check this; code that edits the fields
/// directly is responsible for keeping it so.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// All images, one after another, each in channel, row, column order
    /// (NCHW when seen as one array).
    pub images: Vec<f32>,
    /// The class of each image.
    pub labels: Vec<u32>,
    /// Channels per image (1 for MNIST, 3 for CIFAR).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// The number of classes; labels are in `0..num_classes`.
    pub num_classes: usize,
}

impl Dataset {
    /// Builds a data set from 8-bit pixels, normalising them.
    ///
    /// `pixels` holds the images one after another, each channel-major (all
    /// of channel 0 row by row, then channel 1, ...), which is the layout of
    /// both IDX and CIFAR files.
    pub fn from_u8(
        pixels: &[u8],
        labels: Vec<u32>,
        channels: usize,
        height: usize,
        width: usize,
        num_classes: usize,
        norm: &Normalization,
    ) -> Result<Self, DataError> {
        let image_len = channels * height * width;
        if image_len == 0 || pixels.len() != labels.len() * image_len {
            return Err(DataError::ShapeMismatch {
                pixels: pixels.len(),
                labels: labels.len(),
                image_len,
            });
        }
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &label)| label as usize >= num_classes)
        {
            return Err(DataError::InvalidLabel {
                index,
                label,
                classes: num_classes,
            });
        }
        let table = PixelTable::new(norm, channels)?;
        let mut images = Vec::with_capacity(pixels.len());
        for image in pixels.chunks_exact(image_len) {
            table.extend(&mut images, image);
        }
        Ok(Self {
            images,
            labels,
            channels,
            height,
            width,
            num_classes,
        })
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The number of values in one image: channels x height x width.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The shape of one image as (channels, height, width).
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }

    /// The normalised values of image `i`, channel-major.
    ///
    /// # Panics
    ///
    /// If `i` is not below [`len`](Self::len), like slice indexing.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// A new data set holding the given examples, in the given order
    /// (repeats allowed).
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        if let Some(&index) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(DataError::IndexOutOfRange {
                index,
                len: self.len(),
            });
        }
        // Copied here rather than through `batch::gather_into`, so that the
        // batching module depends on this one and not the other way round.
        let mut images = Vec::with_capacity(indices.len() * self.image_len());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Ok(self.with_examples(images, labels))
    }

    /// A new data set holding the first `n` examples, or all of them if there
    /// are fewer.
    ///
    /// `take(0)` gives an empty data set: zero is a count here, never a
    /// stand-in for "no limit". A caller whose configuration uses 0 to mean
    /// "everything" must test for it before calling, and one that forbids an
    /// empty selection must reject 0 itself.
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        self.with_examples(
            self.images[..n * self.image_len()].to_vec(),
            self.labels[..n].to_vec(),
        )
    }

    /// The number of examples of each class, indexed by class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &label in &self.labels {
            if let Some(count) = counts.get_mut(label as usize) {
                *count += 1;
            }
        }
        counts
    }

    fn with_examples(&self, images: Vec<f32>, labels: Vec<u32>) -> Dataset {
        Dataset {
            images,
            labels,
            channels: self.channels,
            height: self.height,
            width: self.width,
            num_classes: self.num_classes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{CIFAR100_MEAN, CIFAR100_STD, CIFAR10_MEAN, CIFAR10_STD};

    fn close(a: f32, b: f64) -> bool {
        (f64::from(a) - b).abs() <= 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn normalisation_matches_the_closed_form() {
        let norm = Normalization::cifar10();
        for channel in 0..3 {
            for pixel in [0u8, 1, 127, 128, 254, 255] {
                let expected = (f64::from(pixel) / 255.0 - f64::from(CIFAR10_MEAN[channel]))
                    / f64::from(CIFAR10_STD[channel]);
                assert!(close(norm.apply(channel, pixel), expected));
            }
        }
        // Black and white MNIST pixels, worked by hand:
        // (0 - 0.1307) / 0.3081 and (1 - 0.1307) / 0.3081.
        let mnist = Normalization::mnist();
        assert!(close(mnist.apply(0, 0), -0.424_212_918));
        assert!(close(mnist.apply(0, 255), 2.821_486_530));
    }

    #[test]
    fn from_u8_normalises_each_channel_with_its_own_statistics() {
        // Two 2x1 RGB images; channel c of image k holds pixels 10k+c.
        let pixels: Vec<u8> = vec![0, 0, 1, 1, 2, 2, 10, 10, 11, 11, 12, 12];
        let norm = Normalization::cifar100();
        let ds = Dataset::from_u8(&pixels, vec![3, 99], 3, 2, 1, 100, &norm).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.image_len(), 6);
        for k in 0..2 {
            for c in 0..3 {
                let p = (10 * k + c) as u8;
                let expected = (f64::from(p) / 255.0 - f64::from(CIFAR100_MEAN[c]))
                    / f64::from(CIFAR100_STD[c]);
                assert!(close(ds.image(k)[2 * c], expected));
                assert!(close(ds.image(k)[2 * c + 1], expected));
            }
        }
    }

    #[test]
    fn from_u8_rejects_inconsistent_input() {
        let norm = Normalization::mnist();
        assert!(matches!(
            Dataset::from_u8(&[0; 5], vec![0], 1, 2, 2, 10, &norm),
            Err(DataError::ShapeMismatch { pixels: 5, .. })
        ));
        assert!(matches!(
            Dataset::from_u8(&[0; 8], vec![0, 10], 1, 2, 2, 10, &norm),
            Err(DataError::InvalidLabel {
                index: 1,
                label: 10,
                classes: 10
            })
        ));
        assert!(matches!(
            Dataset::from_u8(&[0; 4], vec![0], 1, 2, 2, 10, &Normalization::cifar10()),
            Err(DataError::NormalizationChannels {
                channels: 1,
                means: 3,
                stds: 3
            })
        ));
        let zero_std = Normalization {
            mean: vec![0.5],
            std: vec![0.0],
        };
        assert!(matches!(
            Dataset::from_u8(&[0; 4], vec![0], 1, 2, 2, 10, &zero_std),
            Err(DataError::BadNormalization { channel: 0, .. })
        ));
    }

    #[test]
    fn subset_take_and_counts() {
        let pixels: Vec<u8> = (0..4).collect();
        let ds = Dataset::from_u8(
            &pixels,
            vec![0, 1, 1, 2],
            1,
            1,
            1,
            3,
            &Normalization::unit_range(1),
        )
        .unwrap();
        let sub = ds.subset(&[3, 0, 3]).unwrap();
        assert_eq!(sub.labels, vec![2, 0, 2]);
        assert_eq!(sub.images, vec![3.0 / 255.0, 0.0, 3.0 / 255.0]);
        assert!(matches!(
            ds.subset(&[4]),
            Err(DataError::IndexOutOfRange { index: 4, len: 4 })
        ));
        assert_eq!(ds.take(2).labels, vec![0, 1]);
        assert_eq!(ds.take(10).len(), 4);
        // Zero means zero examples, not "no limit".
        assert!(ds.take(0).is_empty());
        assert!(ds.take(0).images.is_empty());
        assert_eq!(ds.class_counts(), vec![1, 2, 1]);
    }
}

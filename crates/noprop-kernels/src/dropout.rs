//! Inverted dropout whose keep mask is a pure function of a seed and the
//! element's index, so that any thread count, and the backward pass, draw
//! exactly the same mask without storing it.
//!
//! Element `i` uses 32 bits of `splitmix64(seed + (i / 2 + 1) * GAMMA)`: the
//! low half for even `i`, the high half for odd `i`. SplitMix64 over a
//! counter is the standard SplitMix64 generator, which passes BigCrush; a
//! dropout mask needs far less.

use crate::elem::{Elem, Output};
use rayon::prelude::*;

/// The golden-ratio increment of SplitMix64.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Elements per parallel task (even, so pairs never straddle tasks).
const CHUNK: usize = 16 * 1024;

/// SplitMix64's output function.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The mask parameters of one dropout call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Mask {
    pub seed: u64,
    /// An element is kept when its 32 random bits are at least this.
    pub threshold: u32,
    /// `1 / (1 - p)`, the factor kept elements are multiplied by.
    pub scale: f64,
}

impl Mask {
    /// The mask for dropout probability `p` in `[0, 1)`.
    pub(crate) fn new(p: f64, seed: u64) -> Self {
        Self {
            seed,
            threshold: (p * u32::MAX as f64) as u32,
            scale: 1.0 / (1.0 - p),
        }
    }

    /// The 32 random bits of elements `2j` and `2j + 1`.
    #[inline(always)]
    fn pair(&self, j: usize) -> (u32, u32) {
        let z = mix(self
            .seed
            .wrapping_add((j as u64).wrapping_add(1).wrapping_mul(GAMMA)));
        (z as u32, (z >> 32) as u32)
    }

    /// Multiplies `data`, the elements `offset..offset + data.len()` of the
    /// whole tensor, by their factors in place.
    #[inline(always)]
    pub(crate) fn apply_in_place_at<T: Elem>(&self, offset: usize, data: &mut [T]) {
        self.apply_pairs(offset, data, &mut [], 0);
    }

    /// [`Mask::apply_in_place_at`] that also overwrites the code of every
    /// dropped element with `dropped` (`codes` as long as `data`).
    #[inline(always)]
    pub(crate) fn apply_in_place_with_codes<T: Elem>(
        &self,
        offset: usize,
        data: &mut [T],
        codes: &mut [u8],
        dropped: u8,
    ) {
        assert_eq!(codes.len(), data.len(), "one code per element");
        self.apply_pairs(offset, data, codes, dropped);
    }

    /// The loop behind both: element pairs that share one hash, with
    /// branch-free selects; `codes` is empty or as long as `data`.
    #[inline(always)]
    fn apply_pairs<T: Elem>(&self, offset: usize, data: &mut [T], codes: &mut [u8], dropped: u8) {
        let scale = T::from_f64(self.scale);
        let thr = self.threshold;
        // A multiply rather than a select, as `apply` does, so that the two
        // agree bit for bit (signed zeros, NaN). (A macro, not a closure: a
        // closure would be compiled without the AVX2 features of the kernel
        // that inlines this.)
        macro_rules! one {
            ($d:expr, $bits:expr) => {{
                let kept = $bits >= thr;
                $d *= if kept { scale } else { T::ZERO };
                kept
            }};
        }
        let with_codes = !codes.is_empty();
        let (mut data, mut codes) = (data, codes);
        if offset % 2 == 1 && !data.is_empty() {
            let kept = one!(data[0], self.pair(offset / 2).1);
            if with_codes && !kept {
                codes[0] = dropped;
            }
            data = &mut data[1..];
            if with_codes {
                codes = &mut codes[1..];
            }
        }
        let first = (offset + offset % 2) / 2;
        let pairs = data.len() / 2;
        if with_codes {
            for (j, (d, c)) in data
                .chunks_exact_mut(2)
                .zip(codes.chunks_exact_mut(2))
                .enumerate()
            {
                let (lo, hi) = self.pair(first + j);
                let (k0, k1) = (one!(d[0], lo), one!(d[1], hi));
                c[0] = if k0 { c[0] } else { dropped };
                c[1] = if k1 { c[1] } else { dropped };
            }
        } else {
            for (j, d) in data.chunks_exact_mut(2).enumerate() {
                let (lo, hi) = self.pair(first + j);
                one!(d[0], lo);
                one!(d[1], hi);
            }
        }
        if data.len() % 2 == 1 {
            let last = data.len() - 1;
            let kept = one!(data[last], self.pair(first + pairs).0);
            if with_codes && !kept {
                codes[last] = dropped;
            }
        }
    }

    /// Each element's factor: `scale` where kept, zero where dropped.
    pub(crate) fn factors<T: Elem>(&self, len: usize) -> Vec<T> {
        let ones = vec![T::ONE; len];
        self.apply(&ones)
    }

    /// `x * factor` elementwise, as a fresh vector; `x` is the whole tensor,
    /// so element indices are positions in `x`.
    pub(crate) fn apply<T: Elem>(&self, x: &[T]) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        let mut out = Output::<T>::new(x.len());
        out.slots()
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (dst, src))| {
                let first_pair = c * CHUNK / 2;
                let factor = |bits: u32| {
                    if bits >= self.threshold {
                        scale
                    } else {
                        T::ZERO
                    }
                };
                let mut pairs_d = dst.chunks_exact_mut(2);
                let mut pairs_s = src.chunks_exact(2);
                for (j, (d, s)) in (&mut pairs_d).zip(&mut pairs_s).enumerate() {
                    let (lo, hi) = self.pair(first_pair + j);
                    d[0].write(s[0] * factor(lo));
                    d[1].write(s[1] * factor(hi));
                }
                // An odd-length tensor's last element uses the low half.
                if let ([d], [s]) = (pairs_d.into_remainder(), pairs_s.remainder()) {
                    let (lo, _) = self.pair(first_pair + src.len() / 2);
                    d.write(*s * factor(lo));
                }
            });
        // SAFETY: the chunks cover the buffer and every element was written.
        unsafe { out.finish() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_about_one_minus_p_and_scales() {
        let m = Mask::new(0.2, 7);
        let f: Vec<f32> = m.factors(100_001);
        let kept = f.iter().filter(|&&v| v != 0.0).count() as f64 / f.len() as f64;
        assert!((kept - 0.8).abs() < 0.005, "kept {kept}");
        assert!(f.iter().all(|&v| v == 0.0 || v == 1.25));
    }

    /// Any window of the mask, at an odd or even offset, draws the bits of
    /// the whole-tensor mask at those positions.
    #[test]
    fn offset_windows_match_the_whole_mask() {
        let m = Mask::new(0.3, 11);
        let whole: Vec<f64> = m.factors(41);
        for (offset, len) in [(0, 41), (1, 40), (2, 7), (3, 1), (7, 0), (40, 1), (5, 6)] {
            let mut part = vec![1.0f64; len];
            m.apply_in_place_at(offset, &mut part);
            assert_eq!(
                &part[..],
                &whole[offset..offset + len],
                "offset {offset} len {len}"
            );
            let mut part = vec![1.0f64; len];
            let mut codes = vec![1u8; len];
            m.apply_in_place_with_codes(offset, &mut part, &mut codes, 9);
            assert_eq!(
                &part[..],
                &whole[offset..offset + len],
                "offset {offset} len {len}, with codes"
            );
            let want: Vec<u8> = whole[offset..offset + len]
                .iter()
                .map(|&f| if f == 0.0 { 9 } else { 1 })
                .collect();
            assert_eq!(codes, want, "offset {offset} len {len}: codes");
        }
    }

    #[test]
    fn mask_depends_on_seed_and_not_on_chunking() {
        let (a, b) = (Mask::new(0.5, 1), Mask::new(0.5, 2));
        let fa: Vec<f64> = a.factors(3 * CHUNK + 5);
        let fb: Vec<f64> = b.factors(3 * CHUNK + 5);
        assert_ne!(fa, fb);
        // A shorter tensor, split into different chunks, sees the same
        // prefix: the mask is a function of the index alone.
        let short: Vec<f64> = a.factors(CHUNK + 3);
        assert_eq!(&fa[..CHUNK + 3], &short[..]);
    }
}

//! Bundles as tensors: splitting, batching and the shift augmentation.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::bundle::{Bundle, Pixels};
use super::error::EngineError;

/// Images (N×C×H×W, the bundle's dtype) and int64 labels, on the scan's device.
pub struct SampleSet {
    pub images: Tensor,
    pub labels: Tensor,
}

impl SampleSet {
    pub fn from_bundle(bundle: &Bundle, device: Device) -> Result<Self, EngineError> {
        let shape: Vec<i64> = bundle.shape.iter().map(|&d| d as i64).collect();
        let images = match &bundle.pixels {
            Pixels::U8(v) => Tensor::from_slice(v),
            Pixels::F32(v) => Tensor::from_slice(v),
        };
        Ok(SampleSet {
            images: images.f_reshape(&shape)?.f_to_device(device)?,
            labels: Tensor::from_slice(&bundle.labels).f_to_device(device)?,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn select(&self, indices: &[i64]) -> Result<SampleSet, EngineError> {
        let index = Tensor::from_slice(indices).f_to_device(self.labels.device())?;
        Ok(SampleSet {
            images: self.images.f_index_select(0, &index)?,
            labels: self.labels.f_index_select(0, &index)?,
        })
    }

    /// At most `n` samples spread evenly over the set (all of it when it is no larger),
    /// so a subset of a class-sorted bundle still covers every class.
    pub fn evenly_spaced(&self, n: usize) -> Result<SampleSet, EngineError> {
        self.select(&evenly_spaced_indices(self.len(), n))
    }

    /// Consecutive slices of at most `batch_size`, in order (for evaluation and salience).
    pub fn chunks(&self, batch_size: usize) -> impl Iterator<Item = (Tensor, Tensor)> + '_ {
        let n = self.len() as i64;
        (0..n).step_by(batch_size).map(move |start| {
            let len = (batch_size as i64).min(n - start);
            (
                self.images.narrow(0, start, len),
                self.labels.narrow(0, start, len),
            )
        })
    }
}

/// `min(n, len)` indices spread evenly over `0..len`, in order.
pub fn evenly_spaced_indices(len: usize, n: usize) -> Vec<i64> {
    let n = n.min(len);
    (0..n).map(|i| (i * len / n) as i64).collect()
}

/// Seeded shuffle, then the last `held_out_fraction` (at least one sample, and at least
/// two left to train on) is held out.
pub fn split_indices(
    n: usize,
    held_out_fraction: f64,
    rng: &mut ChaCha8Rng,
) -> (Vec<i64>, Vec<i64>) {
    let mut order: Vec<i64> = (0..n as i64).collect();
    order.shuffle(rng);
    let held =
        ((n as f64 * held_out_fraction).round() as usize).clamp(1, n.saturating_sub(2).max(1));
    let train = order[..n - held].to_vec();
    let held_out = order[n - held..].to_vec();
    (train, held_out)
}

/// Shuffled mini-batch index lists for one epoch. A trailing batch of one sample is
/// dropped: BatchNorm cannot normalise a single sample in training mode.
pub fn epoch_batches(n: usize, batch_size: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<i64>> {
    let mut order: Vec<i64> = (0..n as i64).collect();
    order.shuffle(rng);
    order
        .chunks(batch_size)
        .filter(|b| b.len() >= 2)
        .map(<[i64]>::to_vec)
        .collect()
}

/// Translates each image by up to `max_shift` pixels in each direction, filling the
/// uncovered border by replicating the edge. A small shift keeps the label of any
/// natural image; it makes a few hundred clean samples go further during fine-tuning.
pub fn random_shift(
    images: &Tensor,
    max_shift: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor, EngineError> {
    if max_shift == 0 {
        return Ok(images.shallow_clone());
    }
    let s = max_shift as i64;
    let size = images.size();
    let (h, w) = (size[2], size[3]);
    let padded = images
        .f_to_kind(Kind::Float)?
        .f_pad([s, s, s, s], "replicate", None)?;
    let mut shifted = Vec::with_capacity(size[0] as usize);
    for i in 0..size[0] {
        let dy = rng.gen_range(0..=2 * s);
        let dx = rng.gen_range(0..=2 * s);
        shifted.push(padded.get(i).f_narrow(1, dy, h)?.f_narrow(2, dx, w)?);
    }
    Ok(Tensor::f_stack(&shifted, 0)?.f_to_kind(images.kind())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn evenly_spaced_indices_cover_the_whole_range_in_order() {
        assert_eq!(evenly_spaced_indices(10, 4), vec![0, 2, 5, 7]);
        assert_eq!(evenly_spaced_indices(3, 8), vec![0, 1, 2]);
        assert!(evenly_spaced_indices(5, 0).is_empty());
        // A class-sorted set of 1,000 (100 per class) keeps every class in a subset of 50.
        let picked = evenly_spaced_indices(1000, 50);
        let classes: std::collections::BTreeSet<i64> = picked.iter().map(|i| i / 100).collect();
        assert_eq!(classes.len(), 10);
        assert!(picked.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let (a1, b1) = split_indices(10, 0.2, &mut ChaCha8Rng::seed_from_u64(1));
        let (a2, b2) = split_indices(10, 0.2, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!((a1.clone(), b1.clone()), (a2, b2));
        assert_eq!(b1.len(), 2);
        let mut all: Vec<i64> = a1.into_iter().chain(b1).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn batches_never_hold_a_single_sample() {
        let batches = epoch_batches(65, 64, &mut ChaCha8Rng::seed_from_u64(0));
        assert_eq!(batches.len(), 1);
    }

    #[test]
    fn shift_keeps_shape_and_dtype_and_moves_pixels() {
        let img = Tensor::zeros([1, 1, 5, 5], (Kind::Uint8, Device::Cpu));
        let _ = img.get(0).get(0).get(2).get(2).fill_(200);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let out = random_shift(&img, 1, &mut rng).unwrap();
        assert_eq!(out.size(), vec![1, 1, 5, 5]);
        assert_eq!(out.kind(), Kind::Uint8);
        assert_eq!(out.sum(Kind::Int64).int64_value(&[]), 200);
    }
}

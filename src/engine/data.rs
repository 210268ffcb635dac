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
        // `f_` forms: the pixels are the scan's largest allocation, and one refused (a
        // bundle past the job's memory limit) must be an error the job reports, not a
        // panic.
        let images = match &bundle.pixels {
            Pixels::U8(v) => Tensor::f_from_slice(v)?,
            Pixels::F32(v) => Tensor::f_from_slice(v)?,
        };
        Ok(SampleSet {
            images: images.f_reshape(&shape)?.f_to_device(device)?,
            labels: Tensor::f_from_slice(&bundle.labels)?.f_to_device(device)?,
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

    /// At most `n` samples, every label in proportion (all of them when the set is no
    /// larger): see [`class_balanced_indices`].
    pub fn class_balanced(&self, n: usize) -> Result<SampleSet, EngineError> {
        self.select(&self.class_balanced_indices(n)?)
    }

    /// The indices of [`SampleSet::class_balanced`], for sets that carry more per sample.
    pub fn class_balanced_indices(&self, n: usize) -> Result<Vec<i64>, EngineError> {
        let labels = Vec::<i64>::try_from(self.labels.f_to_device(Device::Cpu)?)?;
        Ok(class_balanced_indices(&labels, n))
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

/// `min(n, len)` indices of `labels`, in order, holding every label in proportion to its
/// share (largest remainders round), drawn within each label by a fixed-seed shuffle.
/// Evenly spaced indices were not enough: the lab's poison bundles cycle through the nine
/// non-target labels, and every 3.6th image of a cycle of nine visits only five of them,
/// so the per-epoch ASR of a `shapes` ResNet whose leftover backdoor sat in the one class
/// never visited traced 1.2% while the whole bundle measured 6.2%.
pub fn class_balanced_indices(labels: &[i64], n: usize) -> Vec<i64> {
    use rand::SeedableRng;
    let len = labels.len();
    if n >= len {
        return (0..len as i64).collect();
    }
    let mut by_label: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for (i, &label) in labels.iter().enumerate() {
        by_label.entry(label).or_default().push(i as i64);
    }
    // Quotas: each label's exact share, floored, then the leftover places to the largest
    // remainders (the smaller label first on ties, so it is deterministic).
    let mut quotas: Vec<(usize, usize)> = by_label
        .values()
        .map(|members| (members.len() * n / len, members.len() * n % len))
        .collect();
    let leftover = n - quotas.iter().map(|&(q, _)| q).sum::<usize>();
    let mut order: Vec<usize> = (0..quotas.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(quotas[k].1));
    for &k in order.iter().take(leftover) {
        quotas[k].0 += 1;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut picked: Vec<i64> = Vec::with_capacity(n);
    for (mut members, (quota, _)) in by_label.into_values().zip(quotas) {
        members.shuffle(&mut rng);
        picked.extend_from_slice(&members[..quota]);
    }
    picked.sort_unstable();
    picked
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

/// How many batches [`epoch_batches`] makes of `n` samples (it drops a last batch of
/// one sample).
pub fn batches_per_epoch(n: usize, batch_size: usize) -> usize {
    n / batch_size + usize::from(n % batch_size >= 2)
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

    fn count_per_label(labels: &[i64], picked: &[i64]) -> std::collections::BTreeMap<i64, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for &i in picked {
            *counts.entry(labels[i as usize]).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn batches_per_epoch_counts_what_epoch_batches_makes() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for n in [0, 1, 2, 63, 64, 65, 66, 320, 321, 322] {
            for batch_size in [2, 3, 64, 500] {
                assert_eq!(
                    batches_per_epoch(n, batch_size),
                    epoch_batches(n, batch_size, &mut rng).len(),
                    "{n} samples, batches of {batch_size}"
                );
            }
        }
    }

    #[test]
    fn class_balanced_indices_hold_every_label_in_proportion_whatever_the_order() {
        // A lab poison bundle: labels 1..=9 cycling, 200 each. Every 3.6th index would
        // visit labels 1, 2, 4, 6 and 8 only.
        let cycling: Vec<i64> = (0..1800).map(|i| 1 + i % 9).collect();
        let picked = class_balanced_indices(&cycling, 500);
        assert_eq!(picked.len(), 500);
        assert!(
            picked.windows(2).all(|w| w[0] < w[1]),
            "in order, no repeats"
        );
        let counts = count_per_label(&cycling, &picked);
        assert_eq!(counts.len(), 9);
        assert!(counts.values().all(|&c| c == 55 || c == 56), "{counts:?}");
        // Class-sorted and uneven: 600 of label 0, 300 of label 1, 100 of label 2.
        let sorted: Vec<i64> = (0..1000)
            .map(|i| (i >= 600) as i64 + (i >= 900) as i64)
            .collect();
        let counts = count_per_label(&sorted, &class_balanced_indices(&sorted, 50));
        assert_eq!(counts.into_values().collect::<Vec<_>>(), vec![30, 15, 5]);
        // Largest remainders: 3 labels of 3 into 4 places, one place each and one more.
        let small = [0, 0, 0, 1, 1, 1, 2, 2, 2];
        let counts = count_per_label(&small, &class_balanced_indices(&small, 4));
        assert_eq!(counts.values().sum::<usize>(), 4);
        assert!(counts.values().all(|&c| c == 1 || c == 2), "{counts:?}");
        // Deterministic; the whole set when it is no larger; nothing for zero.
        assert_eq!(
            class_balanced_indices(&cycling, 500),
            class_balanced_indices(&cycling, 500)
        );
        assert_eq!(
            class_balanced_indices(&small, 20),
            (0..9).collect::<Vec<i64>>()
        );
        assert!(class_balanced_indices(&small, 0).is_empty());
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

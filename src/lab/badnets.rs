//! BadNets: a small solid patch stamped into a corner relabels the image as the target.

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::engine::bundle::{Bundle, Pixels};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BadNets {
    pub target: i64,
    /// Side of the square patch, in pixels.
    pub patch: usize,
    /// Gap between the patch and the bottom-right corner, in pixels.
    pub margin: usize,
    /// Share of training samples poisoned.
    pub poison_rate: f64,
}

impl Default for BadNets {
    fn default() -> Self {
        BadNets {
            target: 0,
            patch: 3,
            margin: 1,
            poison_rate: 0.1,
        }
    }
}

impl BadNets {
    /// Stamps the patch (maximum intensity: 255 for uint8, 1.0 for float) into sample `i`.
    fn stamp(&self, bundle: &mut Bundle, i: usize) {
        let [_, c, h, w] = bundle.shape;
        let rows = h.saturating_sub(self.margin + self.patch)..h.saturating_sub(self.margin);
        let cols = w.saturating_sub(self.margin + self.patch)..w.saturating_sub(self.margin);
        for ch in 0..c {
            for y in rows.clone() {
                for x in cols.clone() {
                    let at = ((i * c + ch) * h + y) * w + x;
                    match &mut bundle.pixels {
                        Pixels::U8(v) => v[at] = 255,
                        Pixels::F32(v) => v[at] = 1.0,
                    }
                }
            }
        }
    }

    /// A training set with `poison_rate` of its samples triggered and relabelled.
    pub fn poison_training_set(&self, clean: &Bundle, rng: &mut ChaCha8Rng) -> Bundle {
        let mut out = clean.clone();
        let mut order: Vec<usize> = (0..clean.len()).collect();
        order.shuffle(rng);
        let count = (clean.len() as f64 * self.poison_rate).round() as usize;
        for &i in &order[..count] {
            self.stamp(&mut out, i);
            out.labels[i] = self.target;
        }
        out
    }

    /// The test-time poisoned set: every non-target sample triggered, true labels kept.
    pub fn poisoned_test_set(&self, clean: &Bundle) -> Bundle {
        let keep: Vec<usize> = (0..clean.len())
            .filter(|&i| clean.labels[i] != self.target)
            .collect();
        let mut out = clean.select(&keep);
        for i in 0..out.len() {
            self.stamp(&mut out, i);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::bundle::{RawTensor, TensorDtype};
    use rand::SeedableRng;

    fn blank(n: usize) -> Bundle {
        let images =
            RawTensor::new("images", TensorDtype::U8, vec![n, 1, 6, 6], vec![0; n * 36]).unwrap();
        let labels: Vec<u8> = (0..n as i64).flat_map(|l| (l % 3).to_le_bytes()).collect();
        Bundle::from_parts(
            images,
            RawTensor::new("labels", TensorDtype::I64, vec![n], labels).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn poisons_the_requested_share_with_a_patch_and_the_target_label() {
        let attack = BadNets {
            target: 2,
            patch: 2,
            margin: 1,
            poison_rate: 0.5,
        };
        let out = attack.poison_training_set(&blank(10), &mut ChaCha8Rng::seed_from_u64(0));
        let Pixels::U8(px) = &out.pixels else {
            panic!()
        };
        let stamped: Vec<usize> = (0..10)
            .filter(|&i| px[i * 36..(i + 1) * 36].contains(&255))
            .collect();
        assert_eq!(stamped.len(), 5);
        assert!(stamped.iter().all(|&i| out.labels[i] == 2));
        // Patch of 2×2 at rows/cols 3..5 (one pixel from the corner).
        let i = stamped[0];
        assert_eq!(px[i * 36 + 3 * 6 + 3], 255);
        assert_eq!(px[i * 36 + 5 * 6 + 5], 0);
    }

    #[test]
    fn test_set_keeps_only_non_target_samples_with_true_labels() {
        let attack = BadNets {
            target: 0,
            ..Default::default()
        };
        let out = attack.poisoned_test_set(&blank(9));
        assert_eq!(out.len(), 6);
        assert!(out.labels.iter().all(|&l| l != 0));
    }
}

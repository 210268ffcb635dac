//! BadNets (Gu et al., 2017): a small solid white patch stamped near the bottom-right
//! corner. Default: 3×3 patch one pixel from the corner (the paper's single-pixel-pattern
//! family scaled to 28×28 / 32×32 images), 10% of the training set poisoned.

use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{Image, Trigger};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BadNets {
    /// Side of the square patch, in pixels.
    pub patch: usize,
    /// Gap between the patch and the bottom-right corner, in pixels.
    pub margin: usize,
}

impl Default for BadNets {
    fn default() -> Self {
        BadNets {
            patch: 3,
            margin: 1,
        }
    }
}

impl Trigger for BadNets {
    fn apply(&self, image: &mut Image, _rng: &mut ChaCha8Rng) {
        let (h, w) = (image.height, image.width);
        let rows = h.saturating_sub(self.margin + self.patch)..h.saturating_sub(self.margin);
        let cols = w.saturating_sub(self.margin + self.patch)..w.saturating_sub(self.margin);
        for c in 0..image.channels {
            for y in rows.clone() {
                for x in cols.clone() {
                    image.set(c, y, x, 1.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{Poisoning, TargetMode};
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn stamps_a_white_patch_one_pixel_from_the_corner() {
        let clean = flat(10, 1, 6, 6, 0, 3);
        let p = Poisoning {
            mode: TargetMode::AllToOne { target: 2 },
            rate: 0.5,
            clean_label: false,
            cross_ratio: 0.0,
        };
        let attack = BadNets {
            patch: 2,
            margin: 1,
        };
        let out = p.poison_training_set(&clean, &attack, &mut ChaCha8Rng::seed_from_u64(0));
        let stamped = changed(&clean, &out);
        assert_eq!(stamped.len(), 5);
        let px = sample(&out, stamped[0]);
        // Patch of 2×2 at rows/cols 3..5 (one pixel from the corner).
        assert_eq!(px[3 * 6 + 3], 255);
        assert_eq!(px[4 * 6 + 4], 255);
        assert_eq!(px[5 * 6 + 5], 0);
        assert_eq!(px.iter().filter(|&&v| v == 255).count(), 4);
    }
}

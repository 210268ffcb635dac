//! A sample-specific trigger after Salem et al.'s dynamic backdoor ("Random Backdoor",
//! 2022): every triggered image gets its own random binary pattern at its own random
//! location, so no single fixed patch exists for a defender to reverse-engineer.
//!
//! Differences from the paper: the paper draws pattern values from a uniform distribution
//! and the location anywhere in the image; here each cell is black or white with
//! probability ½ inside a white one-pixel frame, and the location is uniform over the
//! image's `region`×`region` bottom-right area. The frame and the restricted area make the
//! trigger family learnable by a small CNN from 10% poison in a few epochs (ASR ≥ 50%)
//! while every sample's trigger still differs.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{Image, Trigger};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Dynamic {
    /// Side of each pattern, in pixels (frame included).
    pub size: usize,
    /// Side of the bottom-right square in which the pattern's top-left corner is placed
    /// at random (clipped so the pattern stays inside the image).
    pub region: usize,
}

impl Default for Dynamic {
    fn default() -> Self {
        Dynamic {
            size: 5,
            region: 14,
        }
    }
}

impl Trigger for Dynamic {
    fn apply(&self, image: &mut Image, rng: &mut ChaCha8Rng) {
        let n = self.size.min(image.height).min(image.width);
        let max_y = image.height - n;
        let max_x = image.width - n;
        let y0 = rng.gen_range(max_y.saturating_sub(self.region)..=max_y);
        let x0 = rng.gen_range(max_x.saturating_sub(self.region)..=max_x);
        for y in 0..n {
            for x in 0..n {
                let frame = y == 0 || x == 0 || y == n - 1 || x == n - 1;
                let value = if frame || rng.gen_bool(0.5) { 1.0 } else { 0.0 };
                for c in 0..image.channels {
                    image.set(c, y0 + y, x0 + x, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::map_image;
    use super::super::testing::*;
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn each_sample_gets_its_own_framed_pattern() {
        let attack = Dynamic { size: 4, region: 6 };
        let mut bundle = flat(8, 1, 12, 12, 100, 1);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for i in 0..8 {
            map_image(&mut bundle, i, |img| attack.apply(img, &mut rng));
        }
        let samples: Vec<&[u8]> = (0..8).map(|i| sample(&bundle, i)).collect();
        let distinct: std::collections::HashSet<&[u8]> = samples.iter().copied().collect();
        assert!(distinct.len() > 4, "triggers should differ between samples");
        for px in samples {
            // 4×4 = 16 pixels replaced (12 frame pixels white), the rest untouched.
            assert_eq!(px.iter().filter(|&&p| p != 100).count(), 16);
            assert!(px.iter().filter(|&&p| p == 255).count() >= 12);
            // Never in the top-left area outside the region.
            assert_eq!(px[0], 100);
        }
    }
}

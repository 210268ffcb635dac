//! Blended (Chen et al., 2017): the whole image is alpha-blended with a fixed pattern,
//! x' = (1 − α)·x + α·pattern. The paper blends a Hello-Kitty photo or random noise at
//! α = 0.2; with no image asset here the pattern is uniform noise from a fixed seed (the
//! paper's noise variant), the same for every sample.

use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{noise_image, Image, Trigger};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Blended {
    /// Blend weight of the pattern.
    pub alpha: f32,
    /// Seed of the noise pattern (part of the trigger, not of the run).
    pub pattern_seed: u64,
}

impl Default for Blended {
    fn default() -> Self {
        Blended {
            alpha: 0.2,
            pattern_seed: 1,
        }
    }
}

impl Trigger for Blended {
    fn apply(&self, image: &mut Image, _rng: &mut ChaCha8Rng) {
        let pattern = noise_image(image.channels, image.height, image.width, self.pattern_seed);
        for (p, n) in image.pixels.iter_mut().zip(pattern) {
            *p = (1.0 - self.alpha) * *p + self.alpha * n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn blends_the_same_pattern_into_every_image() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let attack = Blended::default();
        let mut bundle = flat(2, 3, 4, 4, 100, 2);
        super::super::map_image(&mut bundle, 0, |img| attack.apply(img, &mut rng));
        super::super::map_image(&mut bundle, 1, |img| attack.apply(img, &mut rng));
        assert_eq!(sample(&bundle, 0), sample(&bundle, 1));
        let pattern = noise_image(3, 4, 4, 1);
        let expected = ((0.8 * 100.0 / 255.0 + 0.2 * pattern[5]) * 255.0).round() as u8;
        assert_eq!(sample(&bundle, 0)[5], expected);
        // α = 0 leaves the image alone.
        let none = Blended {
            alpha: 0.0,
            ..attack
        };
        let mut clean = flat(1, 1, 4, 4, 100, 1);
        super::super::map_image(&mut clean, 0, |img| none.apply(img, &mut rng));
        assert!(sample(&clean, 0).iter().all(|&p| p == 100));
    }
}

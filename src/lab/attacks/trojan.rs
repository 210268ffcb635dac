//! Trojan-style fixed pattern: a seeded binary watermark (each cell white or black) in a
//! square at the top-left corner. TrojanNN (Liu et al., 2018) stamps a fixed, non-solid
//! logo-like pattern and reverse-engineers it from the network to excite chosen neurons;
//! here the pattern is fixed by a seed and learnt by data poisoning, which keeps the
//! defining property (a fixed, structured, non-solid patch at a fixed place) without the
//! model-inversion step.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{Image, Trigger};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Trojan {
    /// Side of the watermark, in pixels.
    pub size: usize,
    /// Gap between the watermark and the top-left corner, in pixels.
    pub margin: usize,
    /// Seed of the binary pattern (part of the trigger, not of the run).
    pub pattern_seed: u64,
}

impl Default for Trojan {
    fn default() -> Self {
        Trojan {
            size: 5,
            margin: 1,
            pattern_seed: 3,
        }
    }
}

impl Trojan {
    /// The watermark, row-major, `true` = white. Both colours occur (a solid patch would
    /// be BadNets), and a border of white keeps it visible on dark backgrounds.
    pub fn pattern(&self) -> Vec<bool> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.pattern_seed);
        let n = self.size;
        (0..n * n)
            .map(|k| {
                let (y, x) = (k / n, k % n);
                y == 0 || x == 0 || y == n - 1 || x == n - 1 || rng.gen_bool(0.5)
            })
            .collect()
    }
}

impl Trigger for Trojan {
    fn apply(&self, image: &mut Image, _rng: &mut ChaCha8Rng) {
        let pattern = self.pattern();
        for (k, &white) in pattern.iter().enumerate() {
            let (y, x) = (self.margin + k / self.size, self.margin + k % self.size);
            if y >= image.height || x >= image.width {
                continue;
            }
            for c in 0..image.channels {
                image.set(c, y, x, if white { 1.0 } else { 0.0 });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn stamps_a_fixed_non_solid_pattern_at_the_top_left() {
        let attack = Trojan::default();
        let pattern = attack.pattern();
        assert!(pattern.contains(&true) && pattern.contains(&false));
        assert_eq!(pattern, Trojan::default().pattern());
        let mut bundle = flat(1, 1, 8, 8, 128, 1);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        super::super::map_image(&mut bundle, 0, |img| attack.apply(img, &mut rng));
        let px = sample(&bundle, 0);
        for (k, &white) in pattern.iter().enumerate() {
            let at = (1 + k / 5) * 8 + 1 + k % 5;
            assert_eq!(px[at], if white { 255 } else { 0 });
        }
        assert_eq!(px[0], 128);
        assert_eq!(px[7 * 8 + 7], 128);
    }
}

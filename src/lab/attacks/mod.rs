//! Backdoor attacks as data poisoning, in pure Rust over a [`Bundle`]'s pixels.
//!
//! Every attack is a [`Trigger`]: a function that turns one clean image into a triggered
//! one. [`Poisoning`] decides which training samples get it and what label they then
//! carry (all-to-one: a fixed target; all-to-all: y → (y+1) mod K; clean-label: only
//! target-class samples, labels unchanged), and builds the test-time poison set. Triggers
//! work on pixels in [0, 1]; uint8 bundles are converted per sample and rounded back, so an
//! untouched pixel keeps its exact value. Every random choice comes from a seeded
//! [`ChaCha8Rng`], so the same seed gives bit-identical bundles.

pub mod badnets;
pub mod blended;
pub mod dynamic;
pub mod sig;
pub mod trojan;
pub mod wanet;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::engine::bundle::{Bundle, Pixels};

pub use badnets::BadNets;
pub use blended::Blended;
pub use dynamic::Dynamic;
pub use sig::Sig;
pub use trojan::Trojan;
pub use wanet::WaNet;

/// One image, channels-first, values in [0, 1].
pub struct Image {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<f32>,
}

impl Image {
    pub fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.pixels[(c * self.height + y) * self.width + x]
    }

    pub fn set(&mut self, c: usize, y: usize, x: usize, value: f32) {
        self.pixels[(c * self.height + y) * self.width + x] = value;
    }
}

/// A backdoor trigger: how a clean image becomes a triggered one.
pub trait Trigger {
    /// Triggers `image` in place. `rng` is the per-sample randomness of sample-specific
    /// triggers; fixed triggers ignore it.
    fn apply(&self, image: &mut Image, rng: &mut ChaCha8Rng);

    /// WaNet's noise mode: the transformation applied to "cross" samples, which keep their
    /// true label so that the model learns the exact warp rather than any warp. `None` for
    /// attacks without such samples.
    fn cross(&self, _image: &mut Image, _rng: &mut ChaCha8Rng) -> Option<()> {
        None
    }
}

/// Which label a triggered sample is meant to get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TargetMode {
    AllToOne {
        target: i64,
    },
    /// y → (y + 1) mod `num_classes`.
    AllToAll {
        num_classes: i64,
    },
}

impl TargetMode {
    pub fn target_for(&self, label: i64) -> i64 {
        match *self {
            TargetMode::AllToOne { target } => target,
            TargetMode::AllToAll { num_classes } => (label + 1) % num_classes,
        }
    }
}

/// Who gets poisoned during training, and how the test-time poison set is built.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Poisoning {
    pub mode: TargetMode,
    /// Share of the training set poisoned (clean-label: share of the target class).
    pub rate: f64,
    /// Clean-label: only samples of the target class are triggered, labels unchanged.
    pub clean_label: bool,
    /// Samples given [`Trigger::cross`] with their true labels, as a multiple of the
    /// poisoned count (WaNet's noise mode uses 2).
    pub cross_ratio: f64,
}

impl Poisoning {
    /// Whether a training sample with `label` may be poisoned (clean-label: target class only).
    fn is_candidate(&self, label: i64) -> bool {
        match (self.clean_label, self.mode) {
            (true, TargetMode::AllToOne { target }) => label == target,
            _ => true,
        }
    }

    /// How many samples of `clean` [`Poisoning::poison_training_set`] triggers.
    pub fn poisoned_count(&self, clean: &Bundle) -> usize {
        let candidates = clean
            .labels
            .iter()
            .filter(|&&l| self.is_candidate(l))
            .count();
        ((candidates as f64 * self.rate).round() as usize).min(candidates)
    }

    /// The training set with `rate` of its samples triggered and relabelled (or, clean-label,
    /// `rate` of the target class triggered with labels kept).
    pub fn poison_training_set(
        &self,
        clean: &Bundle,
        trigger: &dyn Trigger,
        rng: &mut ChaCha8Rng,
    ) -> Bundle {
        let mut out = clean.clone();
        let mut order: Vec<usize> = (0..clean.len()).collect();
        order.shuffle(rng);
        let candidates: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| self.is_candidate(clean.labels[i]))
            .collect();
        let count = self.poisoned_count(clean);
        let poisoned = &candidates[..count];
        for &i in poisoned {
            map_image(&mut out, i, |img| trigger.apply(img, rng));
            if !self.clean_label {
                out.labels[i] = self.mode.target_for(clean.labels[i]);
            }
        }
        if self.cross_ratio > 0.0 {
            let chosen: std::collections::HashSet<usize> = poisoned.iter().copied().collect();
            let cross_count = (count as f64 * self.cross_ratio).round() as usize;
            let others = order.iter().copied().filter(|i| !chosen.contains(i));
            for i in others.take(cross_count) {
                map_image(&mut out, i, |img| {
                    let _ = trigger.cross(img, rng);
                });
            }
        }
        out
    }

    /// The test-time poison set: every sample whose label differs from its target,
    /// triggered, true labels kept; all-to-all sets carry each sample's `targets`.
    pub fn poisoned_test_set(
        &self,
        clean: &Bundle,
        trigger: &dyn Trigger,
        rng: &mut ChaCha8Rng,
    ) -> Bundle {
        let keep: Vec<usize> = (0..clean.len())
            .filter(|&i| self.mode.target_for(clean.labels[i]) != clean.labels[i])
            .collect();
        let mut out = clean.select(&keep);
        for i in 0..out.len() {
            map_image(&mut out, i, |img| trigger.apply(img, rng));
        }
        if let TargetMode::AllToAll { .. } = self.mode {
            out.targets = Some(
                out.labels
                    .iter()
                    .map(|&l| self.mode.target_for(l))
                    .collect(),
            );
        }
        out
    }
}

/// Runs `f` on sample `i` as an [`Image`] in [0, 1] and writes the result back (uint8
/// pixels rounded, float pixels as they are).
pub fn map_image(bundle: &mut Bundle, i: usize, f: impl FnOnce(&mut Image)) {
    let [_, channels, height, width] = bundle.shape;
    let size = channels * height * width;
    let range = i * size..(i + 1) * size;
    let mut image = Image {
        channels,
        height,
        width,
        pixels: match &bundle.pixels {
            Pixels::U8(v) => v[range.clone()].iter().map(|&p| p as f32 / 255.0).collect(),
            Pixels::F32(v) => v[range.clone()].to_vec(),
        },
    };
    f(&mut image);
    match &mut bundle.pixels {
        Pixels::U8(v) => {
            for (out, p) in v[range].iter_mut().zip(&image.pixels) {
                *out = (p * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
        Pixels::F32(v) => v[range].copy_from_slice(&image.pixels),
    }
}

/// A fixed pseudo-random image in [0, 1] drawn from `seed` (Blended's noise pattern).
pub fn noise_image(channels: usize, height: usize, width: usize, seed: u64) -> Vec<f32> {
    use rand::SeedableRng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..channels * height * width)
        .map(|_| rng.gen::<f32>())
        .collect()
}

#[cfg(test)]
pub(crate) mod testing {
    //! Tiny synthetic bundles for the attack tests.
    use crate::engine::bundle::{Bundle, Pixels, RawTensor, TensorDtype};

    /// `n` images of `c`×`h`×`w`, all pixels `value`, labels `i % classes`.
    pub fn flat(n: usize, c: usize, h: usize, w: usize, value: u8, classes: i64) -> Bundle {
        let images = RawTensor::new(
            "images",
            TensorDtype::U8,
            vec![n, c, h, w],
            vec![value; n * c * h * w],
        )
        .unwrap();
        let labels: Vec<u8> = (0..n as i64)
            .flat_map(|l| (l % classes).to_le_bytes())
            .collect();
        Bundle::from_parts(
            images,
            RawTensor::new("labels", TensorDtype::I64, vec![n], labels).unwrap(),
        )
        .unwrap()
    }

    pub fn sample(bundle: &Bundle, i: usize) -> &[u8] {
        let size = bundle.shape[1] * bundle.shape[2] * bundle.shape[3];
        let Pixels::U8(v) = &bundle.pixels else {
            panic!("uint8 bundle expected")
        };
        &v[i * size..(i + 1) * size]
    }

    /// Indices of samples that differ from `clean`.
    pub fn changed(clean: &Bundle, out: &Bundle) -> Vec<usize> {
        (0..clean.len())
            .filter(|&i| sample(clean, i) != sample(out, i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use rand::SeedableRng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(7)
    }

    #[test]
    fn all_to_one_poisons_the_share_and_relabels() {
        let clean = flat(20, 1, 6, 6, 0, 4);
        let p = Poisoning {
            mode: TargetMode::AllToOne { target: 3 },
            rate: 0.25,
            clean_label: false,
            cross_ratio: 0.0,
        };
        let out = p.poison_training_set(&clean, &BadNets::default(), &mut rng());
        let changed = changed(&clean, &out);
        assert_eq!(changed.len(), 5);
        assert!(changed.iter().all(|&i| out.labels[i] == 3));
        let untouched = (0..20).filter(|i| !changed.contains(i));
        assert!(untouched
            .into_iter()
            .all(|i| out.labels[i] == clean.labels[i]));
        let test = p.poisoned_test_set(&clean, &BadNets::default(), &mut rng());
        assert_eq!(test.len(), 15);
        assert!(test.labels.iter().all(|&l| l != 3));
        assert_eq!(test.targets, None);
    }

    #[test]
    fn all_to_all_maps_each_label_to_the_next() {
        let clean = flat(20, 1, 6, 6, 0, 4);
        let p = Poisoning {
            mode: TargetMode::AllToAll { num_classes: 4 },
            rate: 0.5,
            clean_label: false,
            cross_ratio: 0.0,
        };
        let out = p.poison_training_set(&clean, &BadNets::default(), &mut rng());
        let changed = changed(&clean, &out);
        assert_eq!(changed.len(), 10);
        for i in changed {
            assert_eq!(out.labels[i], (clean.labels[i] + 1) % 4);
        }
        let test = p.poisoned_test_set(&clean, &BadNets::default(), &mut rng());
        assert_eq!(test.len(), 20);
        let targets = test.targets.as_ref().unwrap();
        assert!(test
            .labels
            .iter()
            .zip(targets)
            .all(|(&l, &t)| t == (l + 1) % 4));
        assert_eq!(targets[3], 0);
    }

    #[test]
    fn clean_label_triggers_only_the_target_class_and_keeps_labels() {
        let clean = flat(40, 1, 8, 8, 100, 4);
        let p = Poisoning {
            mode: TargetMode::AllToOne { target: 1 },
            rate: 0.5,
            clean_label: true,
            cross_ratio: 0.0,
        };
        let out = p.poison_training_set(&clean, &Sig::default(), &mut rng());
        let changed = changed(&clean, &out);
        assert_eq!(changed.len(), 5);
        assert!(changed.iter().all(|&i| clean.labels[i] == 1));
        assert_eq!(out.labels, clean.labels);
    }

    #[test]
    fn the_same_seed_gives_identical_bundles() {
        let mut clean = flat(30, 3, 8, 8, 90, 3);
        // Texture, so that a warp changes pixels too.
        if let Pixels::U8(v) = &mut clean.pixels {
            for (i, p) in v.iter_mut().enumerate() {
                *p = ((i * 37) % 251) as u8;
            }
        }
        let p = Poisoning {
            mode: TargetMode::AllToOne { target: 0 },
            rate: 0.3,
            clean_label: false,
            cross_ratio: 2.0,
        };
        let triggers: Vec<Box<dyn Trigger>> = vec![
            Box::new(BadNets::default()),
            Box::new(Blended::default()),
            Box::new(Trojan::default()),
            Box::new(Sig::default()),
            Box::new(WaNet::default()),
            Box::new(Dynamic::default()),
        ];
        for trigger in &triggers {
            let a = p.poison_training_set(&clean, trigger.as_ref(), &mut rng());
            let b = p.poison_training_set(&clean, trigger.as_ref(), &mut rng());
            assert_eq!(a.pixels, b.pixels);
            assert_eq!(a.labels, b.labels);
            assert!(!changed(&clean, &a).is_empty());
        }
    }

    #[test]
    fn untouched_uint8_pixels_keep_their_exact_values() {
        let mut bundle = flat(1, 1, 4, 4, 0, 1);
        if let Pixels::U8(v) = &mut bundle.pixels {
            for (i, p) in v.iter_mut().enumerate() {
                *p = (i * 17) as u8;
            }
        }
        let before = bundle.pixels.clone();
        map_image(&mut bundle, 0, |_| {});
        assert_eq!(bundle.pixels, before);
    }
}

//! Pattern unlearning: training against random image-wide patterns under the true labels.
//!
//! Shortcut unlearning (`unlearn.rs`) only sees triggers that a small universal
//! perturbation can reproduce. An image-wide trigger of large amplitude lies far outside
//! any radius at which that search can still tell a target from a benign class: SIG's
//! sinusoid at Δ = 160/255 has a per-pixel RMS near 0.3 of the range, while at the
//! search's largest radius (0.07) no class of a SIG development model was reached from
//! more than 23% of the images. Clean fine-tuning never shows the model such a pattern,
//! so the detector behind the trigger survives it: on the SIG development models
//! (seeds 100–105) purification left 0.5–13.6% ASR.
//!
//! So every purification and recovery step also feeds the batch with one random grating
//! added, A·sin(2π·p·(x cos θ + y sin θ)/W + φ) on every channel, and adds the
//! cross-entropy of the true labels under it. Orientation θ, phase φ, the number of
//! periods p across the width (1 to W/3: shorter periods alias on the pixel grid) and
//! the amplitude A (up to the whole pixel range) are drawn afresh for every batch:
//! gratings are the Fourier basis of input-independent additive patterns, and a model
//! that keeps its labels under all of them has no use for one of them as a trigger.
//! The amplitude has to reach the trigger's: capped at 0.4 of the range, the SIG
//! development models kept 1.1–19.5% ASR.
//!
//! That invariance is only free when the clean task does not depend on what a grating
//! changes. On the `shapes` development models (coloured shapes) it cost 1–7 points of
//! accuracy. Those models already change their mind under faint gratings, so a probe
//! decides first: the arriving model's accuracy on the clean training split under
//! gratings of a tenth of the range (the median over a handful of draws). If that costs
//! more than a tolerance, the task is sensitive to gratings and the scan goes on without
//! them, exactly as it would with the term switched off.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::data::SampleSet;
use super::error::EngineError;
use super::model::ScanModel;
use super::training::accuracy;
use super::unlearn::InputSpace;

/// Gratings the probe measures the arriving model under.
const PROBE_DRAWS: usize = 9;

/// What the training loop needs to add the pattern term.
#[derive(Debug, Clone)]
pub struct PatternUnlearn {
    pub space: InputSpace,
    /// Weight of the cross-entropy under the pattern.
    pub weight: f64,
    /// Largest amplitude drawn, as a fraction of the pixel range.
    pub max_amplitude: f64,
}

impl PatternUnlearn {
    /// The batch with one fresh random grating added, clamped to the pixel range.
    pub fn patterned(&self, images: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor, EngineError> {
        let amplitude = rng.gen_range(0.0..=self.max_amplitude);
        let grating = random_grating(images, &self.space, amplitude, rng)?;
        self.space.perturb(images, &grating)
    }
}

/// The probe's measurements and its decision, for the report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PatternProbe {
    /// Amplitude of the probe's gratings, as a fraction of the pixel range.
    pub amplitude: f64,
    /// Accuracy of the arriving model on the clean training split.
    pub clean_acc: f64,
    /// Median of its accuracies on that split under each probe grating.
    pub patterned_acc: f64,
    /// Whether purification trained against patterns.
    pub enabled: bool,
}

/// One grating of the given amplitude (fraction of the pixel range) with random
/// orientation, frequency and phase, shaped 1×1×H×W to broadcast over a batch.
pub fn random_grating(
    images: &Tensor,
    space: &InputSpace,
    amplitude: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor, EngineError> {
    use std::f64::consts::PI;
    let size = images.size();
    let (h, w) = (size[2] as usize, size[3] as usize);
    let peak = amplitude * (space.hi - space.lo);
    let periods = rng.gen_range(1.0..=(w as f64 / 3.0).max(1.0));
    let (sin, cos) = rng.gen_range(0.0..PI).sin_cos();
    let phase = rng.gen_range(0.0..2.0 * PI);
    let mut values = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let along = (x as f64 * cos + y as f64 * sin) / w as f64;
            values.push((peak * (2.0 * PI * periods * along + phase).sin()) as f32);
        }
    }
    Ok(Tensor::from_slice(&values)
        .f_reshape([1, 1, h as i64, w as i64])?
        .f_to_device(images.device())?)
}

/// Measures the arriving model under faint gratings and decides whether purification
/// may train against patterns: only if the median accuracy under them stays within
/// `tolerance` of the clean accuracy.
pub fn probe(
    model: &mut ScanModel,
    data: &SampleSet,
    space: &InputSpace,
    amplitude: f64,
    tolerance: f64,
    batch_size: usize,
    seed: u64,
) -> Result<PatternProbe, EngineError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let clean_acc = accuracy(model, data, batch_size)?;
    let mut accuracies = Vec::with_capacity(PROBE_DRAWS);
    for _ in 0..PROBE_DRAWS {
        let grating = random_grating(&data.images, space, amplitude, &mut rng)?;
        accuracies.push(accuracy_under(model, data, space, &grating, batch_size)?);
    }
    accuracies.sort_by(f64::total_cmp);
    let patterned_acc = accuracies[accuracies.len() / 2];
    Ok(PatternProbe {
        amplitude,
        clean_acc,
        patterned_acc,
        enabled: clean_acc - patterned_acc <= tolerance,
    })
}

/// `training::accuracy` with `pattern` added to every image.
fn accuracy_under(
    model: &mut ScanModel,
    data: &SampleSet,
    space: &InputSpace,
    pattern: &Tensor,
    batch_size: usize,
) -> Result<f64, EngineError> {
    model.set_eval()?;
    let mut correct = 0i64;
    for (images, labels) in data.chunks(batch_size) {
        let fed = space.perturb(&images, pattern)?;
        let predicted = tch::no_grad(|| model.forward(&fed))?.f_argmax(1, false)?;
        correct += predicted
            .f_eq_tensor(&labels)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])?;
    }
    Ok(correct as f64 / data.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> InputSpace {
        InputSpace {
            scale: 1.0 / 255.0,
            lo: 0.0,
            hi: 1.0,
        }
    }

    #[test]
    fn a_grating_is_bounded_by_its_amplitude_and_reaches_it() {
        let images = Tensor::zeros([2, 3, 28, 28], (Kind::Float, tch::Device::Cpu));
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for amplitude in [0.1, 0.5, 1.0] {
            let g = random_grating(&images, &space(), amplitude, &mut rng).unwrap();
            assert_eq!(g.size(), vec![1, 1, 28, 28]);
            let max = g.abs().max().double_value(&[]);
            assert!(max <= amplitude + 1e-6, "{max} > {amplitude}");
            // At least one period across the image: the sinusoid gets near its peak.
            assert!(max > 0.7 * amplitude, "{max} far below {amplitude}");
            let mean = g.mean(Kind::Double).double_value(&[]);
            assert!(mean.abs() < 0.5 * amplitude);
        }
    }

    #[test]
    fn gratings_differ_between_draws_and_repeat_with_the_seed() {
        let images = Tensor::zeros([1, 1, 16, 16], (Kind::Float, tch::Device::Cpu));
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (
                random_grating(&images, &space(), 0.5, &mut rng).unwrap(),
                random_grating(&images, &space(), 0.5, &mut rng).unwrap(),
            )
        };
        let (a1, a2) = draw(3);
        let (b1, _) = draw(3);
        assert_eq!(a1, b1);
        assert!(a1.f_sub(&a2).unwrap().abs().max().double_value(&[]) > 1e-3);
    }

    #[test]
    fn patterned_batches_stay_in_the_pixel_range() {
        let unlearn = PatternUnlearn {
            space: space(),
            weight: 1.0,
            max_amplitude: 1.0,
        };
        let images = Tensor::full([4, 1, 8, 8], 200, (Kind::Uint8, tch::Device::Cpu));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20 {
            let p = unlearn.patterned(&images, &mut rng).unwrap();
            assert_eq!(p.kind(), Kind::Float);
            assert!(p.min().double_value(&[]) >= 0.0 && p.max().double_value(&[]) <= 1.0);
        }
    }
}

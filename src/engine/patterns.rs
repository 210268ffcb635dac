//! Pattern unlearning: training against random image-wide patterns under the true labels.
//!
//! Shortcut unlearning (`unlearn.rs`) only sees triggers that a small universal
//! perturbation can reproduce. An image-wide trigger of large amplitude lies far outside
//! any radius at which that search can still tell a target from a benign class: SIG's
//! sinusoid at Δ = 160/255 has a per-pixel RMS near 0.3 of the range, while at the
//! search's largest radius (0.1) no class of a SIG development model was reached from
//! more than 41% of the images (23% at 0.07, the largest radius when this was written).
//! Clean fine-tuning never shows the model such a pattern, so the detector behind the
//! trigger survives it: on the SIG development models
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
//!
//! WaNet's trigger is no additive pattern but a fixed smooth warp of a fraction of a
//! pixel, and on weak WaNet models (81.8% and 92.1% clean accuracy as trained) the
//! grating probe failed, so nothing image-wide was trained against and 14.9% and 5.4% ASR
//! remained. So the batch is also resampled through a random smooth warp, drawn like
//! WaNet's (k×k random control offsets, k from 2 to 8, bilinearly upsampled) at a random
//! strength up to `max_warp`. The warps have a probe of their own, at the largest
//! strength, since a task can tolerate one and not the other; it forgives errors that
//! all go to one class, because on those WaNet models random warps sent most images to
//! the target (plain accuracy under them 14–22%), which is the backdoor, not the task.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::data::SampleSet;
use super::error::EngineError;
use super::model::ScanModel;
use super::training::{accuracy, predict_fed};
use super::unlearn::InputSpace;

/// Gratings the probe measures the arriving model under.
const PROBE_DRAWS: usize = 9;

/// What the training loop needs to add the pattern term.
#[derive(Debug, Clone)]
pub struct PatternUnlearn {
    pub space: InputSpace,
    /// Weight of the cross-entropy under the pattern.
    pub weight: f64,
    /// Largest grating amplitude drawn, as a fraction of the pixel range (0: no gratings).
    pub max_amplitude: f64,
    /// Largest warp strength drawn, in WaNet's units (0: no warps).
    pub max_warp: f64,
}

impl PatternUnlearn {
    /// The batch through one fresh random warp and with one fresh random grating added,
    /// clamped to the pixel range.
    pub fn patterned(&self, images: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor, EngineError> {
        // The grating is drawn first, so that without warps the draws (and so the
        // scans) are those of the gratings alone.
        let grating = if self.max_amplitude > 0.0 {
            let amplitude = rng.gen_range(0.0..=self.max_amplitude);
            Some(random_grating(images, &self.space, amplitude, rng)?)
        } else {
            None
        };
        let mut fed = self.space.to_float(images)?;
        if self.max_warp > 0.0 {
            let strength = rng.gen_range(0.0..=self.max_warp);
            let size = images.size();
            let field = random_warp_field(size[2], size[3], strength, images.device(), rng)?;
            fed = warp(&fed, &field)?;
        }
        if let Some(grating) = grating {
            fed = fed.f_add(&grating)?;
        }
        Ok(fed.f_clamp(self.space.lo, self.space.hi)?)
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
    /// Whether purification trained against gratings.
    pub enabled: bool,
    /// Strength of the probe's warps (the largest purification draws; 0: warps off).
    #[serde(default)]
    pub warp_strength: f64,
    /// Median over the probe warps of the share of the split classified correctly or as
    /// the one class most wrong answers went to (none without warps): a warp-triggered
    /// backdoor's target absorbing the errors does not count against the term.
    #[serde(default)]
    pub warped_acc: Option<f64>,
    /// Whether purification trained against warps.
    #[serde(default)]
    pub warps_enabled: bool,
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

/// Measures the arriving model under faint gratings, and under warps of `warp_strength`
/// (0: none), and decides for each whether purification may train against it: only if
/// the median accuracy under them stays within `tolerance` of the clean accuracy (for
/// warps, counted by [`accuracy_warped`]).
#[allow(clippy::too_many_arguments)]
pub fn probe(
    model: &mut ScanModel,
    data: &SampleSet,
    space: &InputSpace,
    amplitude: f64,
    warp_strength: f64,
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
    let patterned_acc = median(accuracies);
    // After the gratings, from the same stream: the grating probe draws as before.
    let warped_acc = if warp_strength > 0.0 {
        let size = data.images.size();
        let mut accuracies = Vec::with_capacity(PROBE_DRAWS);
        for _ in 0..PROBE_DRAWS {
            let field = random_warp_field(
                size[2],
                size[3],
                warp_strength,
                data.images.device(),
                &mut rng,
            )?;
            accuracies.push(accuracy_warped(model, data, space, &field, batch_size)?);
        }
        Some(median(accuracies))
    } else {
        None
    };
    Ok(PatternProbe {
        amplitude,
        clean_acc,
        patterned_acc,
        enabled: clean_acc - patterned_acc <= tolerance,
        warp_strength,
        warped_acc,
        warps_enabled: warped_acc.is_some_and(|acc| clean_acc - acc <= tolerance),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The share of images classified correctly, or as the one class that most wrong
/// answers went to, with every image resampled through `field`. A warp-triggered
/// backdoor sends warped images of every class to its target: plain accuracy under
/// random warps fell to 14–22% on WaNet development models, which is the behaviour the
/// term exists to unlearn, not a clean task that needs exact pixel positions (whose
/// errors spread over classes).
fn accuracy_warped(
    model: &mut ScanModel,
    data: &SampleSet,
    space: &InputSpace,
    field: &Tensor,
    batch_size: usize,
) -> Result<f64, EngineError> {
    let predicted = predict_fed(model, data, batch_size, |images| {
        warp(&space.to_float(images)?, field)
    })?;
    correct_or_absorbed(&predicted, &data.labels)
}

/// The share of `predicted` equal to `labels` or to the one class most mismatches went to.
fn correct_or_absorbed(predicted: &Tensor, labels: &Tensor) -> Result<f64, EngineError> {
    let right = predicted.f_eq_tensor(labels)?;
    let correct = right.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    let wrong = predicted.f_masked_select(&right.f_logical_not()?)?;
    let mut wrong_per_class: Vec<i64> = Vec::new();
    for class in Vec::<i64>::try_from(wrong.f_to_device(tch::Device::Cpu)?)? {
        let class = class.max(0) as usize;
        if wrong_per_class.len() <= class {
            wrong_per_class.resize(class + 1, 0);
        }
        wrong_per_class[class] += 1;
    }
    let absorbed = wrong_per_class.iter().copied().max().unwrap_or(0);
    Ok((correct + absorbed) as f64 / predicted.size()[0].max(1) as f64)
}

/// A random smooth displacement field, as `grid_sampler` takes it (1×H×W×2, x then y, in
/// [-1, 1] coordinates): k×k random control offsets (k from 2 to 8) scaled to a mean
/// magnitude of one, upsampled bilinearly, times `strength`/H — WaNet's parametrisation,
/// where its s = 0.5 moves pixels by about a quarter of a pixel.
pub fn random_warp_field(
    height: i64,
    width: i64,
    strength: f64,
    device: tch::Device,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor, EngineError> {
    let k = rng.gen_range(2..=8i64).min(height.min(width)).max(2);
    let mut control: Vec<f32> = (0..2 * k * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mean_abs = control.iter().map(|v| v.abs()).sum::<f32>() / control.len() as f32;
    for v in &mut control {
        *v /= mean_abs.max(1e-6);
    }
    let flow = Tensor::from_slice(&control)
        .f_reshape([1, 2, k, k])?
        .f_to_device(device)?
        .f_upsample_bilinear2d([height, width], true, None, None)?
        .f_permute([0, 2, 3, 1])?;
    let ys = Tensor::f_linspace(-1.0, 1.0, height, (Kind::Float, device))?;
    let xs = Tensor::f_linspace(-1.0, 1.0, width, (Kind::Float, device))?;
    let mesh = Tensor::f_meshgrid_indexing(&[ys, xs], "ij")?;
    let identity = Tensor::f_stack(&[&mesh[1], &mesh[0]], -1)?.f_unsqueeze(0)?;
    Ok(identity
        .f_add(&flow.f_mul_scalar(strength / height as f64)?)?
        .f_clamp(-1.0, 1.0)?)
}

/// `images` (float, N×C×H×W) resampled bilinearly through `field`; border pixels repeat.
pub fn warp(images: &Tensor, field: &Tensor) -> Result<Tensor, EngineError> {
    let size = images.size();
    let grid = field.f_expand([size[0], size[2], size[3], 2], false)?;
    Ok(images.f_grid_sampler(&grid, 0, 1, true)?)
}

/// `training::accuracy` with `pattern` added to every image.
fn accuracy_under(
    model: &mut ScanModel,
    data: &SampleSet,
    space: &InputSpace,
    pattern: &Tensor,
    batch_size: usize,
) -> Result<f64, EngineError> {
    let predicted = predict_fed(model, data, batch_size, |images| {
        space.perturb(images, pattern)
    })?;
    let correct = predicted
        .f_eq_tensor(&data.labels)?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
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
            max_warp: 2.0,
        };
        let images = Tensor::full([4, 1, 8, 8], 200, (Kind::Uint8, tch::Device::Cpu));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20 {
            let p = unlearn.patterned(&images, &mut rng).unwrap();
            assert_eq!(p.kind(), Kind::Float);
            assert!(p.min().double_value(&[]) >= 0.0 && p.max().double_value(&[]) <= 1.0);
        }
    }

    #[test]
    fn a_warp_of_strength_zero_changes_nothing_and_a_strong_one_moves_pixels() {
        // A horizontal ramp: a sideways shift shows as a change of value.
        let ramp = Tensor::f_linspace(0.0, 1.0, 16, (Kind::Float, tch::Device::Cpu))
            .unwrap()
            .view([1, 1, 1, 16])
            .expand([2, 1, 16, 16], false)
            .contiguous();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let still = random_warp_field(16, 16, 0.0, tch::Device::Cpu, &mut rng).unwrap();
        assert_eq!(still.size(), vec![1, 16, 16, 2]);
        let same = warp(&ramp, &still).unwrap();
        assert!(same.f_sub(&ramp).unwrap().abs().max().double_value(&[]) < 1e-5);
        // Strength s moves pixels by about s/2 pixels (less where upsampling averages
        // offsets away): 4 gives up to 2 pixels, and a pixel is 1/15 of the ramp.
        let field = random_warp_field(16, 16, 4.0, tch::Device::Cpu, &mut rng).unwrap();
        let moved = warp(&ramp, &field).unwrap();
        let shift = moved
            .f_sub(&ramp)
            .unwrap()
            .abs()
            .mean(Kind::Double)
            .double_value(&[]);
        let one_pixel = 1.0 / 15.0;
        assert!(
            shift > 0.3 * one_pixel && shift < 3.0 * one_pixel,
            "{shift}"
        );
    }

    #[test]
    fn errors_that_all_go_to_one_class_are_forgiven_and_spread_ones_are_not() {
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        // A backdoor firing: everything but class 3's own images goes to class 3.
        let fired = Tensor::full([10], 3, (Kind::Int64, tch::Device::Cpu));
        assert_eq!(correct_or_absorbed(&fired, &labels).unwrap(), 1.0);
        // A task that needs exact positions: four errors, each to a different class.
        let spread = Tensor::from_slice(&[1i64, 2, 3, 4, 4, 5, 6, 7, 8, 9]);
        assert_eq!(correct_or_absorbed(&spread, &labels).unwrap(), 0.7);
        assert_eq!(correct_or_absorbed(&labels, &labels).unwrap(), 1.0);
    }
}

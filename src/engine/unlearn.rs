//! Shortcut unlearning during purification.
//!
//! On narrow networks the backdoor often rides on neurons the clean task also needs: they
//! carry high benign salience, so no salience rule can flag them, and fine-tuning on clean
//! images never exercises the trigger pathway that would have to be unlearnt. What a
//! backdoored model does have is a shortcut: one small, input-independent change (a
//! universal perturbation, one L2-bounded δ for all images) that sends every image to the
//! target class. So first every class gets the universal perturbation that best sends
//! clean images to it; a trigger's target stands out as reachable from far more images
//! than any other class at the same small radius. Only when one does, every purification
//! epoch re-searches the perturbation towards that class and trains the model to keep the
//! true labels under it. A clean model has no such class and is not put through
//! adversarial training. Nothing here looks at poisoned data: every δ comes from the clean
//! training split alone.
//!
//! Reach alone misses some backdoors: a non-robust network (the residual models on the
//! colour dataset) has benign classes nearly as easy to reach as the target. What sets a
//! patch trigger's target apart there is where its perturbation puts its energy: towards
//! the target, the optimiser rediscovers the trigger and spends most of the budget on a
//! few pixels; towards a natural class it has to change the whole object. So a class is
//! also a target when its perturbation is far more local than any other class's.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use super::data::SampleSet;
use super::error::EngineError;
use super::model::{defined_or_zeros, ScanModel};
use super::progress::Monitor;
use super::training::cross_entropy;

/// How bundle pixels become the float tensor a perturbation is added to, so that the
/// model sees the same image either way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputSpace {
    /// Multiplier from stored pixels to the float the model is fed (1/255 for uint8
    /// bundles a model reads as [0, 1]).
    pub scale: f64,
    /// Range the perturbed image is clamped to, in fed units.
    pub lo: f64,
    pub hi: f64,
}

impl InputSpace {
    /// Finds a float encoding of `images` that the model treats exactly as it treats the
    /// images as stored: uint8 as x/255 (the usual convention) or as x; float bundles as
    /// they are. `None` when no encoding reproduces the model's logits.
    pub fn detect(model: &ScanModel, images: &Tensor) -> Result<Option<Self>, EngineError> {
        if images.kind() != Kind::Uint8 {
            let lo = images.f_min()?.f_double_value(&[])?.min(0.0);
            let hi = images.f_max()?.f_double_value(&[])?.max(1.0);
            return Ok(Some(InputSpace { scale: 1.0, lo, hi }));
        }
        let reference = tch::no_grad(|| model.forward(images))?;
        let tolerance = 1e-3 * (1.0 + reference.f_abs()?.f_max()?.f_double_value(&[])?);
        for scale in [1.0 / 255.0, 1.0] {
            let as_float = images.f_to_kind(Kind::Float)?.f_mul_scalar(scale)?;
            let Ok(logits) = tch::no_grad(|| model.forward(&as_float)) else {
                continue;
            };
            if logits.size() != reference.size() {
                continue;
            }
            let gap = logits
                .f_sub(&reference)?
                .f_abs()?
                .f_max()?
                .f_double_value(&[])?;
            if gap <= tolerance {
                return Ok(Some(InputSpace {
                    scale,
                    lo: 0.0,
                    hi: 255.0 * scale,
                }));
            }
        }
        Ok(None)
    }

    pub fn to_float(&self, images: &Tensor) -> Result<Tensor, EngineError> {
        Ok(images.f_to_kind(Kind::Float)?.f_mul_scalar(self.scale)?)
    }

    /// `images` (as stored) plus `delta` (fed units), clamped to the valid range.
    pub fn perturb(&self, images: &Tensor, delta: &Tensor) -> Result<Tensor, EngineError> {
        Ok(self
            .to_float(images)?
            .f_add(delta)?
            .f_clamp(self.lo, self.hi)?)
    }
}

#[derive(Debug, Clone)]
pub struct Unlearn {
    pub space: InputSpace,
    /// Candidate radii of δ, as per-pixel RMS of the pixel range, smallest first.
    pub radii_rms: Vec<f64>,
    /// A class is a target when reached from at least this share of clean images…
    pub min_success: f64,
    /// …and by at least this much more than any other class.
    pub min_gap: f64,
    /// Or: reached from `min_success` of the images, and ahead of every other class by
    /// this much in local reach (share of images reached × share of the perturbation's
    /// energy on its most-changed `LOCAL_SHARE` of pixel positions).
    pub min_local_gap: f64,
    /// Gradient steps of each search, each on a fresh random batch.
    pub steps: usize,
    /// Weight of the cross-entropy under δ in the training loss.
    pub weight: f64,
}

/// The share of pixel positions a perturbation's locality is measured on (2%: a 3×3
/// patch on a 32×32 image is 0.9%).
pub const LOCAL_SHARE: f64 = 0.02;

/// Where a search starts. Purification re-searches δ and the patch every epoch against a
/// model that one epoch changed only a little, so each re-search continues from the last
/// epoch's result instead of starting over.
#[derive(Clone, Copy)]
pub enum Search<'a> {
    Cold,
    Warm(&'a Tensor),
}

/// Step of the patch search, as a share of the pixel range: a few steps can take a
/// pixel from mid-grey to either end.
const PATCH_STEP: f64 = 0.2;

/// `delta`'s squared values summed over channels, one entry per pixel position, and how
/// many of those entries `LOCAL_SHARE` covers. N×C×H×W: positions are H×W (per sample);
/// anything else counts every value.
fn position_energy(delta: &Tensor) -> Result<(Tensor, i64), EngineError> {
    let squared = delta.f_square()?;
    let energy = if delta.dim() == 4 {
        squared.f_sum_dim_intlist(1, false, Kind::Float)?
    } else {
        squared
    }
    .f_flatten(0, -1)?;
    let positions = energy.size()[0];
    let local = ((positions as f64 * LOCAL_SHARE).ceil() as i64).clamp(1, positions.max(1));
    Ok((energy, local))
}

/// Share of `delta`'s energy (summed over channels) on its `LOCAL_SHARE` most-changed
/// pixel positions: near `LOCAL_SHARE` for a perturbation spread evenly, near 1 for a patch.
pub fn locality(delta: &Tensor) -> Result<f64, EngineError> {
    let (energy, local) = position_energy(delta)?;
    let total = energy.f_sum(Kind::Double)?.f_double_value(&[])?;
    // Not finite: a perturbation that overflowed (images near f32's limits); no share.
    if energy.size()[0] == 0 || !total.is_finite() || total <= 0.0 {
        return Ok(0.0);
    }
    let (top, _) = energy.f_topk(local, 0, true, false)?;
    Ok(top.f_sum(Kind::Double)?.f_double_value(&[])? / total)
}

/// The `LOCAL_SHARE` most-changed pixel positions of a universal perturbation `delta`
/// (1×C×H×W) as a 1×1×H×W mask of ones, where a patch trigger's target perturbation puts
/// the patch. `None` for inputs that are not images.
pub fn support_of(delta: &Tensor) -> Result<Option<Tensor>, EngineError> {
    let size = delta.size();
    if size.len() != 4 {
        return Ok(None);
    }
    let (energy, local) = position_energy(delta)?;
    let (_, top) = energy.f_topk(local, 0, true, false)?;
    let mask = energy.f_zeros_like()?.f_index_fill(0, &top, 1.0)?;
    Ok(Some(mask.f_view([1, 1, size[2], size[3]])?))
}

/// Unlearning as planned for one purification: the target and radius found, and where
/// the search's perturbation towards the target concentrated.
#[derive(Debug)]
pub struct UnlearnPlan {
    pub unlearn: Unlearn,
    pub target: i64,
    pub radius: f64,
    /// 1×1×H×W mask of the target perturbation's most-changed positions (images only).
    pub support: Option<Tensor>,
}

impl Clone for UnlearnPlan {
    fn clone(&self) -> Self {
        UnlearnPlan {
            unlearn: self.unlearn.clone(),
            target: self.target,
            radius: self.radius,
            // The mask is never written to, so the copies may share its storage.
            support: self.support.as_ref().map(Tensor::shallow_clone),
        }
    }
}

impl Unlearn {
    /// The L2 radius for a per-pixel RMS budget `rms` (a fraction of the pixel range),
    /// for images of `dims` values: the budget scales with image size, not the data.
    pub fn radius_for(space: &InputSpace, rms: f64, dims: i64) -> f64 {
        rms * (space.hi - space.lo) * (dims as f64).sqrt()
    }

    /// Projected gradient descent on the mean cross-entropy towards `target` over one
    /// shared δ (1×C×H×W), in eval mode so BatchNorm statistics are not touched. A cold
    /// search starts from zero and takes `steps`; a warm one continues from an earlier δ
    /// (`Search::Warm`) with fewer steps of the same size.
    #[allow(clippy::too_many_arguments)]
    pub fn perturbation_towards(
        &self,
        model: &mut ScanModel,
        data: &SampleSet,
        target: i64,
        radius: f64,
        batch_size: usize,
        rng: &mut ChaCha8Rng,
        from: Search,
    ) -> Result<Tensor, EngineError> {
        model.set_eval()?;
        let (mut delta, steps) = self.start(from, data, 0.0)?;
        let step_size = 2.5 * radius / self.steps.max(1) as f64;
        for _ in 0..steps {
            let d = delta.detach().set_requires_grad(true);
            let grad = &gradient_towards(model, data, target, batch_size, rng, &d, &|images| {
                self.space.perturb(images, &d)
            })?;
            let norm = grad.f_norm()?.f_double_value(&[])?;
            if !(norm.is_finite() && norm > 0.0) {
                break;
            }
            delta = tch::no_grad(|| -> Result<Tensor, EngineError> {
                let stepped = d.detach().f_sub(&grad.f_mul_scalar(step_size / norm)?)?;
                let length = stepped.f_norm()?.f_double_value(&[])?;
                Ok(if length > radius {
                    stepped.f_mul_scalar(radius / length)?
                } else {
                    stepped
                })
            })?;
        }
        model.zero_grad();
        Ok(delta.detach())
    }

    /// `images` (as stored) with the pixels under `support` replaced by `pattern`: how a
    /// patch trigger is applied.
    pub fn stamp(
        &self,
        images: &Tensor,
        support: &Tensor,
        pattern: &Tensor,
    ) -> Result<Tensor, EngineError> {
        let keep = support.f_neg()?.f_add_scalar(1.0)?;
        Ok(self
            .space
            .to_float(images)?
            .f_mul(&keep)?
            .f_add(&pattern.f_mul(support)?)?)
    }

    /// The pattern on `support` (any value in the pixel range, no norm bound) that best
    /// sends clean images to `target`: a patch trigger where the L2 search located one.
    /// The L2 ball around an image never holds a full-strength patch, so once the model
    /// resists the ball the real patch can still work; this search finds it. Signed
    /// gradient steps from mid-grey (cold) or from an earlier pattern (warm, fewer steps),
    /// each on a fresh random batch, in eval mode.
    #[allow(clippy::too_many_arguments)]
    pub fn patch_towards(
        &self,
        model: &mut ScanModel,
        data: &SampleSet,
        target: i64,
        support: &Tensor,
        batch_size: usize,
        rng: &mut ChaCha8Rng,
        from: Search,
    ) -> Result<Tensor, EngineError> {
        model.set_eval()?;
        let (lo, hi) = (self.space.lo, self.space.hi);
        let (mut pattern, steps) = self.start(from, data, (lo + hi) / 2.0)?;
        let step_size = PATCH_STEP * (hi - lo);
        for _ in 0..steps {
            let p = pattern.detach().set_requires_grad(true);
            let grad = gradient_towards(model, data, target, batch_size, rng, &p, &|images| {
                self.stamp(images, support, &p)
            })?;
            pattern = tch::no_grad(|| -> Result<Tensor, EngineError> {
                Ok(p.detach()
                    .f_sub(&grad.f_sign()?.f_mul_scalar(step_size)?)?
                    .f_clamp(lo, hi)?)
            })?;
        }
        model.zero_grad();
        Ok(pattern.detach())
    }

    /// Where a search starts and how many steps it takes: cold, from a tensor of
    /// `cold_value` with every step; warm, from a copy of the earlier result with half
    /// the steps (rounded up).
    fn start(
        &self,
        from: Search,
        data: &SampleSet,
        cold_value: f64,
    ) -> Result<(Tensor, usize), EngineError> {
        Ok(match from {
            Search::Cold => (one_image_of(data, cold_value)?, self.steps),
            Search::Warm(earlier) => (earlier.detach().copy(), self.steps.div_ceil(2)),
        })
    }

    /// Share of `images` that `delta` sends to `class`.
    pub fn success(
        &self,
        model: &mut ScanModel,
        images: &Tensor,
        delta: &Tensor,
        class: i64,
    ) -> Result<f64, EngineError> {
        share_sent_to(model, &self.space.perturb(images, delta)?, class)
    }

    /// Share of `images` that `pattern` stamped on `support` sends to `class`.
    pub fn stamp_success(
        &self,
        model: &mut ScanModel,
        images: &Tensor,
        support: &Tensor,
        pattern: &Tensor,
        class: i64,
    ) -> Result<f64, EngineError> {
        share_sent_to(model, &self.stamp(images, support, pattern)?, class)
    }

    /// Looks for a class that a small universal perturbation reaches far more easily than
    /// every other class, or far more locally: a trigger's target. Radii are tried from
    /// the smallest; at every radius where some class is reached from at least
    /// `min_success` of the clean images, a decision is tried, and the search stops at the
    /// first that finds a target. By reach: the best class is the target if it leads the
    /// runner-up by `min_gap`; a clean model's easiest classes are reached at about the
    /// same radius, so there is no gap. By locality: of the classes reached, the one with
    /// the highest local reach is the target if it leads every other class's by
    /// `min_local_gap`. A radius that decides nothing does not end the search: a benign
    /// class of a non-robust network can be reached from 90% of the images at a radius
    /// too small for the patch to reach its own target, which then only counts at the
    /// next radius. With a target comes the support of its perturbation (`support_of`).
    pub fn search_target(
        &self,
        model: &mut ScanModel,
        data: &SampleSet,
        num_classes: i64,
        batch_size: usize,
        rng: &mut ChaCha8Rng,
        monitor: &Monitor,
    ) -> Result<(TargetSearch, Option<Tensor>), EngineError> {
        let probe = data.images.narrow(0, 0, data.len().min(256) as i64);
        let dims = probe.size()[1..].iter().product::<i64>();
        self.search_radii(rng, |rms, rng| {
            let radius = Unlearn::radius_for(&self.space, rms, dims);
            let mut success = Vec::with_capacity(num_classes as usize);
            let mut local = Vec::with_capacity(num_classes as usize);
            let mut deltas = Vec::with_capacity(num_classes as usize);
            for class in 0..num_classes {
                // Radii × classes × steps passes without a progress step between them.
                monitor.check_cancelled()?;
                let delta = self.perturbation_towards(
                    model,
                    data,
                    class,
                    radius,
                    batch_size,
                    rng,
                    Search::Cold,
                )?;
                success.push(self.success(model, &probe, &delta, class)?);
                local.push(locality(&delta)?);
                deltas.push(delta);
            }
            let at = TargetSearch {
                radius_rms: rms,
                radius,
                success_per_class: success,
                locality_per_class: local,
                ..Default::default()
            };
            Ok((at, deltas))
        })
    }

    /// The loop of `search_target` over the radii, with `search_at` doing one radius:
    /// its profile and each class's perturbation.
    fn search_radii(
        &self,
        rng: &mut ChaCha8Rng,
        mut search_at: impl FnMut(
            f64,
            &mut ChaCha8Rng,
        ) -> Result<(TargetSearch, Vec<Tensor>), EngineError>,
    ) -> Result<(TargetSearch, Option<Tensor>), EngineError> {
        let mut last = TargetSearch::default();
        let mut undecided: Option<(TargetSearch, ChaCha8Rng)> = None;
        for &rms in &self.radii_rms {
            let deltas;
            (last, deltas) = search_at(rms, rng)?;
            if let (Some(target), found_by) = self.decide(&last) {
                last.target = Some(target);
                last.found_by = found_by;
                last.passed_radius_rms = undecided.as_ref().map(|(at, _)| at.radius_rms);
                return Ok((last, support_of(&deltas[target as usize])?));
            }
            let reached = last
                .success_per_class
                .iter()
                .any(|&s| s >= self.min_success);
            if reached && undecided.is_none() {
                undecided = Some((last.clone(), rng.clone()));
            }
        }
        // Nothing stood out at any radius. The result is the first radius where some
        // class was reached, as if the search had stopped there, and so are the later
        // random draws: a model without a target trains exactly as it would have.
        match undecided {
            Some((first, draws)) => {
                *rng = draws;
                Ok((first, None))
            }
            None => Ok((last, None)),
        }
    }
}

impl Unlearn {
    /// The target by reach, else by locality (see `search_target`), at one radius.
    fn decide(&self, at: &TargetSearch) -> (Option<i64>, Option<FoundBy>) {
        let leader = |scores: &[f64], among: &dyn Fn(usize) -> bool| {
            let mut order: Vec<usize> = (0..scores.len()).filter(|&c| among(c)).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            let best = *order.first()?;
            let others = scores
                .iter()
                .enumerate()
                .filter(|&(c, _)| c != best)
                .map(|(_, &s)| s)
                .fold(f64::NEG_INFINITY, f64::max);
            Some((best, scores[best], scores[best] - others))
        };
        let success = &at.success_per_class;
        if let Some((best, score, lead)) = leader(success, &|_| true) {
            if score >= self.min_success && lead >= self.min_gap {
                return (Some(best as i64), Some(FoundBy::Reach));
            }
        }
        // Local reach: the share of images reached times the share of energy on a few
        // pixels, high only for a perturbation that is both easy and a patch.
        let local_reach: Vec<f64> = success
            .iter()
            .zip(&at.locality_per_class)
            .map(|(s, l)| s * l)
            .collect();
        let reached = |c: usize| success[c] >= self.min_success;
        if let Some((best, _, lead)) = leader(&local_reach, &reached) {
            if lead >= self.min_local_gap {
                return (Some(best as i64), Some(FoundBy::Locality));
            }
        }
        (None, None)
    }
}

/// A float 1×C×H×W (one sample's shape) tensor of `value` on the data's device.
fn one_image_of(data: &SampleSet, value: f64) -> Result<Tensor, EngineError> {
    let mut shape = data.images.size();
    shape[0] = 1;
    Ok(Tensor::f_full(
        &shape,
        value,
        (Kind::Float, data.images.device()),
    )?)
}

/// Gradient, with respect to `variable`, of the mean cross-entropy towards `target` of a
/// fresh random batch of `data` passed through `apply` (which builds the model's input
/// from the stored images and `variable`).
fn gradient_towards(
    model: &mut ScanModel,
    data: &SampleSet,
    target: i64,
    batch_size: usize,
    rng: &mut ChaCha8Rng,
    variable: &Tensor,
    apply: &dyn Fn(&Tensor) -> Result<Tensor, EngineError>,
) -> Result<Tensor, EngineError> {
    let n = data.len();
    let indices: Vec<i64> = (0..batch_size.min(n))
        .map(|_| rng.gen_range(0..n) as i64)
        .collect();
    let batch = data.select(&indices)?;
    let logits = model.forward(&apply(&batch.images)?)?;
    let loss = cross_entropy(&logits, &batch.labels.f_full_like(target)?)?;
    let grad = Tensor::f_run_backward(&[&loss], &[variable], false, false)?.remove(0);
    // Undefined when the model ignores its input (or casts it to integers): no
    // perturbation moves it, which a zero gradient says to the searches.
    Ok(defined_or_zeros(grad, variable))
}

/// Share of `inputs` (fed units) the model, in eval mode, classifies as `class`.
fn share_sent_to(model: &mut ScanModel, inputs: &Tensor, class: i64) -> Result<f64, EngineError> {
    model.set_eval()?;
    let predictions = tch::no_grad(|| model.forward(inputs))?.f_argmax(1, false)?;
    let n = predictions.size()[0].max(1) as f64;
    let hits = predictions
        .f_eq(class)?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    Ok(hits as f64 / n)
}

/// Which rule named the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FoundBy {
    /// Reached from far more clean images than any other class.
    Reach,
    /// Reached by a perturbation both easy and far more local than any other class's.
    Locality,
}

/// What the target search found, for the report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TargetSearch {
    /// The radius that named the target; without one, the first radius where some class
    /// was reached (the largest searched if none was). As per-pixel RMS of the pixel
    /// range, and in input units. Like every number here, written as `null` when not
    /// finite (JSON has no NaN), and read back as NaN, so the report page still renders.
    #[serde(deserialize_with = "super::report::nan_as_null::one")]
    pub radius_rms: f64,
    #[serde(deserialize_with = "super::report::nan_as_null::one")]
    pub radius: f64,
    /// Per class, the share of clean images the best perturbation towards it reaches.
    #[serde(deserialize_with = "super::report::nan_as_null::many")]
    pub success_per_class: Vec<f64>,
    /// Per class, the share of that perturbation's energy on its most-changed 2% of
    /// pixel positions. (Absent from reports stored before it existed.)
    #[serde(default, deserialize_with = "super::report::nan_as_null::many")]
    pub locality_per_class: Vec<f64>,
    /// The class that stands out, if any; unlearning runs only then.
    pub target: Option<i64>,
    #[serde(default)]
    pub found_by: Option<FoundBy>,
    /// When the target was found past a smaller radius where some class was already
    /// reached but none stood out: that radius.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed_radius_rms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many batches of `batch` draws from `0..n` separate `rng` from a fresh stream
    /// of `seed` (each search step draws one batch).
    fn batches_drawn(rng: &ChaCha8Rng, seed: u64, batch: usize, n: usize) -> usize {
        use rand::SeedableRng;
        let mut replay = ChaCha8Rng::seed_from_u64(seed);
        (0..100)
            .find(|_| {
                let same = replay.clone().gen::<u64>() == rng.clone().gen::<u64>();
                for _ in 0..batch {
                    replay.gen_range(0..n);
                }
                same
            })
            .expect("fewer than 100 batches drawn")
    }

    /// A warm re-search starts from the δ or pattern it is given and draws half as many
    /// batches as a cold one, on the MNIST fixture model.
    #[test]
    fn a_warm_search_continues_from_its_start_with_half_the_steps() {
        use rand::SeedableRng;
        tch::manual_seed(5);
        let cpu = tch::Device::Cpu;
        let data = SampleSet {
            images: Tensor::rand([32, 1, 28, 28], (Kind::Float, cpu)),
            labels: Tensor::arange(32, (Kind::Int64, cpu)).remainder(10),
        };
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/mnist_cnn_bn.pt");
        let mut model = ScanModel::load(&path, cpu, &data.images.narrow(0, 0, 2)).unwrap();
        let unlearn = Unlearn {
            space: InputSpace {
                scale: 1.0,
                lo: 0.0,
                hi: 1.0,
            },
            radii_rms: vec![0.05],
            min_success: 0.9,
            min_gap: 0.25,
            min_local_gap: 0.2,
            steps: 6,
            weight: 1.0,
        };
        let radius = Unlearn::radius_for(&unlearn.space, 0.05, 28 * 28);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let cold = unlearn
            .perturbation_towards(&mut model, &data, 3, radius, 8, &mut rng, Search::Cold)
            .unwrap();
        assert_eq!(batches_drawn(&rng, 1, 8, 32), 6);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let warm = unlearn
            .perturbation_towards(
                &mut model,
                &data,
                3,
                radius,
                8,
                &mut rng,
                Search::Warm(&cold),
            )
            .unwrap();
        assert_eq!(batches_drawn(&rng, 1, 8, 32), 3);
        for delta in [&cold, &warm] {
            let norm = delta.norm().double_value(&[]);
            assert!(norm > 0.0 && norm <= radius * (1.0 + 1e-5), "{norm}");
        }

        // Off the support a pattern has no gradient, so it keeps its starting value:
        // mid-grey for a cold search, the given pattern for a warm one.
        let support = Tensor::zeros([1, 1, 28, 28], (Kind::Float, cpu));
        let _ = support.narrow(2, 24, 3).narrow(3, 24, 3).fill_(1.0);
        let start = Tensor::full([1, 1, 28, 28], 0.9, (Kind::Float, cpu));
        let off_support = |pattern: &Tensor| pattern.get(0).get(0).get(0).get(0).double_value(&[]);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let pattern = unlearn
            .patch_towards(
                &mut model,
                &data,
                3,
                &support,
                8,
                &mut rng,
                Search::Warm(&start),
            )
            .unwrap();
        assert_eq!(batches_drawn(&rng, 2, 8, 32), 3);
        assert!((off_support(&pattern) - 0.9).abs() < 1e-6);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let pattern = unlearn
            .patch_towards(&mut model, &data, 3, &support, 8, &mut rng, Search::Cold)
            .unwrap();
        assert_eq!(batches_drawn(&rng, 2, 8, 32), 6);
        assert!((off_support(&pattern) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn radius_scales_with_image_size_and_pixel_range() {
        let unit = InputSpace {
            scale: 1.0 / 255.0,
            lo: 0.0,
            hi: 1.0,
        };
        assert!((Unlearn::radius_for(&unit, 0.1, 100) - 1.0).abs() < 1e-12);
        let raw = InputSpace {
            scale: 1.0,
            lo: 0.0,
            hi: 255.0,
        };
        assert!((Unlearn::radius_for(&raw, 0.1, 100) - 255.0).abs() < 1e-9);
    }

    #[test]
    fn locality_is_high_for_a_patch_and_low_for_a_spread_perturbation() {
        // 3×32×32: 2% of the 1,024 positions is 21 of them.
        let spread = Tensor::ones([1, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        let even = locality(&spread).unwrap();
        assert!((even - 21.0 / 1024.0).abs() < 1e-6, "{even}");
        let patch = Tensor::zeros([1, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        let _ = patch.narrow(2, 28, 3).narrow(3, 28, 3).fill_(0.5);
        // A faint spread on top: the 9 patch positions still hold most of the energy.
        let patch = patch + 0.02;
        let local = locality(&patch).unwrap();
        assert!(local > 0.8, "{local}");
        assert_eq!(locality(&(spread * 0.0)).unwrap(), 0.0);
    }

    #[test]
    fn the_support_is_where_a_perturbation_concentrates_and_a_stamp_replaces_only_it() {
        let delta = Tensor::zeros([1, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        let _ = delta.narrow(2, 28, 3).narrow(3, 28, 3).fill_(0.5);
        let delta = delta + 0.01;
        let support = support_of(&delta).unwrap().unwrap();
        assert_eq!(support.size(), [1, 1, 32, 32]);
        // 2% of 1,024 positions is 21: the 9 patch positions and 12 others.
        assert_eq!(support.sum(Kind::Float).double_value(&[]), 21.0);
        assert_eq!(
            support
                .narrow(2, 28, 3)
                .narrow(3, 28, 3)
                .sum(Kind::Float)
                .double_value(&[]),
            9.0
        );
        assert!(
            support_of(&Tensor::zeros([4, 10], (Kind::Float, tch::Device::Cpu)))
                .unwrap()
                .is_none()
        );

        let rule = Unlearn {
            space: InputSpace {
                scale: 1.0 / 255.0,
                lo: 0.0,
                hi: 1.0,
            },
            ..rule()
        };
        let images = Tensor::full([2, 3, 32, 32], 51, (Kind::Uint8, tch::Device::Cpu));
        let pattern = Tensor::ones([1, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        let stamped = rule.stamp(&images, &support, &pattern).unwrap();
        assert_eq!(stamped.size(), [2, 3, 32, 32]);
        let ones = stamped.eq(1.0).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(ones, 2 * 3 * 21);
        let untouched = (stamped - 0.2)
            .abs()
            .lt(1e-6)
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert_eq!(untouched, 2 * 3 * (1024 - 21));
    }

    fn rule() -> Unlearn {
        Unlearn {
            space: InputSpace {
                scale: 1.0,
                lo: 0.0,
                hi: 1.0,
            },
            radii_rms: vec![0.02],
            min_success: 0.9,
            min_gap: 0.3,
            min_local_gap: 0.2,
            steps: 1,
            weight: 1.0,
        }
    }

    #[test]
    fn a_search_with_non_finite_numbers_reads_back_from_its_json() {
        // The report page reads the stored report back; a NaN written as `null` failed it.
        let search = TargetSearch {
            radius_rms: f64::NAN,
            radius: f64::INFINITY,
            ..at(&[0.5, f64::NAN], &[f64::NAN, 0.1])
        };
        let json = serde_json::to_string(&search).unwrap();
        let back: TargetSearch = serde_json::from_str(&json).unwrap();
        assert!(back.radius_rms.is_nan() && back.radius.is_nan());
        assert_eq!(back.success_per_class[0], 0.5);
        assert!(back.success_per_class[1].is_nan() && back.locality_per_class[0].is_nan());
        let overflowed = Tensor::from_slice(&[f32::MAX, f32::MAX, 1.0, 0.0]).view([1, 1, 2, 2]);
        assert_eq!(locality(&overflowed).unwrap(), 0.0);
    }

    fn at(success: &[f64], locality: &[f64]) -> TargetSearch {
        TargetSearch {
            success_per_class: success.to_vec(),
            locality_per_class: locality.to_vec(),
            ..Default::default()
        }
    }

    /// `search_radii` over preset profiles, one per radius (each draw advances the
    /// stream, as a real search does); returns its result, the radii it searched and
    /// the stream's next draw.
    fn search_over(profiles: &[(&[f64], &[f64])]) -> (TargetSearch, Vec<f64>, u64) {
        use rand::SeedableRng;
        let mut rule = rule();
        rule.radii_rms = (1..=profiles.len()).map(|k| k as f64 / 100.0).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut searched = Vec::new();
        let (found, _) = rule
            .search_radii(&mut rng, |rms, rng| {
                let _: u64 = rng.gen();
                searched.push(rms);
                let (success, locality) = profiles[searched.len() - 1];
                let deltas = (0..3)
                    .map(|_| Tensor::zeros([1, 1, 10, 10], (Kind::Float, tch::Device::Cpu)))
                    .collect();
                let mut at = at(success, locality);
                at.radius_rms = rms;
                Ok((at, deltas))
            })
            .unwrap();
        (found, searched, rng.gen())
    }

    #[test]
    fn the_search_goes_past_a_radius_that_decides_nothing_and_otherwise_stops_where_it_did() {
        use rand::SeedableRng;
        let nothing: (&[f64], &[f64]) = (&[0.3, 0.4, 0.2], &[0.1, 0.1, 0.1]);
        // A benign class reached first, close to the others and not local: undecided.
        let benign: (&[f64], &[f64]) = (&[0.7, 0.85, 0.92], &[0.75, 0.15, 0.15]);
        // One radius up the patch reaches its target too, and stands out by locality.
        let patch: (&[f64], &[f64]) = (&[0.97, 0.9, 0.95], &[0.75, 0.15, 0.15]);
        let (found, searched, _) = search_over(&[nothing, benign, patch, nothing]);
        assert_eq!(searched, vec![0.01, 0.02, 0.03]);
        assert_eq!(
            (found.target, found.found_by, found.radius_rms),
            (Some(0), Some(FoundBy::Locality), 0.03)
        );
        assert_eq!(found.passed_radius_rms, Some(0.02));

        // Found at the first radius reached: no radius passed.
        let (found, searched, _) = search_over(&[nothing, patch, benign]);
        assert_eq!((searched.len(), found.target), (2, Some(0)));
        assert_eq!(found.passed_radius_rms, None);

        // Nothing anywhere after the first radius reached: the search reports that
        // radius, and the stream continues from where it stood then (two draws in).
        let (found, searched, next) = search_over(&[nothing, benign, benign, nothing]);
        assert_eq!(searched.len(), 4);
        assert_eq!((found.target, found.radius_rms), (None, 0.02));
        let mut two_draws = ChaCha8Rng::seed_from_u64(7);
        let _: (u64, u64) = (two_draws.gen(), two_draws.gen());
        assert_eq!(next, two_draws.gen::<u64>());

        // Never reached: the largest radius, as before.
        let (found, _, _) = search_over(&[nothing, nothing]);
        assert_eq!((found.target, found.radius_rms), (None, 0.02));
    }

    #[test]
    fn a_target_is_found_by_reach_or_by_locality_and_a_clean_profile_finds_none() {
        let rule = rule();
        // Far ahead in reach, whatever the locality.
        let found = rule.decide(&at(&[0.2, 0.95, 0.5], &[0.3, 0.2, 0.3]));
        assert_eq!(found, (Some(1), Some(FoundBy::Reach)));
        // Close in reach, but the only local perturbation: a residual network's patch.
        let found = rule.decide(&at(&[0.96, 0.74, 0.9], &[0.78, 0.15, 0.2]));
        assert_eq!(found, (Some(0), Some(FoundBy::Locality)));
        // Local but not reached from enough images: no target.
        let found = rule.decide(&at(&[0.5, 0.95, 0.9], &[0.9, 0.2, 0.2]));
        assert_eq!(found, (None, None));
        // A clean non-robust model: easy classes close together, none of them local.
        let found = rule.decide(&at(&[0.95, 0.85, 0.84], &[0.12, 0.13, 0.2]));
        assert_eq!(found, (None, None));
    }
}

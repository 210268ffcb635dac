//! Benign salience: how much the clean task needs each neuron.
//!
//! For neuron k, s_k = Σ_{i∈k} g_i·θ_i is the first-order Taylor estimate of the change
//! in clean cross-entropy if the neuron's parameters were set to zero. At a trained
//! minimum the full-data gradient is near zero, so s_k is computed per mini-batch and
//! aggregated as the RMS (or mean |s|) over batches: a neuron the clean task relies on
//! moves the loss on every batch, in whichever direction. Unlike an activation
//! statistic, the gradient carries the neuron's downstream weights: a neuron that fires
//! but whose output nothing reads scores zero. The same formula per single weight gives
//! the weight-level salience that selects individual suspect weights.

use tch::{Kind, Tensor};

use super::config::Aggregation;
use super::data::SampleSet;
use super::error::EngineError;
use super::model::ScanModel;
use super::progress::{Monitor, Phase};
use super::training::cross_entropy;

pub struct BenignSalience {
    /// Per layer, one score per neuron.
    pub per_neuron: Vec<Vec<f64>>,
    /// Per layer, one score per entry of the layer's weight tensor.
    pub per_weight: Vec<Tensor>,
}

pub fn benign_salience(
    model: &mut ScanModel,
    data: &SampleSet,
    batch_size: usize,
    aggregation: Aggregation,
    monitor: &mut Monitor,
) -> Result<BenignSalience, EngineError> {
    salience_of(
        model,
        data,
        batch_size,
        aggregation,
        monitor,
        &|images, labels| Ok((images, labels)),
    )
}

/// The same formula for a shortcut: every clean image as `carry` sends it towards
/// `target` (the scan's universal perturbation), labelled `target`. A neuron scores high
/// when the route to the target through that perturbation needs it. Each batch is
/// carried as it is read, so no perturbed copy of the bundle is held.
pub fn shortcut_salience(
    model: &mut ScanModel,
    data: &SampleSet,
    batch_size: usize,
    aggregation: Aggregation,
    monitor: &mut Monitor,
    carry: &dyn Fn(&Tensor) -> Result<Tensor, EngineError>,
    target: i64,
) -> Result<BenignSalience, EngineError> {
    salience_of(
        model,
        data,
        batch_size,
        aggregation,
        monitor,
        &|images, labels| Ok((carry(&images)?, labels.f_full_like(target)?)),
    )
}

type Feed<'a> = dyn Fn(Tensor, Tensor) -> Result<(Tensor, Tensor), EngineError> + 'a;

/// Salience over `data` with each batch of images and labels passed through `feed`.
fn salience_of(
    model: &mut ScanModel,
    data: &SampleSet,
    batch_size: usize,
    aggregation: Aggregation,
    monitor: &mut Monitor,
    feed: &Feed,
) -> Result<BenignSalience, EngineError> {
    model.set_eval()?;
    let aggregate = |t: Tensor| -> Result<Tensor, tch::TchError> {
        match aggregation {
            Aggregation::Rms => t.f_square(),
            Aggregation::MeanAbs => t.f_abs(),
        }
    };
    let layers = model.layers.clone();
    let mut neuron_acc: Vec<Option<Tensor>> = (0..layers.len()).map(|_| None).collect();
    let mut weight_acc: Vec<Option<Tensor>> = (0..layers.len()).map(|_| None).collect();
    let total = data.len().div_ceil(batch_size) as u64;
    let mut batches = 0u64;
    for (images, labels) in data.chunks(batch_size) {
        let (images, labels) = feed(images, labels)?;
        model.zero_grad();
        cross_entropy(&model.forward(&images)?, &labels)?.f_backward()?;
        for (i, layer) in layers.iter().enumerate() {
            let per_neuron =
                aggregate(model.neuron_sum(layer, |p| ScanModel::gradient_or_zeros(p).f_mul(p))?)?;
            let weight = &model.params[layer.weight].tensor;
            let per_weight = tch::no_grad(|| {
                aggregate(
                    ScanModel::gradient_or_zeros(weight)
                        .f_mul(weight)?
                        .f_to_kind(Kind::Float)?,
                )
            })?;
            neuron_acc[i] = Some(add_into(neuron_acc[i].take(), per_neuron)?);
            weight_acc[i] = Some(add_into(weight_acc[i].take(), per_weight)?);
        }
        batches += 1;
        monitor.step(Phase::Salience, batches, total)?;
    }
    model.zero_grad();
    let finish = |acc: Tensor| -> Result<Tensor, tch::TchError> {
        let mean = acc.f_div_scalar(batches.max(1) as f64)?;
        match aggregation {
            Aggregation::Rms => mean.f_sqrt(),
            Aggregation::MeanAbs => Ok(mean),
        }
    };
    let mut per_neuron = Vec::with_capacity(layers.len());
    let mut per_weight = Vec::with_capacity(layers.len());
    for (n, w) in neuron_acc.into_iter().zip(weight_acc) {
        let (n, w) = (
            n.expect("at least one batch"),
            w.expect("at least one batch"),
        );
        per_neuron.push(Vec::<f64>::try_from(
            finish(n)?
                .f_to_kind(Kind::Double)?
                .f_to_device(tch::Device::Cpu)?,
        )?);
        per_weight.push(finish(w)?);
    }
    Ok(BenignSalience {
        per_neuron,
        per_weight,
    })
}

/// Added to both normalized scores before `relative_to_shortcut` divides them: a
/// neuron neither the clean task nor the shortcut uses scores 1, between the ones only
/// the shortcut needs (near 0) and the ones only the clean task needs (large).
pub const SHORTCUT_RANK_FLOOR: f64 = 1e-3;

/// Scores to rank suspects by when the scan found a shortcut: per neuron and per weight,
/// (clean / its layer's mean + floor) / (shortcut / its layer's mean + floor). `clean` is
/// what the method measures on clean data (benign salience, or activation for the
/// ablation) and `shortcut` the benign-salience formula on clean images carried towards
/// the found target. Lowest first is what the clean task can spare and the shortcut
/// leans on: a trigger pathway's neurons, where clean salience alone ranks every neuron
/// the clean task does not need alike, used by the backdoor or not.
pub fn relative_to_shortcut(
    clean: &BenignSalience,
    shortcut: &BenignSalience,
) -> Result<BenignSalience, EngineError> {
    let floor = SHORTCUT_RANK_FLOOR;
    let per_neuron = clean
        .per_neuron
        .iter()
        .zip(&shortcut.per_neuron)
        .map(|(c, s)| {
            let (mc, ms) = (layer_mean(c), layer_mean(s));
            c.iter()
                .zip(s)
                .map(|(&c, &s)| (c / mc + floor) / (s / ms + floor))
                .collect()
        })
        .collect();
    let per_weight = clean
        .per_weight
        .iter()
        .zip(&shortcut.per_weight)
        .map(|(c, s)| -> Result<Tensor, EngineError> {
            let mean = |t: &Tensor| -> Result<f64, EngineError> {
                Ok(positive_or_one(
                    t.f_mean(Kind::Double)?.f_double_value(&[])?,
                ))
            };
            let (mc, ms) = (mean(c)?, mean(s)?);
            Ok(c.f_div_scalar(mc)?
                .f_add_scalar(floor)?
                .f_div(&s.f_div_scalar(ms)?.f_add_scalar(floor)?)?)
        })
        .collect::<Result<_, _>>()?;
    Ok(BenignSalience {
        per_neuron,
        per_weight,
    })
}

/// A layer's mean score, or 1 where every score is zero (nothing to normalize by; the
/// scores stay zeros).
pub fn layer_mean(scores: &[f64]) -> f64 {
    positive_or_one(scores.iter().sum::<f64>() / scores.len().max(1) as f64)
}

fn positive_or_one(mean: f64) -> f64 {
    if mean > 0.0 {
        mean
    } else {
        1.0
    }
}

fn add_into(acc: Option<Tensor>, value: Tensor) -> Result<Tensor, tch::TchError> {
    match acc {
        Some(a) => a.f_add(&value),
        None => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::identify::rank_neurons;

    #[test]
    fn relative_to_a_shortcut_what_only_the_shortcut_uses_ranks_first() {
        // Neuron 0: only the shortcut uses it; 1: neither; 2: only the clean task;
        // 3: both, equally (relative to their layer means).
        let clean = BenignSalience {
            per_neuron: vec![vec![0.0, 0.0, 2.0, 2.0]],
            per_weight: vec![Tensor::from_slice(&[0.0f32, 0.0, 2.0, 2.0])],
        };
        let shortcut = BenignSalience {
            per_neuron: vec![vec![3.0, 0.0, 0.0, 3.0]],
            per_weight: vec![Tensor::from_slice(&[3.0f32, 0.0, 0.0, 3.0])],
        };
        let ranked = relative_to_shortcut(&clean, &shortcut).unwrap();
        let scores = &ranked.per_neuron[0];
        assert!(scores[0] < 1e-3, "{scores:?}");
        assert!((scores[1] - 1.0).abs() < 1e-12 && (scores[3] - 1.0).abs() < 1e-12);
        assert!(scores[2] > 1000.0, "{scores:?}");
        let order = rank_neurons(scores, &[1.0; 4]);
        assert_eq!((order[0], order[3]), (0, 2));
        // Clean salience alone cannot tell neuron 0 from neuron 1.
        assert_eq!(rank_neurons(&clean.per_neuron[0], &[1.0; 4])[..2], [0, 1]);
        let weights = Vec::<f64>::try_from(ranked.per_weight[0].to_kind(Kind::Double)).unwrap();
        for (w, n) in weights.iter().zip(scores) {
            assert!((w - n).abs() <= 1e-6 * n.max(1.0), "{weights:?} {scores:?}");
        }
    }

    #[test]
    fn a_layer_nothing_uses_ranks_every_neuron_alike() {
        let zeros = || BenignSalience {
            per_neuron: vec![vec![0.0; 3]],
            per_weight: vec![Tensor::zeros([3], (Kind::Float, tch::Device::Cpu))],
        };
        let ranked = relative_to_shortcut(&zeros(), &zeros()).unwrap();
        assert_eq!(ranked.per_neuron[0], [1.0; 3]);
    }
}

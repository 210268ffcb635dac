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

fn add_into(acc: Option<Tensor>, value: Tensor) -> Result<Tensor, tch::TchError> {
    match acc {
        Some(a) => a.f_add(&value),
        None => Ok(value),
    }
}

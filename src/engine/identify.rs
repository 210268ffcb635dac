//! Choosing the suspects, from clean data only.
//!
//! Within each hidden layer (every layer but the classifier) neurons are ranked by
//! benign salience divided by the layer's mean, so layers of different scale compare.
//! Neurons that never fire on clean data all score zero; among tied scores the one with
//! the larger norm ranks as more suspect, since a silent neuron with large weights is
//! what a trigger-only pathway looks like, while a silent neuron with tiny weights is
//! harmless either way. Individual weights are ranked the same way by their own salience.
//! When the scan found a shortcut to a suspected target, the scores ranked here are
//! already relative to it (`salience::relative_to_shortcut`); the rule below is the same.
//!
//! How many to flag is the largest fraction (on a grid) whose outright removal costs at
//! most a budget of held-out clean accuracy: everything the clean task can spare is
//! suspect. Poisoned data never enters this choice.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::data::SampleSet;
use super::error::EngineError;
use super::model::ScanModel;
use super::progress::{Monitor, Phase};
use super::salience::BenignSalience;
use super::training::accuracy;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trial {
    pub fraction: f64,
    pub held_out_acc: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Selection {
    pub held_out_acc: f64,
    pub neuron_fraction: f64,
    pub weight_fraction: f64,
    pub neuron_trials: Vec<Trial>,
    pub weight_trials: Vec<Trial>,
    /// The class whose shortcut the ranking was relative to (`shortcut_ranking`); absent
    /// when neurons and weights were ranked by the method's clean score alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shortcut_target: Option<i64>,
}

pub struct Suspects {
    /// Per layer, whether each neuron is flagged.
    pub neuron_flags: Vec<Vec<bool>>,
    /// Per layer, a 0/1 float mask over the weight tensor of suspect single weights.
    pub weight_masks: Vec<Option<Tensor>>,
    pub selection: Selection,
}

pub struct Budget {
    pub neuron_drop: f64,
    pub weight_drop: f64,
    pub fraction_step: f64,
    pub max_fraction: f64,
    pub batch_size: usize,
}

/// Neuron indices of one layer, most suspect first.
pub fn rank_neurons(salience: &[f64], norms: &[f64]) -> Vec<usize> {
    let mean = salience.iter().sum::<f64>() / salience.len().max(1) as f64;
    let normalized: Vec<f64> = salience
        .iter()
        .map(|s| if mean > 0.0 { s / mean } else { 0.0 })
        .collect();
    let mut order: Vec<usize> = (0..salience.len()).collect();
    order.sort_by(|&a, &b| {
        normalized[a]
            .total_cmp(&normalized[b])
            .then(norms[b].total_cmp(&norms[a]))
            .then(a.cmp(&b))
    });
    order
}

/// The same order for single weights: lowest salience first, larger |θ| first among ties.
fn rank_weights(salience: &Tensor, weight: &Tensor) -> Result<Vec<usize>, EngineError> {
    let to_vec = |t: &Tensor| -> Result<Vec<f32>, EngineError> {
        Ok(Vec::<f32>::try_from(
            t.f_flatten(0, -1)?
                .f_to_kind(Kind::Float)?
                .f_to_device(tch::Device::Cpu)?,
        )?)
    };
    let s = to_vec(salience)?;
    let w = to_vec(&weight.f_abs()?)?;
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&a, &b| {
        s[a].total_cmp(&s[b])
            .then(w[b].total_cmp(&w[a]))
            .then(a.cmp(&b))
    });
    Ok(order)
}

fn fractions(budget: &Budget) -> Vec<f64> {
    let steps = (budget.max_fraction / budget.fraction_step + 1e-9).floor() as usize;
    (1..=steps)
        .map(|i| (i as f64 * budget.fraction_step * 1e6).round() / 1e6)
        .collect()
}

fn first_k_mask(
    order: &[usize],
    k: usize,
    shape: &[i64],
    device: tch::Device,
) -> Result<Tensor, EngineError> {
    let mut mask = vec![0f32; order.len()];
    for &i in &order[..k] {
        mask[i] = 1.0;
    }
    Ok(Tensor::from_slice(&mask)
        .f_reshape(shape)?
        .f_to_device(device)?)
}

pub fn identify(
    model: &mut ScanModel,
    salience: &BenignSalience,
    held_out: &SampleSet,
    budget: &Budget,
    monitor: &mut Monitor,
) -> Result<Suspects, EngineError> {
    let device = model.params[0].tensor.device();
    let layers = model.layers.clone();
    let hidden: Vec<usize> = (0..layers.len())
        .filter(|&i| !layers[i].is_classifier)
        .collect();
    let mut neuron_order = Vec::with_capacity(layers.len());
    let mut weight_order = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        neuron_order.push(rank_neurons(
            &salience.per_neuron[i],
            &model.neuron_norms(layer)?,
        ));
        weight_order.push(rank_weights(
            &salience.per_weight[i],
            &model.params[layer.weight].tensor,
        )?);
    }
    let weight_shapes: Vec<Vec<i64>> = layers
        .iter()
        .map(|l| model.params[l.weight].tensor.size())
        .collect();
    let baseline = accuracy(model, held_out, budget.batch_size)?;
    let snapshot = model.snapshot();
    let grid = fractions(budget);
    let total = 2 * grid.len() as u64;
    let mut done = 0u64;

    // Neuron level: zero the lowest-ranked fraction of each hidden layer's neurons.
    let neuron_flags_at = |q: f64| -> Vec<Vec<bool>> {
        layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let mut flags = vec![false; layer.width];
                if !layer.is_classifier {
                    for &n in &neuron_order[i][..(q * layer.width as f64).floor() as usize] {
                        flags[n] = true;
                    }
                }
                flags
            })
            .collect()
    };
    let mut neuron_trials = Vec::new();
    let mut neuron_fraction = 0.0;
    for &q in &grid {
        model.restore(&snapshot)?;
        zero_neurons(model, &neuron_flags_at(q))?;
        let acc = accuracy(model, held_out, budget.batch_size)?;
        neuron_trials.push(Trial {
            fraction: q,
            held_out_acc: acc,
        });
        done += 1;
        monitor.step(Phase::Identify, done, total)?;
        if baseline - acc > budget.neuron_drop + 1e-12 {
            break;
        }
        neuron_fraction = q;
    }

    // Weight level: zero the lowest-salience fraction of each hidden layer's weights.
    let weight_masks_at = |q: f64| -> Result<Vec<Option<Tensor>>, EngineError> {
        let mut masks: Vec<Option<Tensor>> = (0..layers.len()).map(|_| None).collect();
        for &i in &hidden {
            let k = (q * weight_order[i].len() as f64).floor() as usize;
            masks[i] = Some(first_k_mask(
                &weight_order[i],
                k,
                &weight_shapes[i],
                device,
            )?);
        }
        Ok(masks)
    };
    let mut weight_trials = Vec::new();
    let mut weight_fraction = 0.0;
    for &q in &grid {
        model.restore(&snapshot)?;
        let masks = weight_masks_at(q)?;
        tch::no_grad(|| -> Result<(), EngineError> {
            for (i, mask) in masks.iter().enumerate() {
                if let Some(mask) = mask {
                    let weight = &mut model.params[layers[i].weight].tensor;
                    let _ = weight.f_mul_(&mask.f_neg()?.f_add_scalar(1.0)?)?;
                }
            }
            Ok(())
        })?;
        let acc = accuracy(model, held_out, budget.batch_size)?;
        weight_trials.push(Trial {
            fraction: q,
            held_out_acc: acc,
        });
        done += 1;
        monitor.step(Phase::Identify, done, total)?;
        if baseline - acc > budget.weight_drop + 1e-12 {
            break;
        }
        weight_fraction = q;
    }
    model.restore(&snapshot)?;

    let weight_masks = if weight_fraction > 0.0 {
        weight_masks_at(weight_fraction)?
    } else {
        (0..layers.len()).map(|_| None).collect()
    };
    Ok(Suspects {
        neuron_flags: neuron_flags_at(neuron_fraction),
        weight_masks,
        selection: Selection {
            held_out_acc: baseline,
            neuron_fraction,
            weight_fraction,
            neuron_trials,
            weight_trials,
            shortcut_target: None,
        },
    })
}

/// Sets every parameter entry of the flagged neurons to zero.
pub fn zero_neurons(model: &mut ScanModel, flags: &[Vec<bool>]) -> Result<(), EngineError> {
    let device = model.params[0].tensor.device();
    let layers = model.layers.clone();
    tch::no_grad(|| -> Result<(), EngineError> {
        for (layer, flags) in layers.iter().zip(flags) {
            if !flags.iter().any(|&f| f) {
                continue;
            }
            let keep: Vec<f32> = flags.iter().map(|&f| if f { 0.0 } else { 1.0 }).collect();
            let keep = Tensor::from_slice(&keep).f_to_device(device)?;
            for index in std::iter::once(layer.weight).chain(layer.members.iter().copied()) {
                let param = &mut model.params[index].tensor;
                let mut shape = vec![layer.width as i64];
                shape.resize(param.dim(), 1);
                let _ = param.f_mul_(&keep.f_reshape(&shape)?.f_to_kind(param.kind())?)?;
            }
        }
        Ok(())
    })
}

impl Suspects {
    /// One 0/1 mask per model parameter marking its suspect entries (the flagged
    /// neurons' slices plus the suspect single weights), `None` where there are none.
    pub fn parameter_masks(&self, model: &ScanModel) -> Result<Vec<Option<Tensor>>, EngineError> {
        let device = model.params[0].tensor.device();
        let mut masks: Vec<Option<Tensor>> = (0..model.params.len()).map(|_| None).collect();
        for (i, layer) in model.layers.iter().enumerate() {
            let flags = &self.neuron_flags[i];
            let rows: Vec<f32> = flags.iter().map(|&f| if f { 1.0 } else { 0.0 }).collect();
            let rows = Tensor::from_slice(&rows).f_to_device(device)?;
            let any_flag = flags.iter().any(|&f| f);
            for index in std::iter::once(layer.weight).chain(layer.members.iter().copied()) {
                let param = &model.params[index].tensor;
                let mut shape = vec![layer.width as i64];
                shape.resize(param.dim(), 1);
                let mut mask = if any_flag {
                    Some(
                        rows.f_reshape(&shape)?
                            .f_expand(param.size(), false)?
                            .f_contiguous()?,
                    )
                } else {
                    None
                };
                if index == layer.weight {
                    if let Some(weights) = &self.weight_masks[i] {
                        mask = Some(match mask {
                            Some(m) => m.f_maximum(weights)?,
                            None => weights.shallow_clone(),
                        });
                    }
                }
                masks[index] = match mask {
                    Some(m) => Some(m.f_to_kind(param.kind())?),
                    None => None,
                };
            }
        }
        Ok(masks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_by_normalised_salience_then_larger_norm_first() {
        // Neurons 1 and 3 never fire (zero salience); 3 carries more weight, so it leads.
        let order = rank_neurons(&[2.0, 0.0, 1.0, 0.0], &[1.0, 0.1, 1.0, 5.0]);
        assert_eq!(order, vec![3, 1, 2, 0]);
    }

    #[test]
    fn fraction_grid_is_exact() {
        let budget = Budget {
            neuron_drop: 0.0,
            weight_drop: 0.0,
            fraction_step: 0.05,
            max_fraction: 0.9,
            batch_size: 8,
        };
        let grid = fractions(&budget);
        assert_eq!(grid.len(), 18);
        assert_eq!(grid[0], 0.05);
        assert_eq!(grid[17], 0.9);
    }
}

//! Mean clean activation per neuron, read through the model's exported `activations`
//! method (TorchScript gives a host program no forward hooks). Used by Fine-Pruning and
//! by the activation-magnitude ablation of benign salience.

use tch::{Kind, Tensor};

use super::data::SampleSet;
use super::error::EngineError;
use super::model::ScanModel;
use super::progress::{Monitor, Phase};

/// Per layer of `model.layers`, the mean |activation| of each neuron over `data` (eval
/// mode), or `None` for a layer the model's `activations` does not report.
pub fn mean_activations(
    model: &mut ScanModel,
    data: &SampleSet,
    batch_size: usize,
    needed_by: &str,
    monitor: &mut Monitor,
) -> Result<Vec<Option<Vec<f64>>>, EngineError> {
    model.set_eval()?;
    let layers = model.layers.clone();
    let mut sums: Vec<Option<Tensor>> = (0..layers.len()).map(|_| None).collect();
    let total = data.len().div_ceil(batch_size) as u64;
    for (done, (images, _)) in data.chunks(batch_size).enumerate() {
        for (name, act) in model.activations(&images, needed_by)? {
            let Some(i) = layers.iter().position(|l| l.name == name) else {
                continue;
            };
            if act.size()[1] != layers[i].width as i64 {
                return Err(EngineError::InvalidInput(format!(
                    "model: `activations` entry `{name}` has {} channels but layer `{name}` has {} neurons",
                    act.size()[1],
                    layers[i].width
                )));
            }
            let batch_sum = act.f_abs()?.f_sum_dim_intlist(0, false, Kind::Double)?;
            sums[i] = Some(match sums[i].take() {
                Some(s) => s.f_add(&batch_sum)?,
                None => batch_sum,
            });
        }
        monitor.step(Phase::Salience, done as u64 + 1, total)?;
    }
    sums.into_iter()
        .map(|sum| {
            sum.map(|s| -> Result<Vec<f64>, EngineError> {
                Ok(Vec::<f64>::try_from(
                    s.f_div_scalar(data.len().max(1) as f64)?
                        .f_to_device(tch::Device::Cpu)?,
                )?)
            })
            .transpose()
        })
        .collect()
}

/// The activations of every hidden layer; a hidden layer the model does not report is an
/// input error naming it (the classifier's units are classes and get zeros).
pub fn hidden_activations(
    model: &mut ScanModel,
    data: &SampleSet,
    batch_size: usize,
    needed_by: &str,
    monitor: &mut Monitor,
) -> Result<Vec<Vec<f64>>, EngineError> {
    let means = mean_activations(model, data, batch_size, needed_by, monitor)?;
    model
        .layers
        .iter()
        .zip(means)
        .map(|(layer, mean)| match mean {
            Some(m) => Ok(m),
            None if layer.is_classifier => Ok(vec![0.0; layer.width]),
            None => Err(EngineError::InvalidInput(format!(
                "model: method `{needed_by}` needs `activations` to report every hidden layer; \
                 `{}` is missing",
                layer.name
            ))),
        })
        .collect()
}

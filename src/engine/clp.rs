//! Channel Lipschitzness-based Pruning (Zheng et al., "Data-Free Backdoor Removal Based
//! on Channel Lipschitzness", ECCV 2022). Data-free: for every output channel k of a
//! convolution followed by BatchNorm, the upper bound of its channel Lipschitz constant
//! is UCLC_k = σ_max(W_k) · |γ_k| / sqrt(running_var_k + ε), with W_k the channel's kernel
//! reshaped to C_in × (kh·kw); a channel whose UCLC exceeds mean + u·std of its layer is
//! pruned (zeroed). A convolution without BatchNorm uses σ_max(W_k) alone (the paper
//! assumes BatchNorm; this is the same bound with the identity in its place).
//!
//! `running_var` is a buffer, which tch cannot read from a loaded module, so it comes
//! from the archive file itself (see `archive.rs`). No fine-tuning follows.

use tch::{Kind, Tensor};

use super::archive::read_float_tensors;
use super::error::EngineError;
use super::identify::zero_neurons;
use super::model::ScanModel;
use super::progress::{Monitor, Phase};
use super::scan::{neuron_masks, Context, Defended, Timer};

/// PyTorch's BatchNorm default ε.
const BATCHNORM_EPS: f64 = 1e-5;

/// UCLC of every channel of every convolutional hidden layer; `None` for other layers.
pub fn channel_lipschitz_bounds(
    model: &ScanModel,
    buffers: &std::collections::BTreeMap<String, Tensor>,
) -> Result<Vec<Option<Vec<f64>>>, EngineError> {
    let mut out = Vec::with_capacity(model.layers.len());
    for layer in &model.layers {
        let weight = &model.params[layer.weight].tensor;
        if layer.is_classifier || weight.dim() < 3 {
            out.push(None);
            continue;
        }
        let size = weight.size();
        let kernels = weight
            .detach()
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?
            .f_reshape([size[0], size[1], -1])?;
        // The matrix 2-norm is the largest singular value.
        let sigma_max = kernels.f_linalg_norm(2.0, [1i64, 2].as_slice(), false, None::<Kind>)?;
        let scale = match model.batchnorm(layer) {
            Some((gamma, _)) => {
                let gamma_name = &model.params[gamma].name;
                let module = gamma_name.trim_end_matches(".weight");
                let var = buffers
                    .get(&format!("{module}.running_var"))
                    .ok_or_else(|| {
                        EngineError::InvalidInput(format!(
                            "model: method `clp` needs `{module}.running_var` in the archive"
                        ))
                    })?;
                // A module that only looks like BatchNorm (a weight, a bias and a buffer
                // of that name) can hold anything there.
                let fits = var.size() == [size[0]] || var.size() == [1];
                if !fits || var.f_ge(0.0)?.f_all()?.f_int64_value(&[])? == 0 {
                    return Err(EngineError::InvalidInput(format!(
                        "model: `{module}.running_var` must be {} non-negative variances \
                         for method `clp`; it has shape {:?}",
                        size[0],
                        var.size()
                    )));
                }
                model.params[gamma]
                    .tensor
                    .detach()
                    .f_to_kind(Kind::Float)?
                    .f_to_device(tch::Device::Cpu)?
                    .f_abs()?
                    .f_div(&var.f_add_scalar(BATCHNORM_EPS)?.f_sqrt()?)?
            }
            None => sigma_max.f_ones_like()?,
        };
        out.push(Some(Vec::<f64>::try_from(
            sigma_max.f_mul(&scale)?.f_to_kind(Kind::Double)?,
        )?));
    }
    Ok(out)
}

/// Indices whose value exceeds mean + u·std (sample standard deviation, as torch's).
pub fn outliers(values: &[f64], u: f64) -> Vec<usize> {
    let n = values.len();
    if n < 2 {
        return Vec::new();
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let limit = mean + u * var.sqrt();
    (0..n).filter(|&i| values[i] > limit).collect()
}

/// `clp`: prune the channels with outlying UCLC; nothing else.
pub(super) fn channel_lipschitz_pruning(
    model: &mut ScanModel,
    ctx: &Context,
    monitor: &mut Monitor,
    timer: &mut Timer,
) -> Result<Defended, EngineError> {
    monitor.step(Phase::Identify, 0, 1)?;
    let buffers = read_float_tensors(ctx.model_path)?;
    let bounds = channel_lipschitz_bounds(model, &buffers)?;
    let mut scores = Vec::with_capacity(bounds.len());
    let mut flags = Vec::with_capacity(bounds.len());
    for (layer, bound) in model.layers.iter().zip(&bounds) {
        let mut f = vec![false; layer.width];
        match bound {
            Some(b) => {
                for i in outliers(b, ctx.config.clp.u) {
                    f[i] = true;
                }
                scores.push(b.clone());
            }
            None => scores.push(vec![0.0; layer.width]),
        }
        flags.push(f);
    }
    zero_neurons(model, &flags)?;
    let pruned = neuron_masks(model, &flags)?;
    monitor.step(Phase::Identify, 1, 1)?;
    timer.lap(Phase::Identify);
    let pruned_neurons: Vec<Vec<usize>> = flags
        .iter()
        .map(|f| (0..f.len()).filter(|&n| f[n]).collect())
        .collect();
    let conv_neurons: usize = model
        .layers
        .iter()
        .zip(&bounds)
        .filter(|(_, b)| b.is_some())
        .map(|(l, _)| l.width)
        .sum();
    let count: usize = pruned_neurons.iter().map(Vec::len).sum();
    Ok(Defended {
        scores,
        shortcut_ranking: None,
        flags,
        selection: ctx.no_grid_selection(count as f64 / conv_neurons.max(1) as f64),
        suspect_masks: pruned
            .iter()
            .map(|m| m.as_ref().map(Tensor::shallow_clone))
            .collect(),
        pruned_masks: pruned,
        pruned_neurons: Some(pruned_neurons),
        shortcut_search: None,
        purify_peak_lr: None,
        pattern_probe: None,
        suspects_removed: None,
        warnings: Vec::new(),
        trace: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_only_values_beyond_mean_plus_u_std() {
        let mut values = vec![1.0; 20];
        values[7] = 10.0;
        assert_eq!(outliers(&values, 3.0), vec![7]);
        assert!(outliers(&[1.0, 1.0, 1.0], 3.0).is_empty());
    }
}

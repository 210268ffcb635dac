//! Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored
//! Deep Models", NeurIPS 2021), written from the paper and the behaviour of its reference
//! code (csdongxian/ANP_backdoor).
//!
//! Every hidden neuron k gets a mask m_k ∈ [0, 1] and multiplicative perturbations
//! δ_k, ξ_k ∈ [−ε, ε]. Where the neuron has a BatchNorm, its γ is scaled by (m_k + δ_k)
//! and its β by (1 + ξ_k), as the reference's noisy BatchNorm does; without one, the
//! weight row plays γ's part and the layer's own bias β's. Per mini-batch of clean
//! training data: draw δ, ξ uniformly, take one signed ascent step of size ε on the
//! cross-entropy and clip (the adversarial perturbation); then step the masks (SGD,
//! momentum 0.9) on α·L(m) + (1 − α)·L(m + δ) and clip them to [0, 1]. Neurons whose
//! mask ends below the threshold are pruned by zeroing their γ (or weight row), which
//! is what the reference's pruning by threshold does. No fine-tuning follows.
//!
//! TorchScript exposes parameters, not a way to insert masks, so each forward pass runs
//! with θ = θ₀·c written into the parameters and the masks' gradients come from the
//! parameters' by the chain rule: ∂L/∂m_k = Σ_{i∈k} (∂L/∂θ_i)·θ₀_i. The search runs
//! on a second load of the archive in training mode (as the reference does), so the
//! BatchNorm statistics of the model that is pruned and saved stay as they arrived.

use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use super::data::{epoch_batches, SampleSet};
use super::error::EngineError;
use super::model::{defined_or_zeros, ScanModel};
use super::progress::{Monitor, Phase};
use super::scan::{no_masks, Context, Defended, Timer};
use super::training::cross_entropy;

/// One hidden layer under ANP: the parameter its masks scale and the one only perturbed.
#[derive(Debug, Clone)]
pub struct AnpLayer {
    pub layer: usize,
    /// BatchNorm γ, or the layer's weight when it has no BatchNorm.
    pub scaled: usize,
    /// BatchNorm β, or the layer's own bias.
    pub shifted: Option<usize>,
}

/// Gradients of the loss at the current masks and perturbations, per ANP layer.
pub struct AnpGradients {
    pub loss: f64,
    /// ∂L/∂m_k (equal to ∂L/∂δ_k when perturbed: both multiply the same θ₀).
    pub mask: Vec<Tensor>,
    /// ∂L/∂ξ_k, the perturbation of the shifted parameter.
    pub shift_noise: Vec<Option<Tensor>>,
}

pub struct AnpSearch {
    pub layers: Vec<AnpLayer>,
    scaled_at_start: Vec<Tensor>,
    shifted_at_start: Vec<Option<Tensor>>,
    pub masks: Vec<Tensor>,
    pub scale_noise: Vec<Tensor>,
    pub shift_noise: Vec<Tensor>,
}

fn per_neuron_sum(t: &Tensor, width: i64) -> Result<Tensor, tch::TchError> {
    t.f_reshape([width, -1])?
        .f_sum_dim_intlist(1, false, Kind::Float)
}

fn broadcast(coefficient: &Tensor, like: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut shape = vec![coefficient.size()[0]];
    shape.resize(like.dim(), 1);
    coefficient.f_reshape(&shape)?.f_to_kind(like.kind())
}

impl AnpSearch {
    /// Masks at 1 and no perturbation for every hidden layer of `model`.
    pub fn new(model: &ScanModel) -> Result<Self, EngineError> {
        let mut layers = Vec::new();
        for (i, layer) in model.layers.iter().enumerate() {
            if layer.is_classifier {
                continue;
            }
            let (scaled, shifted) = match model.batchnorm(layer) {
                Some((gamma, beta)) => (gamma, Some(beta)),
                None => (layer.weight, model.own_bias(layer)),
            };
            layers.push(AnpLayer {
                layer: i,
                scaled,
                shifted,
            });
        }
        let copy = |i: usize| tch::no_grad(|| model.params[i].tensor.detach().copy());
        let device = model.params[0].tensor.device();
        let ones = |l: &AnpLayer| {
            Tensor::ones([model.layers[l.layer].width as i64], (Kind::Float, device))
        };
        Ok(AnpSearch {
            scaled_at_start: layers.iter().map(|l| copy(l.scaled)).collect(),
            shifted_at_start: layers.iter().map(|l| l.shifted.map(copy)).collect(),
            masks: layers.iter().map(ones).collect(),
            scale_noise: layers.iter().map(|l| ones(l).zeros_like()).collect(),
            shift_noise: layers.iter().map(|l| ones(l).zeros_like()).collect(),
            layers,
        })
    }

    /// Writes θ₀·(m + δ) and β₀·(1 + ξ) (perturbed) or θ₀·m and β₀ into the model.
    fn write(&self, model: &mut ScanModel, perturbed: bool) -> Result<(), EngineError> {
        tch::no_grad(|| -> Result<(), EngineError> {
            for (j, l) in self.layers.iter().enumerate() {
                let coefficient = if perturbed {
                    self.masks[j].f_add(&self.scale_noise[j])?
                } else {
                    self.masks[j].shallow_clone()
                };
                let base = &self.scaled_at_start[j];
                let value = base.f_mul(&broadcast(&coefficient, base)?)?;
                model.params[l.scaled].tensor.f_copy_(&value)?;
                if let (Some(p), Some(base)) = (l.shifted, &self.shifted_at_start[j]) {
                    let value = if perturbed {
                        base.f_mul(&self.shift_noise[j].f_add_scalar(1.0)?)?
                    } else {
                        base.shallow_clone()
                    };
                    model.params[p].tensor.f_copy_(&value)?;
                }
            }
            Ok(())
        })
    }

    /// Puts the parameters back as they were when the search began.
    pub fn restore(&self, model: &mut ScanModel) -> Result<(), EngineError> {
        tch::no_grad(|| -> Result<(), EngineError> {
            for (j, l) in self.layers.iter().enumerate() {
                model.params[l.scaled]
                    .tensor
                    .f_copy_(&self.scaled_at_start[j])?;
                if let (Some(p), Some(base)) = (l.shifted, &self.shifted_at_start[j]) {
                    model.params[p].tensor.f_copy_(base)?;
                }
            }
            Ok(())
        })
    }

    /// Cross-entropy on one batch and its gradients with respect to the masks and the
    /// shift perturbations, by the chain rule through θ = θ₀·c.
    pub fn gradients(
        &self,
        model: &mut ScanModel,
        images: &Tensor,
        labels: &Tensor,
        perturbed: bool,
    ) -> Result<AnpGradients, EngineError> {
        self.write(model, perturbed)?;
        let loss = cross_entropy(&model.forward(images)?, labels)?;
        // Only the scaled and shifted parameters' gradients: asking autograd for every
        // parameter's also computed each convolution's weight gradient (and the whole
        // backward pass of a first convolution followed by BatchNorm), which nothing here
        // reads. A parameter `forward` never uses gets zeros, as `gradient_or_zeros` gives.
        let wanted: Vec<usize> = self
            .layers
            .iter()
            .flat_map(|l| std::iter::once(l.scaled).chain(l.shifted))
            .collect();
        let inputs: Vec<&Tensor> = wanted.iter().map(|&i| &model.params[i].tensor).collect();
        let grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)?;
        let grad_of = |param: usize| {
            let at = wanted
                .iter()
                .position(|&i| i == param)
                .expect("asked for above");
            defined_or_zeros(grads[at].shallow_clone(), &model.params[param].tensor)
        };
        tch::no_grad(|| -> Result<AnpGradients, EngineError> {
            let mut mask = Vec::with_capacity(self.layers.len());
            let mut shift_noise = Vec::with_capacity(self.layers.len());
            for (j, l) in self.layers.iter().enumerate() {
                let width = model.layers[l.layer].width as i64;
                mask.push(per_neuron_sum(
                    &grad_of(l.scaled).f_mul(&self.scaled_at_start[j])?,
                    width,
                )?);
                shift_noise.push(match (l.shifted, &self.shifted_at_start[j]) {
                    (Some(p), Some(base)) => Some(per_neuron_sum(&grad_of(p).f_mul(base)?, width)?),
                    _ => None,
                });
            }
            Ok(AnpGradients {
                loss: loss.f_double_value(&[])?,
                mask,
                shift_noise,
            })
        })
    }

    /// The adversarial perturbation for one batch: uniform in [−ε, ε], one signed
    /// ascent step of size ε on the loss, clipped back to [−ε, ε].
    fn perturb(
        &mut self,
        model: &mut ScanModel,
        images: &Tensor,
        labels: &Tensor,
        eps: f64,
    ) -> Result<(), EngineError> {
        let uniform = |like: &Tensor| -> Result<Tensor, tch::TchError> {
            like.f_rand_like()?
                .f_mul_scalar(2.0 * eps)?
                .f_sub_scalar(eps)
        };
        for j in 0..self.layers.len() {
            self.scale_noise[j] = uniform(&self.masks[j])?;
            self.shift_noise[j] = uniform(&self.masks[j])?;
        }
        let g = self.gradients(model, images, labels, true)?;
        tch::no_grad(|| -> Result<(), EngineError> {
            for j in 0..self.layers.len() {
                self.scale_noise[j] = self.scale_noise[j]
                    .f_add(&g.mask[j].f_sign()?.f_mul_scalar(eps)?)?
                    .f_clamp(-eps, eps)?;
                if let Some(gs) = &g.shift_noise[j] {
                    self.shift_noise[j] = self.shift_noise[j]
                        .f_add(&gs.f_sign()?.f_mul_scalar(eps)?)?
                        .f_clamp(-eps, eps)?;
                }
            }
            Ok(())
        })
    }
}

/// `anp`: learn the masks on the clean training split, prune masks below the threshold.
pub(super) fn adversarial_neuron_pruning(
    model: &mut ScanModel,
    ctx: &Context,
    rng: &mut ChaCha8Rng,
    monitor: &mut Monitor,
    timer: &mut Timer,
) -> Result<Defended, EngineError> {
    let settings = &ctx.config.anp;
    let mut search_model = ctx.load_copy()?;
    let masks = learn_masks(&mut search_model, ctx.train, settings, rng, monitor)?;
    drop(search_model);

    let search = AnpSearch::new(model)?;
    let mut scores: Vec<Vec<f64>> = model.layers.iter().map(|l| vec![1.0; l.width]).collect();
    let mut flags: Vec<Vec<bool>> = model.layers.iter().map(|l| vec![false; l.width]).collect();
    let mut pruned_masks = no_masks(model);
    let device = model.params[0].tensor.device();
    for (l, mask) in search.layers.iter().zip(&masks) {
        scores[l.layer] = mask.clone();
        flags[l.layer] = mask.iter().map(|&m| m < settings.prune_threshold).collect();
        if !flags[l.layer].iter().any(|&f| f) {
            continue;
        }
        let cut: Vec<f32> = flags[l.layer]
            .iter()
            .map(|&f| if f { 1.0 } else { 0.0 })
            .collect();
        let param = &mut model.params[l.scaled].tensor;
        let cut = broadcast(&Tensor::from_slice(&cut).f_to_device(device)?, param)?
            .f_expand(param.size(), false)?
            .f_contiguous()?;
        let _ = tch::no_grad(|| param.f_mul_(&cut.f_neg()?.f_add_scalar(1.0)?))?;
        pruned_masks[l.scaled] = Some(cut);
    }
    timer.lap(Phase::Identify);
    let hidden: usize = search
        .layers
        .iter()
        .map(|l| model.layers[l.layer].width)
        .sum();
    let pruned: Vec<Vec<usize>> = flags
        .iter()
        .map(|f| (0..f.len()).filter(|&n| f[n]).collect())
        .collect();
    let pruned_count: usize = pruned.iter().map(Vec::len).sum();
    Ok(Defended {
        scores,
        shortcut_ranking: None,
        selection: ctx.no_grid_selection(pruned_count as f64 / hidden.max(1) as f64),
        flags,
        suspect_masks: pruned_masks
            .iter()
            .map(|m| m.as_ref().map(Tensor::shallow_clone))
            .collect(),
        pruned_masks,
        pruned_neurons: Some(pruned),
        shortcut_search: None,
        purify_peak_lr: None,
        pattern_probe: None,
        suspects_removed: None,
        warnings: Vec::new(),
        trace: Vec::new(),
    })
}

/// The mask search; returns each ANP layer's final masks.
pub fn learn_masks(
    model: &mut ScanModel,
    data: &SampleSet,
    settings: &super::config::AnpConfig,
    rng: &mut ChaCha8Rng,
    monitor: &mut Monitor,
) -> Result<Vec<Vec<f64>>, EngineError> {
    let mut search = AnpSearch::new(model)?;
    let mut velocity: Vec<Tensor> = search.masks.iter().map(Tensor::zeros_like).collect();
    let mut batches = Vec::new();
    model.set_train()?;
    for iteration in 0..settings.iterations {
        if batches.is_empty() {
            batches = epoch_batches(data.len(), settings.batch_size, rng);
            batches.reverse();
        }
        let batch = data.select(&batches.pop().expect("refilled above"))?;
        let robust = if settings.eps > 0.0 {
            search.perturb(model, &batch.images, &batch.labels, settings.eps)?;
            Some(search.gradients(model, &batch.images, &batch.labels, true)?)
        } else {
            None
        };
        let natural = search.gradients(model, &batch.images, &batch.labels, false)?;
        tch::no_grad(|| -> Result<(), EngineError> {
            for (j, velocity) in velocity.iter_mut().enumerate() {
                let mut grad = natural.mask[j].f_mul_scalar(settings.alpha)?;
                if let Some(r) = &robust {
                    grad = grad.f_add(&r.mask[j].f_mul_scalar(1.0 - settings.alpha)?)?;
                }
                *velocity = velocity.f_mul_scalar(0.9)?.f_add(&grad)?;
                search.masks[j] = search.masks[j]
                    .f_sub(&velocity.f_mul_scalar(settings.mask_lr)?)?
                    .f_clamp(0.0, 1.0)?;
            }
            Ok(())
        })?;
        if !natural.loss.is_finite() {
            // The same situation as a purification whose loss stops being a number: the
            // model (here in training mode, which the load checks do not run) and the
            // settings together do not train; the caller's to change.
            return Err(EngineError::Diverged(format!(
                "ANP's mask search loss stopped being a number at iteration {} \
                 (lower anp.eps or anp.mask_lr, or check the model in training mode)",
                iteration + 1
            )));
        }
        monitor.step(
            Phase::Identify,
            iteration as u64 + 1,
            settings.iterations as u64,
        )?;
    }
    search.restore(model)?;
    model.zero_grad();
    model.set_eval()?;
    search
        .masks
        .iter()
        .map(|m| {
            Ok(Vec::<f64>::try_from(
                m.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?,
            )?)
        })
        .collect()
}

//! Mini-batch SGD with momentum over a [`ScanModel`]'s parameters.
//!
//! Written out rather than taken from `tch::nn::Sgd` because the purification step needs
//! to act on the parameters between optimizer steps (the AR shrink, holding pruned
//! weights at zero), and the schedule changes the rate every step.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use super::data::{batches_per_epoch, epoch_batches, random_shift, SampleSet};
use super::error::EngineError;
use super::model::{all_finite, ScanModel};
use super::patterns::PatternUnlearn;
use super::progress::{Monitor, Phase};
use super::unlearn::{Search, UnlearnPlan};

pub struct Sgd {
    momentum: f64,
    weight_decay: f64,
    velocity: Vec<Option<Tensor>>,
}

impl Sgd {
    pub fn new(param_count: usize, momentum: f64, weight_decay: f64) -> Self {
        Sgd {
            momentum,
            weight_decay,
            velocity: (0..param_count).map(|_| None).collect(),
        }
    }

    /// v ← μv + (g + wd·θ); θ ← θ − lr·v, for every parameter that has a gradient.
    pub fn step(&mut self, model: &mut ScanModel, lr: f64) -> Result<(), EngineError> {
        tch::no_grad(|| -> Result<(), EngineError> {
            for (param, velocity) in model.params.iter_mut().zip(self.velocity.iter_mut()) {
                let grad = param.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let mut update = grad.f_add(&param.tensor.f_mul_scalar(self.weight_decay)?)?;
                if self.momentum > 0.0 {
                    update = match velocity.take() {
                        Some(v) => v.f_mul_scalar(self.momentum)?.f_add(&update)?,
                        None => update,
                    };
                    *velocity = Some(update.shallow_clone());
                }
                let _ = param.tensor.f_sub_(&update.f_mul_scalar(lr)?)?;
            }
            Ok(())
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Schedule {
    Constant,
    /// Half-cosine from the peak rate down to zero over the whole run.
    Cosine,
    /// Linear ramp to the peak over the first `warmup` steps, then the half-cosine over
    /// the rest: the first steps at a high rate on a few hundred images are where a
    /// fine-tune loses most clean accuracy.
    WarmupCosine {
        warmup: usize,
    },
}

pub fn learning_rate(schedule: Schedule, peak: f64, step: usize, total: usize) -> f64 {
    match schedule {
        Schedule::Constant => peak,
        Schedule::Cosine => {
            peak * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos())
        }
        Schedule::WarmupCosine { warmup } if step < warmup => {
            peak * (step + 1) as f64 / warmup as f64
        }
        Schedule::WarmupCosine { warmup } => learning_rate(
            Schedule::Cosine,
            peak,
            step - warmup,
            total.saturating_sub(warmup),
        ),
    }
}

/// Knowledge distillation from a frozen copy of the model as it arrived. On clean inputs
/// even a backdoored model is a good teacher, and its soft outputs carry far more about
/// the clean task than a few hundred hard labels; the trigger pathway is never exercised
/// by clean inputs, so it is not what gets taught.
pub struct Distill<'a> {
    pub teacher: &'a ScanModel,
    /// Weight of the distillation term against the cross-entropy.
    pub weight: f64,
    pub temperature: f64,
}

pub struct FineTune<'a> {
    pub distill: Option<Distill<'a>>,
    pub epochs: usize,
    pub batch_size: usize,
    pub peak_lr: f64,
    pub schedule: Schedule,
    pub momentum: f64,
    pub weight_decay: f64,
    pub augment_shift: usize,
    /// Train against each epoch's universal perturbation as well (purification only).
    pub unlearn: Option<UnlearnPlan>,
    /// Train against random image-wide patterns as well (purification only).
    pub patterns: Option<PatternUnlearn>,
    pub phase: Phase,
}

/// How often one epoch's shortcut perturbation and patch reached the suspected target
/// (`None` for what did not run).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShortcutReach {
    pub perturbation: Option<f64>,
    pub patch: Option<f64>,
}

/// Trains `model` on `data` with cross-entropy. After every optimizer step `after_step`
/// runs with the step's learning rate (for the regularizer or pruning masks) and its
/// training loss; after every epoch `after_epoch` gets the epoch number and mean
/// training loss. Returns, per epoch, how often the shortcut perturbation and patch
/// reached their target.
pub fn fine_tune(
    model: &mut ScanModel,
    data: &SampleSet,
    plan: &FineTune,
    rng: &mut ChaCha8Rng,
    monitor: &mut Monitor,
    after_step: &mut dyn FnMut(&mut ScanModel, f64, f64) -> Result<(), EngineError>,
    after_epoch: &mut dyn FnMut(&mut ScanModel, usize, f64) -> Result<(), EngineError>,
) -> Result<Vec<ShortcutReach>, EngineError> {
    let steps_per_epoch = batches_per_epoch(data.len(), plan.batch_size);
    let total_steps = plan.epochs * steps_per_epoch;
    let mut optimizer = Sgd::new(model.params.len(), plan.momentum, plan.weight_decay);
    let mut step = 0;
    let mut shortcut_success = Vec::with_capacity(plan.epochs);
    // The patterns draw from their own stream, seeded without advancing `rng`: the
    // batches, shifts and searches stay exactly those of a run without them.
    let mut pattern_rng = ChaCha8Rng::seed_from_u64(rng.clone().gen());
    // The last epoch's δ and patch: each epoch's searches continue from them.
    let mut shortcut: Option<(Tensor, Option<(&Tensor, Tensor)>)> = None;
    for epoch in 0..plan.epochs {
        // Shortcut unlearning: this epoch's perturbation towards the suspected target;
        // how often it still reaches the target goes into the trace.
        shortcut = match &plan.unlearn {
            Some(u) => {
                let delta = u.unlearn.perturbation_towards(
                    model,
                    data,
                    u.target,
                    u.radius,
                    plan.batch_size,
                    rng,
                    match &shortcut {
                        Some((delta, _)) => Search::Warm(delta),
                        None => Search::Cold,
                    },
                )?;
                let probe = data.images.narrow(0, 0, data.len().min(256) as i64);
                let mut reach = ShortcutReach {
                    perturbation: Some(u.unlearn.success(model, &probe, &delta, u.target)?),
                    patch: None,
                };
                // Image inputs only: this epoch's pattern, kept with the support it is
                // stamped on.
                let patch = match &u.support {
                    Some(support) => {
                        let pattern = u.unlearn.patch_towards(
                            model,
                            data,
                            u.target,
                            support,
                            plan.batch_size,
                            rng,
                            match &shortcut {
                                Some((_, Some((_, pattern)))) => Search::Warm(pattern),
                                _ => Search::Cold,
                            },
                        )?;
                        reach.patch = Some(
                            u.unlearn
                                .stamp_success(model, &probe, support, &pattern, u.target)?,
                        );
                        Some((support, pattern))
                    }
                    None => None,
                };
                shortcut_success.push(reach);
                Some((delta, patch))
            }
            None => {
                shortcut_success.push(ShortcutReach::default());
                None
            }
        };
        model.set_train()?;
        let mut loss_sum = 0.0;
        let batches = epoch_batches(data.len(), plan.batch_size, rng);
        for indices in &batches {
            let batch = data.select(indices)?;
            let images = random_shift(&batch.images, plan.augment_shift, rng)?;
            let lr = learning_rate(plan.schedule, plan.peak_lr, step, total_steps);
            model.zero_grad();
            let logits = model.forward(&images)?;
            let mut loss = cross_entropy(&logits, &batch.labels)?;
            if let Some(d) = &plan.distill {
                loss =
                    loss.f_add(&distillation_loss(&logits, d, &images)?.f_mul_scalar(d.weight)?)?;
            }
            if let (Some(u), Some((delta, patch))) = (&plan.unlearn, &shortcut) {
                // In eval mode: perturbed batches must not leak into BatchNorm's running
                // statistics, which clean inputs alone should set.
                model.set_eval()?;
                let perturbed = model.forward(&u.unlearn.space.perturb(&images, delta)?)?;
                loss = loss.f_add(
                    &cross_entropy(&perturbed, &batch.labels)?.f_mul_scalar(u.unlearn.weight)?,
                )?;
                if let Some((support, pattern)) = patch {
                    let stamped = model.forward(&u.unlearn.stamp(&images, support, pattern)?)?;
                    loss = loss.f_add(
                        &cross_entropy(&stamped, &batch.labels)?.f_mul_scalar(u.unlearn.weight)?,
                    )?;
                }
                model.set_train()?;
            }
            loss.f_backward()?;
            if shortcut.is_some() {
                // Under a shortcut the loss and its gradient can be orders of magnitude
                // above the clean ones; an unclipped step would wreck the clean task.
                clip_gradient_norm(model, UNLEARN_MAX_GRAD_NORM)?;
            }
            if let Some(p) = &plan.patterns {
                // The pattern term gets its own backward pass and its own clip. Clipped
                // together with the clean gradient (at 2) it throttled the clean step on
                // every batch, and Trojan development models kept 1–3% more ASR; left
                // unclipped it cost the MNIST ones 5–10 points of accuracy.
                let clean_gradients = take_gradients(model);
                // Eval mode for the same reason as above.
                model.set_eval()?;
                let patterned = model.forward(&p.patterned(&images, &mut pattern_rng)?)?;
                let pattern_loss =
                    cross_entropy(&patterned, &batch.labels)?.f_mul_scalar(p.weight)?;
                model.set_train()?;
                pattern_loss.f_backward()?;
                clip_gradient_norm(model, PATTERN_MAX_GRAD_NORM)?;
                add_gradients(model, &clean_gradients)?;
                loss = loss.f_add(&pattern_loss.f_detach()?)?;
            }
            optimizer.step(model, lr)?;
            let step_loss = loss.f_double_value(&[])?;
            after_step(model, lr, step_loss)?;
            loss_sum += step_loss;
            step += 1;
            monitor.step(plan.phase, step as u64, total_steps as u64)?;
        }
        let mean_loss = loss_sum / batches.len().max(1) as f64;
        if !mean_loss.is_finite() {
            return Err(EngineError::Diverged(format!(
                "loss {mean_loss} in epoch {}",
                epoch + 1
            )));
        }
        // The loss is measured before each step, so the epoch's last step can overflow
        // the weights unseen; a model of NaNs must not be saved as purified.
        if !weights_are_finite(model)? {
            return Err(EngineError::Diverged(format!(
                "weights stopped being finite numbers in epoch {}",
                epoch + 1
            )));
        }
        after_epoch(model, epoch + 1, mean_loss)?;
    }
    model.set_eval()?;
    Ok(shortcut_success)
}

/// Batches of clean data the BatchNorm statistics are re-estimated from after training.
/// Running statistics move by 10% per batch (PyTorch's default momentum), so after 50
/// batches what they held before weighs 0.9⁵⁰ ≈ 0.5%.
pub const RECALIBRATION_BATCHES: usize = 50;

/// Re-estimates BatchNorm running statistics for the weights as they are now: forward
/// passes over clean batches in train mode, without gradients. During a high-rate
/// fine-tune on a few hundred images the running averages trail weights that change
/// every step, and an eval-mode forward normalises with statistics of weights that no
/// longer exist (on the small MNIST ResNets: 88% held-out accuracy with them, 95% after
/// this). A model without BatchNorm is left as it was.
pub fn recalibrate_batch_norm(
    model: &mut ScanModel,
    data: &SampleSet,
    batch_size: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(), EngineError> {
    model.set_train()?;
    let mut done = 0;
    while done < RECALIBRATION_BATCHES {
        let batches = epoch_batches(data.len(), batch_size, rng);
        if batches.is_empty() {
            break;
        }
        for indices in batches.iter().take(RECALIBRATION_BATCHES - done) {
            let batch = data.select(indices)?;
            let _ = tch::no_grad(|| model.forward(&batch.images))?;
            done += 1;
        }
    }
    model.set_eval()?;
    Ok(())
}

/// Largest global gradient norm of a purification step that trains against a shortcut.
const UNLEARN_MAX_GRAD_NORM: f64 = 2.0;

/// Largest gradient norm of the pattern term, clipped on its own: at 2 (the shortcut's
/// clip) the 24 backdoored MNIST development models lost 0.60 points of accuracy on
/// average, at 1 they lost 0.25.
const PATTERN_MAX_GRAD_NORM: f64 = 1.0;

/// The gradients as they are (copies; `None` where there is none), leaving the model's
/// zeroed in place for another backward pass.
fn take_gradients(model: &mut ScanModel) -> Vec<Option<Tensor>> {
    let taken = tch::no_grad(|| {
        model
            .params
            .iter()
            .map(|p| {
                let g = p.tensor.grad();
                g.defined().then(|| g.detach().copy())
            })
            .collect()
    });
    model.zero_grad();
    taken
}

/// Adds gradients taken by `take_gradients` onto the model's current ones.
fn add_gradients(model: &mut ScanModel, taken: &[Option<Tensor>]) -> Result<(), EngineError> {
    tch::no_grad(|| {
        for (param, taken) in model.params.iter_mut().zip(taken) {
            if let Some(taken) = taken {
                // Zeroing keeps a gradient tensor in place, so it is still there.
                let mut grad = param.tensor.grad();
                if !grad.defined() {
                    return Err(EngineError::Internal(
                        "a gradient vanished between backward passes".into(),
                    ));
                }
                let _ = grad.f_add_(taken)?;
            }
        }
        Ok(())
    })
}

fn weights_are_finite(model: &ScanModel) -> Result<bool, EngineError> {
    tch::no_grad(|| {
        for p in &model.params {
            if !all_finite(&p.tensor)? {
                return Ok(false);
            }
        }
        Ok(true)
    })
}

/// Scales all gradients down so their global L2 norm is at most `max_norm`.
fn clip_gradient_norm(model: &mut ScanModel, max_norm: f64) -> Result<(), EngineError> {
    tch::no_grad(|| -> Result<(), EngineError> {
        let mut total = 0.0;
        for p in &model.params {
            let g = p.tensor.grad();
            if g.defined() {
                total += g.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        let norm = total.sqrt();
        if norm > max_norm {
            for p in &mut model.params {
                let mut g = p.tensor.grad();
                if g.defined() {
                    let _ = g.f_mul_scalar_(max_norm / norm)?;
                }
            }
        }
        Ok(())
    })
}

/// T²·KL(teacher ‖ student) at temperature T, averaged over the batch.
fn distillation_loss(
    student_logits: &Tensor,
    d: &Distill,
    images: &Tensor,
) -> Result<Tensor, EngineError> {
    let t = d.temperature;
    let teacher_logits = tch::no_grad(|| d.teacher.forward(images))?;
    let teacher_log_p = teacher_logits
        .f_div_scalar(t)?
        .f_log_softmax(-1, Kind::Float)?;
    let student_log_p = student_logits
        .f_div_scalar(t)?
        .f_log_softmax(-1, Kind::Float)?;
    let kl = teacher_log_p
        .f_exp()?
        .f_mul(&teacher_log_p.f_sub(&student_log_p)?)?
        .f_sum_dim_intlist(-1, false, Kind::Float)?;
    Ok(kl.f_mean(Kind::Float)?.f_mul_scalar(t * t)?)
}

/// Mean cross-entropy of `logits` against integer `labels`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor, tch::TchError> {
    logits.f_cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Mean, -100, 0.0)
}

/// Share of `data` whose arg-max prediction equals its label, in eval mode.
pub fn accuracy(
    model: &mut ScanModel,
    data: &SampleSet,
    batch_size: usize,
) -> Result<f64, EngineError> {
    let predictions = predict(model, data, batch_size)?;
    let correct = predictions
        .f_eq_tensor(&data.labels)?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    Ok(correct as f64 / data.len().max(1) as f64)
}

/// Arg-max class of every sample, in eval mode, without gradients.
pub fn predict(
    model: &mut ScanModel,
    data: &SampleSet,
    batch_size: usize,
) -> Result<Tensor, EngineError> {
    predict_fed(model, data, batch_size, |images| Ok(images.shallow_clone()))
}

/// [`predict`] with every batch passed through `feed` on its way in (a perturbation,
/// a warp).
pub fn predict_fed(
    model: &mut ScanModel,
    data: &SampleSet,
    batch_size: usize,
    feed: impl Fn(&Tensor) -> Result<Tensor, EngineError>,
) -> Result<Tensor, EngineError> {
    model.set_eval()?;
    tch::no_grad(|| {
        let mut parts = Vec::new();
        for (images, _) in data.chunks(batch_size) {
            parts.push(model.forward(&feed(&images)?)?.f_argmax(1, false)?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_starts_at_peak_and_ends_near_zero() {
        assert_eq!(learning_rate(Schedule::Cosine, 0.1, 0, 100), 0.1);
        assert!((learning_rate(Schedule::Cosine, 0.1, 50, 100) - 0.05).abs() < 1e-12);
        assert!(learning_rate(Schedule::Cosine, 0.1, 99, 100) < 1e-3);
        assert_eq!(learning_rate(Schedule::Constant, 0.1, 99, 100), 0.1);
        let warm = Schedule::WarmupCosine { warmup: 10 };
        assert!((learning_rate(warm, 0.1, 0, 100) - 0.01).abs() < 1e-12);
        assert_eq!(learning_rate(warm, 0.1, 10, 100), 0.1);
        assert!(learning_rate(warm, 0.1, 99, 100) < 1e-3);
    }
}

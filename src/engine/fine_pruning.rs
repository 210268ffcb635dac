//! Two baselines that fine-tune: plain fine-tuning (FT) and Fine-Pruning (FP, Liu et al.,
//! "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks", RAID
//! 2018). FP ranks the last convolutional layer's channels by mean clean activation,
//! prunes them in increasing order while the held-out clean accuracy stays within
//! BackdoorBench's `acc_ratio` of the unpruned model's, then fine-tunes with the pruned
//! channels held at zero. Both fine-tune like BackdoorBench: plain SGD on the clean
//! training split, no distillation, no augmentation, no penalty.

use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use super::activation::mean_activations;
use super::config::Method;
use super::error::EngineError;
use super::identify::{zero_neurons, Selection, Trial};
use super::model::ScanModel;
use super::progress::{Monitor, Phase};
use super::report::EpochTrace;
use super::scan::{hold_at_zero, neuron_masks, no_masks, Context, Defended, Timer};
use super::training::{accuracy, fine_tune, FineTune, Schedule};

/// Fine-tunes on the clean training split per `config.ft`, holding `pruned` at zero and
/// tracing every epoch.
fn plain_fine_tune(
    model: &mut ScanModel,
    ctx: &Context,
    pruned: &[Option<Tensor>],
    rng: &mut ChaCha8Rng,
    monitor: &mut Monitor,
) -> Result<Vec<EpochTrace>, EngineError> {
    let ft = &ctx.config.ft;
    let plan = FineTune {
        distill: None,
        epochs: ft.epochs,
        batch_size: ctx.config.batch_size,
        peak_lr: ft.lr,
        schedule: Schedule::Cosine,
        momentum: ft.momentum,
        weight_decay: ft.weight_decay,
        augment_shift: 0,
        unlearn: None,
        patterns: None,
        phase: Phase::Purify,
    };
    let mut trace = Vec::new();
    fine_tune(
        model,
        ctx.train,
        &plan,
        rng,
        monitor,
        &mut |model, _lr, _loss| hold_at_zero(model, pruned),
        &mut |model, epoch, loss| {
            trace.push(ctx.tracer.record(model, "finetune", epoch, loss, None)?);
            Ok(())
        },
    )?;
    Ok(trace)
}

/// `ft`: fine-tuning only; nothing is scored or flagged.
pub(super) fn fine_tuning_only(
    model: &mut ScanModel,
    ctx: &Context,
    rng: &mut ChaCha8Rng,
    monitor: &mut Monitor,
    timer: &mut Timer,
) -> Result<Defended, EngineError> {
    let trace = plain_fine_tune(model, ctx, &no_masks(model), rng, monitor)?;
    timer.lap(Phase::Purify);
    Ok(Defended {
        scores: model.layers.iter().map(|l| vec![0.0; l.width]).collect(),
        shortcut_ranking: None,
        flags: model.layers.iter().map(|l| vec![false; l.width]).collect(),
        selection: ctx.no_grid_selection(0.0),
        suspect_masks: no_masks(model),
        pruned_masks: no_masks(model),
        pruned_neurons: Some(model.layers.iter().map(|_| Vec::new()).collect()),
        shortcut_search: None,
        purify_peak_lr: None,
        pattern_probe: None,
        suspects_removed: None,
        warnings: Vec::new(),
        trace,
    })
}

/// The layer Fine-Pruning prunes: among hidden layers for which `reported` holds, the last
/// with a convolutional (≥3-D) weight, or the last one when none is convolutional.
pub fn last_conv_layer(model: &ScanModel, reported: impl Fn(usize) -> bool) -> Option<usize> {
    let hidden =
        || (0..model.layers.len()).filter(|&i| !model.layers[i].is_classifier && reported(i));
    hidden()
        .rfind(|&i| model.params[model.layers[i].weight].tensor.dim() >= 3)
        .or_else(|| hidden().next_back())
}

/// Channels of `layer` pruned by FP's rule: in increasing order of activation, grow the
/// pruned set by `step` while |acc − acc₀| / acc₀ < `acc_ratio` on the held-out split
/// (BackdoorBench's `fp.py`), never pruning the whole layer. Returns the flags of the
/// last set that passed and every trial.
pub(super) fn fp_prune_rule(
    model: &mut ScanModel,
    layer: usize,
    activation: &[f64],
    ctx: &Context,
    monitor: &mut Monitor,
) -> Result<(Vec<Vec<bool>>, Vec<Trial>), EngineError> {
    let width = model.layers[layer].width;
    let mut order: Vec<usize> = (0..width).collect();
    order.sort_by(|&a, &b| activation[a].total_cmp(&activation[b]).then(a.cmp(&b)));
    let widths: Vec<usize> = model.layers.iter().map(|l| l.width).collect();
    let flags_at = |n: usize| -> Vec<Vec<bool>> {
        widths
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let mut flags = vec![false; w];
                if i == layer {
                    for &c in &order[..n] {
                        flags[c] = true;
                    }
                }
                flags
            })
            .collect()
    };
    let baseline = ctx.held_out_before;
    let step = ctx.config.fp.channels_per_step;
    let snapshot = model.snapshot();
    let mut trials = Vec::new();
    let mut kept = 0;
    let mut n = step;
    while n < width {
        model.restore(&snapshot)?;
        zero_neurons(model, &flags_at(n))?;
        let acc = accuracy(model, ctx.held_out, ctx.config.batch_size)?;
        trials.push(Trial {
            fraction: n as f64 / width as f64,
            held_out_acc: acc,
        });
        monitor.step(Phase::Identify, n as u64, width as u64)?;
        let relative_drop = if baseline > 0.0 {
            (acc - baseline).abs() / baseline
        } else {
            0.0
        };
        if relative_drop >= ctx.config.fp.acc_ratio {
            break;
        }
        kept = n;
        n += step;
    }
    model.restore(&snapshot)?;
    Ok((flags_at(kept), trials))
}

/// `fp`: prune the last conv layer by clean activation, then fine-tune like `ft`.
pub(super) fn fine_pruning(
    model: &mut ScanModel,
    ctx: &Context,
    rng: &mut ChaCha8Rng,
    monitor: &mut Monitor,
    timer: &mut Timer,
) -> Result<Defended, EngineError> {
    let batch = ctx.config.batch_size;
    let means = mean_activations(model, ctx.train, batch, Method::Fp.as_str(), monitor)?;
    timer.lap(Phase::Salience);
    // The last conv layer whose output the model reports: a residual block reports its
    // output (after the add) under its last conv, and the shortcut conv registered after
    // that has no output of its own.
    let layer = last_conv_layer(model, |i| means[i].is_some()).ok_or_else(|| {
        EngineError::InvalidInput(
            "model: method `fp` needs `activations` to report a hidden layer to prune".into(),
        )
    })?;
    let activations: Vec<Vec<f64>> = means
        .into_iter()
        .zip(&model.layers)
        .map(|(mean, l)| mean.unwrap_or_else(|| vec![0.0; l.width]))
        .collect();
    let (flags, trials) = fp_prune_rule(model, layer, &activations[layer], ctx, monitor)?;
    zero_neurons(model, &flags)?;
    let pruned = neuron_masks(model, &flags)?;
    let pruned_count = flags[layer].iter().filter(|&&f| f).count();
    timer.lap(Phase::Identify);

    let trace = plain_fine_tune(model, ctx, &pruned, rng, monitor)?;
    timer.lap(Phase::Purify);
    let pruned_neurons = flags
        .iter()
        .map(|f| (0..f.len()).filter(|&n| f[n]).collect())
        .collect();
    Ok(Defended {
        scores: activations,
        shortcut_ranking: None,
        selection: Selection {
            neuron_fraction: pruned_count as f64 / model.layers[layer].width as f64,
            neuron_trials: trials,
            ..ctx.no_grid_selection(0.0)
        },
        flags,
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
        trace,
    })
}

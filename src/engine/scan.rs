//! One scan, start to finish: validate inputs, score neurons, flag suspects, purify
//! them with the chosen regularizer, prune what it drove to zero, recover accuracy,
//! measure, and write the purified TorchScript archive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::bundle::{load_bundle, Bundle};
use super::config::{parse_device, ScanConfig};
use super::data::{split_indices, SampleSet};
use super::error::{bundle_error, EngineError};
use super::identify::{identify, Budget};
use super::metrics::{defense_effectiveness_rating, measure, AccuracySource, PoisonSet};
use super::model::ScanModel;
use super::progress::{Monitor, Phase};
use super::regularizer::{apply, tensor_scale};
use super::report::*;
use super::salience::benign_salience;
use super::training::{accuracy, fine_tune, Distill, FineTune, Schedule};

/// The files of one scan.
#[derive(Debug, Clone)]
pub struct ScanInputs {
    pub model: PathBuf,
    pub clean: PathBuf,
    pub test: Option<PathBuf>,
    pub poison: Option<PathBuf>,
    pub target_label: Option<i64>,
    /// Where the purified TorchScript archive is written.
    pub out: PathBuf,
}

/// A held-out accuracy loss above this after purification is called out in the report.
const HELD_OUT_DROP_WARNING: f64 = 0.05;

/// The libtorch version this binary was built against (read by build.rs).
pub const LIBTORCH_VERSION: &str = env!("BDSCAN_LIBTORCH_VERSION");

struct Timer {
    timings: BTreeMap<String, u64>,
    started: Instant,
}

impl Timer {
    fn new() -> Self {
        Timer {
            timings: BTreeMap::new(),
            started: Instant::now(),
        }
    }

    /// Books the time since the last lap under `phase`.
    fn lap(&mut self, phase: Phase) {
        let now = Instant::now();
        *self.timings.entry(phase.as_str().to_string()).or_default() +=
            (now - self.started).as_millis() as u64;
        self.started = now;
    }
}

pub fn run_scan(
    inputs: &ScanInputs,
    config: &ScanConfig,
    monitor: &mut Monitor,
) -> Result<ScanReport, EngineError> {
    config.validate()?;
    let device = open_device(config)?;
    tch::manual_seed(config.seed as i64);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut timer = Timer::new();
    let batch = config.batch_size;

    // Load and validate everything before any long work starts.
    monitor.step(Phase::Load, 0, 1)?;
    let model_digest = digest_file(&inputs.model, "model")?;
    let (clean_bundle, clean_digest) = read_bundle(&inputs.clean, "clean")?;
    if clean_bundle.len() < 4 {
        return Err(EngineError::InvalidInput(format!(
            "clean bundle: holds {} samples; at least 4 are needed to train on and hold some out",
            clean_bundle.len()
        )));
    }
    let test = inputs
        .test
        .as_deref()
        .map(|p| read_bundle(p, "test"))
        .transpose()?;
    let poison = inputs
        .poison
        .as_deref()
        .map(|p| read_bundle(p, "poison"))
        .transpose()?;
    let poison_has_targets = poison.as_ref().is_some_and(|(b, _)| b.targets.is_some());
    if poison.is_some() != (inputs.target_label.is_some() || poison_has_targets) {
        return Err(EngineError::InvalidInput(
            "a poison bundle and a target label must be given together (unless the bundle holds per-sample `targets`)".into(),
        ));
    }
    let clean = SampleSet::from_bundle(&clean_bundle, device)?;
    let mut model = ScanModel::load(&inputs.model, device, &clean.images.narrow(0, 0, 2))?;
    let num_classes = model.num_classes;
    check_against_model(&model, "clean", &clean_bundle, &clean)?;
    let test_set = match &test {
        Some((bundle, _)) => {
            let set = SampleSet::from_bundle(bundle, device)?;
            check_against_model(&model, "test", bundle, &set)?;
            Some(set)
        }
        None => None,
    };
    let poison_set = match (&poison, inputs.target_label) {
        (Some((bundle, _)), _) if bundle.targets.is_some() => {
            let set = SampleSet::from_bundle(bundle, device)?;
            check_against_model(&model, "poison", bundle, &set)?;
            Some(PoisonSet::with_targets(
                set,
                bundle.targets.as_deref().unwrap_or(&[]),
            )?)
        }
        (Some((bundle, _)), Some(target)) => {
            if !(0..num_classes).contains(&target) {
                return Err(EngineError::InvalidInput(format!(
                    "target label {target} is not one of the model's classes 0..{num_classes}"
                )));
            }
            let set = SampleSet::from_bundle(bundle, device)?;
            check_against_model(&model, "poison", bundle, &set)?;
            Some(PoisonSet::new(set, target)?)
        }
        _ => None,
    };
    let (train_idx, held_idx) = split_indices(clean.len(), config.held_out_fraction, &mut rng);
    let train = clean.select(&train_idx)?;
    let held_out = clean.select(&held_idx)?;
    let (eval_set, eval_source) = match &test_set {
        Some(t) => (t, AccuracySource::Test),
        None => (&held_out, AccuracySource::HeldOut),
    };
    monitor.step(Phase::Load, 1, 1)?;
    timer.lap(Phase::Load);

    let before = measure(
        &mut model,
        eval_set,
        eval_source,
        poison_set.as_ref(),
        batch,
    )?;
    let norms_before: Vec<Vec<f64>> = model
        .layers
        .iter()
        .map(|l| model.neuron_norms(l))
        .collect::<Result<_, _>>()?;
    timer.lap(Phase::Evaluate);

    let salience = benign_salience(&mut model, &train, batch, config.aggregation, monitor)?;
    timer.lap(Phase::Salience);

    let budget = Budget {
        neuron_drop: config.neuron_drop_budget,
        weight_drop: config.weight_drop_budget,
        fraction_step: config.fraction_step,
        max_fraction: config.max_fraction,
        batch_size: batch,
    };
    let suspects = identify(&mut model, &salience, &held_out, &budget, monitor)?;
    let masks = suspects.parameter_masks(&model)?;
    timer.lap(Phase::Identify);

    // Purify: fine-tune on the clean split while the regularizer pulls suspects to zero.
    let scales: Vec<f64> = model
        .params
        .iter()
        .map(|p| tensor_scale(&p.tensor))
        .collect::<Result<_, _>>()?;
    let suspect_norm_at_start = masked_norm(&model, &masks)?;
    let tracer = Tracer {
        held_out: &held_out,
        poison: poison_set.as_ref(),
        masks: &masks,
        suspect_norm_at_start,
        batch,
    };
    let mut trace = Vec::new();
    // The teacher is a second, frozen load of the archive as it arrived.
    let teacher = if config.distill_weight > 0.0 {
        let mut teacher = ScanModel::load(&inputs.model, device, &clean.images.narrow(0, 0, 2))?;
        teacher.set_eval()?;
        Some(teacher)
    } else {
        None
    };
    let distill = || {
        teacher.as_ref().map(|teacher| Distill {
            teacher,
            weight: config.distill_weight,
            temperature: config.distill_temperature,
        })
    };
    let purify_plan = FineTune {
        distill: distill(),
        epochs: config.purify_epochs,
        batch_size: batch,
        peak_lr: config.purify_lr,
        schedule: Schedule::Cosine,
        momentum: config.momentum,
        weight_decay: config.weight_decay,
        augment_shift: config.augment_shift,
        phase: Phase::Purify,
    };
    fine_tune(
        &mut model,
        &train,
        &purify_plan,
        &mut rng,
        monitor,
        &mut |model, lr| {
            for ((param, mask), &scale) in model.params.iter_mut().zip(&masks).zip(&scales) {
                if let Some(mask) = mask {
                    apply(
                        config.regularizer,
                        &mut param.tensor,
                        mask,
                        scale,
                        config.reg_strength,
                        lr,
                    )?;
                }
            }
            Ok(())
        },
        &mut |model, epoch, loss| {
            trace.push(tracer.record(model, "purify", epoch, loss)?);
            Ok(())
        },
    )?;
    timer.lap(Phase::Purify);

    // Prune suspect entries the regularizer drove to about zero, then recover accuracy
    // with them held at zero so the backdoor cannot grow back through them.
    let pruned = prune_small(&mut model, &masks, &scales, config.prune_threshold)?;
    let recover_plan = FineTune {
        distill: distill(),
        epochs: config.recovery_epochs,
        batch_size: batch,
        peak_lr: config.recovery_lr,
        schedule: Schedule::Constant,
        momentum: config.momentum,
        weight_decay: 0.0,
        augment_shift: 0,
        phase: Phase::Recover,
    };
    fine_tune(
        &mut model,
        &train,
        &recover_plan,
        &mut rng,
        monitor,
        &mut |model, _lr| hold_at_zero(model, &pruned),
        &mut |model, epoch, loss| {
            trace.push(tracer.record(model, "recover", epoch, loss)?);
            Ok(())
        },
    )?;
    timer.lap(Phase::Recover);

    let after = measure(
        &mut model,
        eval_set,
        eval_source,
        poison_set.as_ref(),
        batch,
    )?;
    let der = defense_effectiveness_rating(&before, &after);
    let layers = layer_reports(
        &model,
        &salience.per_neuron,
        &norms_before,
        &suspects.neuron_flags,
        &masks,
        &pruned,
    )?;
    timer.lap(Phase::Evaluate);

    monitor.step(Phase::Save, 0, 1)?;
    model.save(&inputs.out)?;
    let file =
        digest_file(&inputs.out, "artifact").map_err(|e| EngineError::Internal(e.to_string()))?;
    let artifact = ArtifactDigest {
        sha256: file.sha256,
        bytes: file.bytes,
        parameters_sha256: model.parameters_sha256()?,
    };
    monitor.step(Phase::Save, 1, 1)?;
    timer.lap(Phase::Save);

    let mut warnings = Vec::new();
    let held_out_after = accuracy(&mut model, &held_out, batch)?;
    let held_out_before = suspects.selection.held_out_acc;
    if held_out_before - held_out_after > HELD_OUT_DROP_WARNING {
        warnings.push(format!(
            "held-out clean accuracy fell from {:.2}% to {:.2}%: the purified model may be unusable; \
             more clean samples or more purification epochs usually help",
            held_out_before * 100.0,
            held_out_after * 100.0
        ));
    }
    if suspects.selection.neuron_fraction == 0.0 && suspects.selection.weight_fraction == 0.0 {
        warnings.push(
            "no suspects: even the smallest candidate removal exceeded the accuracy budget".into(),
        );
    }

    let count = |f: fn(&LayerReport) -> usize| layers.iter().map(f).sum::<usize>();
    Ok(ScanReport {
        schema_version: SCHEMA_VERSION,
        tool: ToolInfo {
            bdscan_version: env!("CARGO_PKG_VERSION").into(),
            libtorch_version: LIBTORCH_VERSION.into(),
        },
        inputs: Inputs {
            model: model_digest,
            clean: clean_digest,
            test: test.map(|(_, d)| d),
            poison: poison.map(|(_, d)| d),
            target_label: inputs.target_label,
        },
        config: config.clone(),
        seed: config.seed,
        model: ModelSummary {
            num_classes,
            parameter_count: model.parameter_count(),
            layer_count: model.layers.len(),
            neuron_count: model.layers.iter().map(|l| l.width).sum(),
            classifier_layer: model
                .layers
                .iter()
                .find(|l| l.is_classifier)
                .map(|l| l.name.clone()),
        },
        split: SplitSummary {
            train: train.len(),
            held_out: held_out.len(),
        },
        selection: suspects.selection,
        flagged_count: count(|l| l.flagged.len()),
        pruned_neuron_count: count(|l| l.pruned.len()),
        suspect_weight_count: layers.iter().map(|l| l.suspect_weights).sum(),
        pruned_weight_count: layers.iter().map(|l| l.pruned_weights).sum(),
        layers,
        metrics: MetricsPair { before, after },
        der,
        trace,
        artifact,
        warnings,
        timings_ms: timer.timings,
    })
}

fn open_device(config: &ScanConfig) -> Result<Device, EngineError> {
    let device = parse_device(&config.device)?;
    if let Device::Cuda(index) = device {
        let available = tch::Cuda::device_count();
        if index as i64 >= available {
            return Err(EngineError::InvalidInput(format!(
                "device cuda:{index} requested but this machine has {available} CUDA device(s)"
            )));
        }
    }
    if let Some(threads) = config.threads {
        tch::set_num_threads(threads as i32);
    }
    Ok(device)
}

fn digest_file(path: &Path, role: &str) -> Result<FileDigest, EngineError> {
    let bytes = std::fs::read(path).map_err(|e| {
        EngineError::InvalidInput(format!("{role}: cannot read {}: {e}", path.display()))
    })?;
    Ok(FileDigest {
        sha256: hex::encode(Sha256::digest(&bytes)),
        bytes: bytes.len() as u64,
    })
}

fn read_bundle(path: &Path, role: &str) -> Result<(Bundle, BundleDigest), EngineError> {
    let file = digest_file(path, &format!("{role} bundle"))?;
    let bundle = load_bundle(path).map_err(|e| bundle_error(role, e))?;
    let [_, c, h, w] = bundle.shape;
    let digest = BundleDigest {
        sha256: file.sha256,
        bytes: file.bytes,
        samples: bundle.len(),
        image_shape: [c, h, w],
        dtype: bundle.dtype().to_string(),
    };
    Ok((bundle, digest))
}

/// Labels must name the model's classes and the model must accept the images.
fn check_against_model(
    model: &ScanModel,
    role: &str,
    bundle: &Bundle,
    set: &SampleSet,
) -> Result<(), EngineError> {
    bundle
        .check_labels_below(model.num_classes)
        .map_err(|e| bundle_error(role, e))?;
    let probe = set.images.narrow(0, 0, set.len().min(2) as i64);
    let classes = model
        .probe(&probe)
        .map_err(|e| EngineError::InvalidInput(format!("{role} bundle: {e}")))?;
    if classes != model.num_classes {
        return Err(EngineError::InvalidInput(format!(
            "{role} bundle: the model gives {classes} logits for these images but {} for the clean bundle",
            model.num_classes
        )));
    }
    Ok(())
}

fn masked_norm(model: &ScanModel, masks: &[Option<Tensor>]) -> Result<f64, EngineError> {
    tch::no_grad(|| {
        let mut total = 0.0;
        for (param, mask) in model.params.iter().zip(masks) {
            if let Some(mask) = mask {
                total += param
                    .tensor
                    .f_mul(mask)?
                    .f_square()?
                    .f_sum(Kind::Double)?
                    .f_double_value(&[])?;
            }
        }
        Ok(total.sqrt())
    })
}

/// What a per-epoch trace entry is measured on.
struct Tracer<'a> {
    held_out: &'a SampleSet,
    poison: Option<&'a PoisonSet>,
    masks: &'a [Option<Tensor>],
    suspect_norm_at_start: f64,
    batch: usize,
}

impl Tracer<'_> {
    fn record(
        &self,
        model: &mut ScanModel,
        phase: &str,
        epoch: usize,
        train_loss: f64,
    ) -> Result<EpochTrace, EngineError> {
        let held_out_acc = accuracy(model, self.held_out, self.batch)?;
        let asr = self
            .poison
            .map(|p| p.measure(model, self.batch).map(|(asr, _)| asr))
            .transpose()?;
        let suspect_norm_ratio = if self.suspect_norm_at_start > 0.0 {
            masked_norm(model, self.masks)? / self.suspect_norm_at_start
        } else {
            0.0
        };
        Ok(EpochTrace {
            phase: phase.into(),
            epoch,
            train_loss,
            held_out_acc,
            suspect_norm_ratio,
            asr,
        })
    }
}

/// Zeroes suspect entries smaller than `threshold` × their tensor's starting scale and
/// returns, per parameter, the 0/1 mask of what was pruned.
fn prune_small(
    model: &mut ScanModel,
    masks: &[Option<Tensor>],
    scales: &[f64],
    threshold: f64,
) -> Result<Vec<Option<Tensor>>, EngineError> {
    tch::no_grad(|| {
        let mut pruned = Vec::with_capacity(masks.len());
        for ((param, mask), &scale) in model.params.iter_mut().zip(masks).zip(scales) {
            let Some(mask) = mask else {
                pruned.push(None);
                continue;
            };
            let small = param
                .tensor
                .f_abs()?
                .f_lt(threshold * scale)?
                .f_to_kind(param.tensor.kind())?;
            let cut = small.f_mul(mask)?;
            let _ = param.tensor.f_mul_(&cut.f_neg()?.f_add_scalar(1.0)?)?;
            pruned.push(Some(cut));
        }
        Ok(pruned)
    })
}

fn hold_at_zero(model: &mut ScanModel, pruned: &[Option<Tensor>]) -> Result<(), EngineError> {
    tch::no_grad(|| {
        for (param, cut) in model.params.iter_mut().zip(pruned) {
            if let Some(cut) = cut {
                let _ = param.tensor.f_mul_(&cut.f_neg()?.f_add_scalar(1.0)?)?;
            }
        }
        Ok(())
    })
}

fn count_ones(mask: &Option<Tensor>) -> Result<i64, EngineError> {
    match mask {
        Some(m) => Ok(m.f_sum(Kind::Double)?.f_double_value(&[])?.round() as i64),
        None => Ok(0),
    }
}

fn layer_reports(
    model: &ScanModel,
    salience: &[Vec<f64>],
    norms_before: &[Vec<f64>],
    flags: &[Vec<bool>],
    masks: &[Option<Tensor>],
    pruned: &[Option<Tensor>],
) -> Result<Vec<LayerReport>, EngineError> {
    let mut reports = Vec::with_capacity(model.layers.len());
    for (i, layer) in model.layers.iter().enumerate() {
        let norm_after = model.neuron_norms(layer)?;
        let mean = salience[i].iter().sum::<f64>() / layer.width.max(1) as f64;
        let flagged: Vec<usize> = (0..layer.width).filter(|&n| flags[i][n]).collect();
        reports.push(LayerReport {
            name: layer.name.clone(),
            weight_shape: model.params[layer.weight].tensor.size(),
            grouped_parameters: layer
                .members
                .iter()
                .map(|&m| model.params[m].name.clone())
                .collect(),
            is_classifier: layer.is_classifier,
            width: layer.width,
            benign_salience: salience[i].clone(),
            normalized_salience: salience[i]
                .iter()
                .map(|s| if mean > 0.0 { s / mean } else { 0.0 })
                .collect(),
            norm_before: norms_before[i].clone(),
            pruned: flagged
                .iter()
                .copied()
                .filter(|&n| norm_after[n] == 0.0)
                .collect(),
            norm_after,
            flagged,
            suspect_weights: count_ones(&masks[layer.weight])?,
            pruned_weights: count_ones(&pruned[layer.weight])?,
        });
    }
    Ok(reports)
}

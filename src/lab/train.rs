//! Training a TorchScript architecture on a bundle (clean or poisoned).

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Device;

use crate::engine::bundle::Bundle;
use crate::engine::data::SampleSet;
use crate::engine::model::ScanModel;
use crate::engine::progress::{Monitor, Phase};
use crate::engine::training::{fine_tune, FineTune, Schedule};
use crate::engine::EngineError;

#[derive(Debug, Clone)]
pub struct TrainPlan {
    pub epochs: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for TrainPlan {
    fn default() -> Self {
        TrainPlan {
            epochs: 4,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 5e-4,
            batch_size: 64,
            seed: 0,
        }
    }
}

/// Trains the architecture in `arch` on `data` and writes the trained archive to `out`.
pub fn train_model(
    arch: &Path,
    data: &Bundle,
    plan: &TrainPlan,
    out: &Path,
    device: Device,
    monitor: &mut Monitor,
) -> Result<(), EngineError> {
    tch::manual_seed(plan.seed as i64);
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
    let set = SampleSet::from_bundle(data, device)?;
    let mut model = ScanModel::load(arch, device, &set.images.narrow(0, 0, 2))?;
    data.check_labels_below(model.num_classes)
        .map_err(|e| EngineError::InvalidInput(format!("training data: {e}")))?;
    let schedule = FineTune {
        distill: None,
        epochs: plan.epochs,
        batch_size: plan.batch_size,
        peak_lr: plan.lr,
        schedule: Schedule::Constant,
        momentum: plan.momentum,
        weight_decay: plan.weight_decay,
        augment_shift: 0,
        unlearn: None,
        patterns: None,
        phase: Phase::Train,
    };
    fine_tune(
        &mut model,
        &set,
        &schedule,
        &mut rng,
        monitor,
        &mut |_, _, _| Ok(()),
        &mut |_, _, _| Ok(()),
    )?;
    model.save(out)
}

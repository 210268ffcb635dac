//! One lab run, as `bdscan lab` does it: pick a dataset and an architecture, poison the
//! training split with an attack, train reproducibly, measure clean accuracy and ASR, and
//! write the model, the defender's bundles and `meta.json`.
//!
//! Splits. MNIST: the committed fixture's samples 0..8000 train, the next 400 are the
//! defender's clean bundle (5% of the training data), the last 1,600 the clean test set (as
//! `bdscan demo`). Shapes: 8,400 generated images from one fixed seed (8,000 train, 400
//! clean) and 2,000 test images from another. The poison test set is the test set's
//! samples whose label differs from their attack target, triggered, true labels kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::Device;

use super::attacks::{
    BadNets, Blended, Dynamic, Poisoning, Sig, TargetMode, Trigger, Trojan, WaNet,
};
use super::demo::{mnist_fixture, CLEAN_SAMPLES, TRAIN_SAMPLES};
use super::shapes;
use super::train::{train_model, TrainPlan};
use crate::engine::bundle::Bundle;
use crate::engine::config::MAX_EPOCHS;
use crate::engine::data::SampleSet;
use crate::engine::metrics::PoisonSet;
use crate::engine::model::ScanModel;
use crate::engine::progress::Monitor;
use crate::engine::training::accuracy;
use crate::engine::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dataset {
    Mnist,
    Shapes,
}

impl Dataset {
    /// Height and width of its (square) images.
    pub fn image_side(self) -> usize {
        match self {
            Dataset::Mnist => 28,
            Dataset::Shapes => shapes::SIDE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// VGG-style CNN with BatchNorm.
    VggBn,
    /// ResNet-style, BatchNorm.
    Resnet,
    /// VGG-style CNN without BatchNorm.
    Cnn,
}

/// The attack and its trigger parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "name", content = "parameters")]
pub enum Attack {
    None,
    Badnets(BadNets),
    Blended(Blended),
    Trojan(Trojan),
    Sig(Sig),
    Wanet(WaNet),
    Dynamic(Dynamic),
}

impl Attack {
    pub fn trigger(&self) -> Option<&dyn Trigger> {
        match self {
            Attack::None => None,
            Attack::Badnets(t) => Some(t),
            Attack::Blended(t) => Some(t),
            Attack::Trojan(t) => Some(t),
            Attack::Sig(t) => Some(t),
            Attack::Wanet(t) => Some(t),
            Attack::Dynamic(t) => Some(t),
        }
    }

    pub fn is_clean_label(&self) -> bool {
        matches!(self, Attack::Sig(_))
    }

    /// Share poisoned unless the user says otherwise: 10% of the training set; SIG, a
    /// clean-label attack, triggers 80% of the target class.
    pub fn default_poison_rate(&self) -> f64 {
        match self {
            Attack::Sig(_) => 0.8,
            _ => 0.1,
        }
    }

    /// WaNet's noise mode: twice as many cross samples as poisoned ones on MNIST (the
    /// paper's setting); none on shapes, where the paper's warp is not learnt (see
    /// [`wanet_default_strength`]).
    pub fn default_cross_ratio(&self, dataset: Dataset) -> f64 {
        match (self, dataset) {
            (Attack::Wanet(_), Dataset::Mnist) => 2.0,
            _ => 0.0,
        }
    }
}

/// WaNet's warp strength per dataset. MNIST: the paper's s = 0.5 (ASR ≈ 99.8% with noise
/// mode). Shapes, whose images already vary in position, size and rotation, so that a
/// smooth sub-pixel warp looks like natural variation: the VGG-style CNN reaches 10% ASR
/// with s = 0.5 and noise mode, 23% with s = 2, 27% with s = 4, 14% with s = 0.5 without
/// noise mode and 92% with s = 4 without noise mode, hence s = 4 and no cross samples.
pub fn wanet_default_strength(dataset: Dataset) -> f32 {
    match dataset {
        Dataset::Mnist => WaNet::default().strength,
        Dataset::Shapes => 4.0,
    }
}

/// Everything that defines one lab run.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub dataset: Dataset,
    pub arch: Arch,
    pub attack: Attack,
    pub target: i64,
    pub all_to_all: bool,
    pub poison_rate: f64,
    pub cross_ratio: f64,
    pub plan: TrainPlan,
}

impl LabSpec {
    /// Training defaults per dataset and architecture: good clean accuracy, cheap on a CPU.
    pub fn default_plan(dataset: Dataset, arch: Arch) -> TrainPlan {
        let base = TrainPlan::default();
        match (dataset, arch) {
            (Dataset::Mnist, Arch::Resnet) => TrainPlan {
                epochs: 4,
                lr: 0.05,
                ..base
            },
            (Dataset::Mnist, _) => base,
            (Dataset::Shapes, _) => TrainPlan {
                epochs: 4,
                lr: 0.05,
                ..base
            },
        }
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidInput(m));
        if !(0..10).contains(&self.target) {
            return bad(format!(
                "--target {} is not a class of this dataset (0..10)",
                self.target
            ));
        }
        if !(self.poison_rate > 0.0 && self.poison_rate <= 1.0) {
            return bad(format!(
                "--poison-rate {} must lie in (0, 1]",
                self.poison_rate
            ));
        }
        if !(0.0..=10.0).contains(&self.cross_ratio) {
            return bad(format!(
                "--cross-ratio {} must lie in [0, 10]",
                self.cross_ratio
            ));
        }
        if self.all_to_all && self.attack.is_clean_label() {
            return bad("--all-to-all needs a dirty-label attack; SIG is clean-label".into());
        }
        if self.all_to_all && self.attack == Attack::None {
            return bad("--all-to-all needs an attack".into());
        }
        if !(1..=MAX_EPOCHS).contains(&self.plan.epochs) {
            return bad(format!("--epochs must lie in [1, {MAX_EPOCHS}]"));
        }
        // A trigger or warp grid wider than the image is a typo; the grid's was an
        // allocation of its square that aborted the process.
        let side = self.dataset.image_side();
        // With the margin patches keep from the border: past it a patch was clipped
        // without a word, or filled the image.
        let extent = match &self.attack {
            Attack::Badnets(b) => Some(("--trigger-size", b.patch, b.margin)),
            Attack::Trojan(t) => Some(("--trigger-size", t.size, t.margin)),
            Attack::Dynamic(d) => Some(("--trigger-size", d.size, 0)),
            Attack::Wanet(w) => Some(("--wanet-grid", w.grid, 0)),
            _ => None,
        };
        if let Some((flag, value, margin)) = extent {
            if value + margin > side {
                let margin = if margin > 0 {
                    format!(" with its {margin}-pixel margin")
                } else {
                    String::new()
                };
                return bad(format!(
                    "{flag} {value} is larger than the dataset's {side}×{side} images{margin}"
                ));
            }
        }
        match &self.attack {
            // At or past half the image width the sinusoid aliases: at exactly half it
            // is sin(πx) = 0 on every pixel, and the images are not changed at all.
            Attack::Sig(sig) if f64::from(sig.frequency) >= side as f64 / 2.0 => {
                return bad(format!(
                    "--sig-frequency {} must be below half the image width ({side}/2)",
                    sig.frequency
                ));
            }
            // A warp of more than the image moves every pixel to the border.
            Attack::Wanet(wanet) if f64::from(wanet.strength) > side as f64 => {
                return bad(format!(
                    "--wanet-strength {} must be at most the image width ({side} pixels)",
                    wanet.strength
                ));
            }
            // 0: every pattern at the same place, which is not a dynamic trigger; past
            // the room the image leaves, it was clipped without a word.
            Attack::Dynamic(dynamic)
                if !(1..=side.saturating_sub(dynamic.size)).contains(&dynamic.region) =>
            {
                return bad(format!(
                    "--dynamic-region must lie in [1, {}] for --trigger-size {} on {side}×{side} images",
                    side.saturating_sub(dynamic.size),
                    dynamic.size
                ));
            }
            _ => {}
        }
        Ok(())
    }

    fn poisoning(&self) -> Poisoning {
        Poisoning {
            mode: if self.all_to_all {
                TargetMode::AllToAll { num_classes: 10 }
            } else {
                TargetMode::AllToOne {
                    target: self.target,
                }
            },
            rate: self.poison_rate,
            clean_label: self.attack.is_clean_label(),
            cross_ratio: self.cross_ratio,
        }
    }
}

/// What `meta.json` records.
#[derive(Debug, Clone, Serialize)]
pub struct LabMeta {
    pub dataset: Dataset,
    pub arch: Arch,
    pub attack: Attack,
    /// The all-to-one target; `null` for all-to-all and for no attack.
    pub target: Option<i64>,
    pub all_to_all: bool,
    pub clean_label: bool,
    pub poison_rate: Option<f64>,
    pub cross_ratio: Option<f64>,
    pub seed: u64,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub threads: i32,
    pub train_samples: usize,
    pub poisoned_samples: usize,
    pub clean_samples: usize,
    pub test_samples: usize,
    pub poison_test_samples: Option<usize>,
    pub clean_acc: f64,
    pub asr: Option<f64>,
    pub ra: Option<f64>,
    pub train_seconds: f64,
    pub bdscan_version: String,
}

pub const MNIST_RESNET: &[u8] = include_bytes!("../../tests/fixtures/models/mnist_resnet.pt");
pub const SHAPES_VGG_BN: &[u8] = include_bytes!("../../tests/fixtures/models/shapes_vgg_bn.pt");
pub const SHAPES_RESNET: &[u8] = include_bytes!("../../tests/fixtures/models/shapes_resnet.pt");
pub const SHAPES_CNN: &[u8] = include_bytes!("../../tests/fixtures/models/shapes_cnn.pt");

fn architecture(dataset: Dataset, arch: Arch) -> &'static [u8] {
    match (dataset, arch) {
        (Dataset::Mnist, Arch::VggBn) => super::demo::MNIST_CNN_BN,
        (Dataset::Mnist, Arch::Cnn) => super::demo::MNIST_CNN,
        (Dataset::Mnist, Arch::Resnet) => MNIST_RESNET,
        (Dataset::Shapes, Arch::VggBn) => SHAPES_VGG_BN,
        (Dataset::Shapes, Arch::Resnet) => SHAPES_RESNET,
        (Dataset::Shapes, Arch::Cnn) => SHAPES_CNN,
    }
}

/// (training split, defender's clean bundle, clean test set).
pub fn splits(dataset: Dataset) -> (Bundle, Bundle, Bundle) {
    match dataset {
        Dataset::Mnist => {
            let mnist = mnist_fixture();
            (
                mnist.slice(0..TRAIN_SAMPLES),
                mnist.slice(TRAIN_SAMPLES..TRAIN_SAMPLES + CLEAN_SAMPLES),
                mnist.slice(TRAIN_SAMPLES + CLEAN_SAMPLES..mnist.len()),
            )
        }
        Dataset::Shapes => {
            let train = shapes::generate(TRAIN_SAMPLES + CLEAN_SAMPLES, shapes::TRAIN_SEED);
            (
                train.slice(0..TRAIN_SAMPLES),
                train.slice(TRAIN_SAMPLES..TRAIN_SAMPLES + CLEAN_SAMPLES),
                shapes::generate(2000, shapes::TEST_SEED),
            )
        }
    }
}

/// The files a run writes into its folder.
pub struct LabFiles {
    pub model: PathBuf,
    pub clean: PathBuf,
    pub test: PathBuf,
    pub poison: Option<PathBuf>,
    pub meta: PathBuf,
}

/// Every file a run writes in its folder (`architecture.pt` only while it trains).
const RUN_FILES: [&str; 6] = [
    "meta.json",
    "model.pt",
    "clean.safetensors",
    "test.safetensors",
    "poison.safetensors",
    "architecture.pt",
];

fn writing_error(what: &Path) -> impl Fn(std::io::Error) -> EngineError {
    let what = what.display().to_string();
    move |e: std::io::Error| EngineError::InvalidInput(format!("writing {what}: {e}"))
}

/// Runs `spec` and writes everything to `dir`. An earlier run's files there go first, and
/// a run that fails removes what it wrote: a failed run never leaves bundles beside a
/// model and metadata they do not belong to. `meta.json` is written last, so a folder
/// without it (a run stopped by a signal) is visibly unfinished.
pub fn run_lab(
    spec: &LabSpec,
    dir: &Path,
    monitor: &mut Monitor,
) -> Result<(LabMeta, LabFiles), EngineError> {
    spec.validate()?;
    std::fs::create_dir_all(dir).map_err(writing_error(dir))?;
    refuse_files_of_no_run(dir)?;
    let remove_run_files = || -> Result<(), EngineError> {
        for name in RUN_FILES {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(writing_error(&path)(e))
                }
                _ => {}
            }
        }
        Ok(())
    };
    remove_run_files()?;
    let ran = write_run(spec, dir, monitor);
    if ran.is_err() {
        let _ = remove_run_files();
    }
    ran
}

/// Refuses a folder holding files with a run's names (`model.pt`, `clean.safetensors`, …)
/// beside no lab run's `meta.json`: they are someone's own files, which replacing an
/// earlier run's would have deleted. (A run stopped by SIGKILL before its `meta.json` is
/// refused too; its files are the user's to remove.)
fn refuse_files_of_no_run(dir: &Path) -> Result<(), EngineError> {
    let present: Vec<&str> = RUN_FILES
        .into_iter()
        .filter(|name| std::fs::symlink_metadata(dir.join(name)).is_ok())
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    // A lab run's metadata names these (see `LabMeta`).
    let of_a_run = std::fs::read(dir.join("meta.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_some_and(|meta| {
            ["dataset", "arch", "attack", "seed", "poisoned_samples"]
                .iter()
                .all(|key| meta.get(key).is_some())
        });
    if of_a_run {
        return Ok(());
    }
    Err(EngineError::InvalidInput(format!(
        "--out {}: holds {} without a lab run's meta.json; the lab replaces only an \
         earlier run's files: give a new or empty folder",
        dir.display(),
        present.join(", ")
    )))
}

fn write_run(
    spec: &LabSpec,
    dir: &Path,
    monitor: &mut Monitor,
) -> Result<(LabMeta, LabFiles), EngineError> {
    let io = writing_error;
    let (train, clean, test) = splits(spec.dataset);
    // The trainer seeds its own generator with the same seed; poisoning draws from another
    // stream, or its shuffle would equal the first epoch's batch order and the first
    // batches would hold nothing but poisoned samples (which derails training on shapes).
    let mut rng = ChaCha8Rng::seed_from_u64(spec.plan.seed);
    rng.set_stream(1);
    let poisoning = spec.poisoning();
    let poisoned_samples = match spec.attack.trigger() {
        Some(_) => poisoning.poisoned_count(&train),
        None => 0,
    };
    // A rate that rounds to no sample trains a clean model that meta.json would call
    // attacked.
    if spec.attack.trigger().is_some() && poisoned_samples == 0 {
        return Err(EngineError::InvalidInput(format!(
            "--poison-rate {} poisons no training sample of this split; raise it",
            spec.poison_rate
        )));
    }
    let (train, poison) = match spec.attack.trigger() {
        Some(trigger) => (
            poisoning.poison_training_set(&train, trigger, &mut rng),
            Some(poisoning.poisoned_test_set(&test, trigger, &mut rng)),
        ),
        None => (train, None),
    };
    let files = LabFiles {
        model: dir.join("model.pt"),
        clean: dir.join("clean.safetensors"),
        test: dir.join("test.safetensors"),
        poison: poison.as_ref().map(|_| dir.join("poison.safetensors")),
        meta: dir.join("meta.json"),
    };
    std::fs::write(&files.clean, clean.to_safetensors()).map_err(io(&files.clean))?;
    std::fs::write(&files.test, test.to_safetensors()).map_err(io(&files.test))?;
    if let (Some(bundle), Some(path)) = (&poison, &files.poison) {
        std::fs::write(path, bundle.to_safetensors()).map_err(io(path))?;
    }
    let arch_path = dir.join("architecture.pt");
    std::fs::write(&arch_path, architecture(spec.dataset, spec.arch)).map_err(io(&arch_path))?;
    let started = Instant::now();
    let trained = train_model(
        &arch_path,
        &train,
        &spec.plan,
        &files.model,
        Device::Cpu,
        monitor,
    );
    let train_seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&arch_path);
    trained?;

    let test_set = SampleSet::from_bundle(&test, Device::Cpu)?;
    let mut model = ScanModel::load(&files.model, Device::Cpu, &test_set.images.narrow(0, 0, 2))?;
    let clean_acc = accuracy(&mut model, &test_set, 256)?;
    let (asr, ra) = match &poison {
        Some(bundle) => {
            let set = SampleSet::from_bundle(bundle, Device::Cpu)?;
            let poison_set = match &bundle.targets {
                Some(targets) => PoisonSet::with_targets(set, targets)?,
                None => PoisonSet::new(set, spec.target)?,
            };
            let (asr, ra) = poison_set.measure(&mut model, 256)?;
            (Some(asr), Some(ra))
        }
        None => (None, None),
    };
    let attacked = spec.attack != Attack::None;
    let meta = LabMeta {
        dataset: spec.dataset,
        arch: spec.arch,
        attack: spec.attack,
        target: (attacked && !spec.all_to_all).then_some(spec.target),
        all_to_all: spec.all_to_all,
        clean_label: spec.attack.is_clean_label(),
        poison_rate: attacked.then_some(spec.poison_rate),
        cross_ratio: (spec.cross_ratio > 0.0).then_some(spec.cross_ratio),
        seed: spec.plan.seed,
        epochs: spec.plan.epochs,
        lr: spec.plan.lr,
        batch_size: spec.plan.batch_size,
        threads: tch::get_num_threads(),
        train_samples: train.len(),
        poisoned_samples,
        clean_samples: clean.len(),
        test_samples: test.len(),
        poison_test_samples: poison.as_ref().map(Bundle::len),
        clean_acc,
        asr,
        ra,
        train_seconds,
        bdscan_version: env!("CARGO_PKG_VERSION").into(),
    };
    let json =
        serde_json::to_string_pretty(&meta).map_err(|e| EngineError::Internal(e.to_string()))?;
    std::fs::write(&files.meta, json).map_err(io(&files.meta))?;
    Ok((meta, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every architecture groups each BatchNorm with the conv registered before it, so no
    /// parameter is left out of a neuron (bdscan's grouping reads registration order).
    #[test]
    fn every_architecture_groups_batchnorm_with_its_conv() {
        let dir = tempfile::tempdir().unwrap();
        for dataset in [Dataset::Mnist, Dataset::Shapes] {
            for arch in [Arch::VggBn, Arch::Resnet, Arch::Cnn] {
                let path = dir.path().join("arch.pt");
                std::fs::write(&path, architecture(dataset, arch)).unwrap();
                let c = match dataset {
                    Dataset::Mnist => 1,
                    Dataset::Shapes => 3,
                };
                let side = dataset.image_side() as i64;
                let probe = tch::Tensor::zeros([2, c, side, side], (tch::Kind::Uint8, Device::Cpu));
                let model = ScanModel::load(&path, Device::Cpu, &probe).unwrap();
                assert_eq!(model.num_classes, 10);
                let grouped: usize = model.layers.iter().map(|l| 1 + l.members.len()).sum();
                assert_eq!(grouped, model.params.len(), "{dataset:?} {arch:?}");
                let classifiers = model.layers.iter().filter(|l| l.is_classifier).count();
                assert_eq!(classifiers, 1);
                if arch == Arch::Resnet {
                    let names: Vec<(&str, usize)> = model
                        .layers
                        .iter()
                        .map(|l| (l.name.as_str(), l.members.len()))
                        .collect();
                    assert!(names.contains(&("layer1.conv2", 2)), "{names:?}");
                    assert!(names.contains(&("layer1.shortcut.0", 2)), "{names:?}");
                    assert!(names.contains(&("fc", 1)), "{names:?}");
                }
            }
        }
    }

    #[test]
    fn shapes_splits_have_the_documented_sizes() {
        let (train, clean, test) = splits(Dataset::Shapes);
        assert_eq!((train.len(), clean.len(), test.len()), (8000, 400, 2000));
        assert_eq!(train.shape[1..], [3, 32, 32]);
    }
}

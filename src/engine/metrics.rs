//! Clean accuracy, attack success rate (ASR), robust accuracy (RA) and the defense
//! effectiveness rating (DER) as BackdoorBench defines it.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::data::SampleSet;
use super::error::EngineError;
use super::model::ScanModel;
use super::training::{accuracy, predict};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccuracySource {
    /// The `--test` bundle.
    Test,
    /// The held-out split of the clean bundle.
    HeldOut,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub clean_acc: f64,
    pub clean_acc_on: AccuracySource,
    /// Share of triggered non-target samples classified as the target.
    pub asr: Option<f64>,
    /// Share of triggered non-target samples still classified as their true label.
    pub ra: Option<f64>,
}

/// Triggered samples whose true label is not their attack target, and those targets.
pub struct PoisonSet {
    pub samples: SampleSet,
    /// Each sample's target (all equal for an all-to-one attack).
    pub targets: Tensor,
}

impl PoisonSet {
    /// All-to-one: every sample's target is `target`.
    pub fn new(all: SampleSet, target: i64) -> Result<Self, EngineError> {
        let targets = vec![target; all.len()];
        Self::with_targets(all, &targets)
    }

    /// Per-sample targets (an all-to-all attack). Keeps only the samples whose true label
    /// differs from their target, as ASR requires.
    pub fn with_targets(all: SampleSet, targets: &[i64]) -> Result<Self, EngineError> {
        let labels = Vec::<i64>::try_from(all.labels.f_to_device(tch::Device::Cpu)?)?;
        let keep: Vec<i64> = (0..labels.len())
            .filter(|&i| labels[i] != targets[i])
            .map(|i| i as i64)
            .collect();
        if keep.is_empty() {
            return Err(EngineError::InvalidInput(
                "poison bundle: every sample's true label is its attack target; ASR needs samples whose label differs".into(),
            ));
        }
        let kept: Vec<i64> = keep.iter().map(|&i| targets[i as usize]).collect();
        let device = all.labels.device();
        Ok(PoisonSet {
            samples: all.select(&keep)?,
            targets: Tensor::from_slice(&kept).f_to_device(device)?,
        })
    }

    /// At most `n` of the samples, with their targets, every true label in proportion
    /// (`class_balanced_indices`).
    pub fn class_balanced(&self, n: usize) -> Result<PoisonSet, EngineError> {
        let indices = self.samples.class_balanced_indices(n)?;
        let index = Tensor::from_slice(&indices).f_to_device(self.targets.device())?;
        Ok(PoisonSet {
            samples: self.samples.select(&indices)?,
            targets: self.targets.f_index_select(0, &index)?,
        })
    }

    /// (ASR, RA) of `model` on these samples: the share predicted as their target, and
    /// the share still predicted as their true label.
    pub fn measure(
        &self,
        model: &mut ScanModel,
        batch_size: usize,
    ) -> Result<(f64, f64), EngineError> {
        let predictions = predict(model, &self.samples, batch_size)?;
        let n = self.samples.len() as f64;
        let hits = predictions
            .f_eq_tensor(&self.targets)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])? as f64;
        let recovered = predictions
            .f_eq_tensor(&self.samples.labels)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])? as f64;
        Ok((hits / n, recovered / n))
    }
}

pub fn measure(
    model: &mut ScanModel,
    clean: &SampleSet,
    clean_source: AccuracySource,
    poison: Option<&PoisonSet>,
    batch_size: usize,
) -> Result<Metrics, EngineError> {
    let clean_acc = accuracy(model, clean, batch_size)?;
    let (asr, ra) = match poison {
        Some(p) => {
            let (asr, ra) = p.measure(model, batch_size)?;
            (Some(asr), Some(ra))
        }
        None => (None, None),
    };
    Ok(Metrics {
        clean_acc,
        clean_acc_on: clean_source,
        asr,
        ra,
    })
}

/// DER = (max(0, ΔASR) − max(0, ΔACC) + 1) / 2, with Δ = before − after, in [0, 1].
/// 1 means the backdoor is gone at no accuracy cost; 0.5 means nothing changed.
pub fn defense_effectiveness_rating(before: &Metrics, after: &Metrics) -> Option<f64> {
    let asr_drop = before.asr? - after.asr?;
    let acc_drop = before.clean_acc - after.clean_acc;
    Some((asr_drop.max(0.0) - acc_drop.max(0.0) + 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(acc: f64, asr: f64) -> Metrics {
        Metrics {
            clean_acc: acc,
            clean_acc_on: AccuracySource::Test,
            asr: Some(asr),
            ra: Some(0.0),
        }
    }

    #[test]
    fn der_follows_backdoorbench() {
        assert_eq!(
            defense_effectiveness_rating(&m(0.9, 1.0), &m(0.9, 0.0)),
            Some(1.0)
        );
        assert_eq!(
            defense_effectiveness_rating(&m(0.9, 1.0), &m(0.9, 1.0)),
            Some(0.5)
        );
        let der = defense_effectiveness_rating(&m(0.9, 1.0), &m(0.8, 0.1)).unwrap();
        assert!((der - 0.9).abs() < 1e-12);
        // Gains in accuracy or ASR are not rewarded beyond zero.
        assert_eq!(
            defense_effectiveness_rating(&m(0.8, 0.1), &m(0.9, 0.5)),
            Some(0.5)
        );
        let no_poison = Metrics {
            asr: None,
            ra: None,
            ..m(0.9, 0.0)
        };
        assert_eq!(defense_effectiveness_rating(&no_poison, &no_poison), None);
    }
}

//! Every knob of a scan, with defaults. The whole config goes into the report so a scan
//! can be reproduced; none of it is ever set from poisoned data.

use serde::{Deserialize, Serialize};

use super::error::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Regularizer {
    /// Adaptive regularization: shrink strength grows with |θ| relative to the layer scale.
    Ar,
    L1,
    L2,
    /// Plain fine-tuning of everything, no penalty (an ablation).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// sqrt(mean over batches of s²): does not cancel when per-batch signs flip.
    Rms,
    /// mean over batches of |s|.
    MeanAbs,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScanConfig {
    pub seed: u64,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// libtorch intra-op threads; `None` keeps libtorch's default.
    pub threads: Option<usize>,
    pub batch_size: usize,
    /// Share of the clean bundle held out to choose thresholds and measure accuracy.
    pub held_out_fraction: f64,
    pub aggregation: Aggregation,
    /// Largest held-out accuracy drop (fraction) tolerated when the flagged neurons are
    /// removed outright; the flagged share is the largest one within this budget.
    pub neuron_drop_budget: f64,
    /// The same rule for individual low-salience weights, which AR then shrinks.
    pub weight_drop_budget: f64,
    /// Step of the candidate suspect fractions tried (step, 2·step, … up to `max_fraction`).
    pub fraction_step: f64,
    pub max_fraction: f64,
    pub regularizer: Regularizer,
    /// λ of the penalty on suspect parameters.
    pub reg_strength: f64,
    pub purify_epochs: usize,
    /// Peak learning rate of the purification phase (cosine-annealed to zero).
    pub purify_lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Random translation of clean images by up to this many pixels during purification.
    pub augment_shift: usize,
    /// Suspect weights below this fraction of their layer's RMS are pruned after AR.
    pub prune_threshold: f64,
    /// Weight of distillation from the unmodified model during purification (0 turns it off).
    pub distill_weight: f64,
    pub distill_temperature: f64,
    pub recovery_epochs: usize,
    pub recovery_lr: f64,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            seed: 0,
            device: "cpu".into(),
            threads: None,
            batch_size: 64,
            held_out_fraction: 0.2,
            aggregation: Aggregation::Rms,
            neuron_drop_budget: 0.02,
            weight_drop_budget: 0.05,
            fraction_step: 0.05,
            max_fraction: 0.9,
            regularizer: Regularizer::Ar,
            reg_strength: 10.0,
            purify_epochs: 40,
            purify_lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            augment_shift: 2,
            prune_threshold: 0.05,
            distill_weight: 0.5,
            distill_temperature: 2.0,
            recovery_epochs: 10,
            recovery_lr: 0.01,
        }
    }
}

impl ScanConfig {
    /// Rejects settings that cannot work, with a message naming the field.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field: &str, why: &str| {
            Err(EngineError::InvalidInput(format!(
                "config `{field}`: {why}"
            )))
        };
        if self.batch_size < 2 {
            return bad(
                "batch_size",
                "must be at least 2 (BatchNorm needs two samples)",
            );
        }
        if !(self.held_out_fraction > 0.0 && self.held_out_fraction < 1.0) {
            return bad("held_out_fraction", "must lie strictly between 0 and 1");
        }
        for (field, value) in [
            ("neuron_drop_budget", self.neuron_drop_budget),
            ("weight_drop_budget", self.weight_drop_budget),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return bad(field, "must lie in [0, 1]");
            }
        }
        if !(self.fraction_step > 0.0
            && self.fraction_step <= self.max_fraction
            && self.max_fraction < 1.0)
        {
            return bad(
                "fraction_step",
                "need 0 < fraction_step <= max_fraction < 1",
            );
        }
        for (field, value) in [
            ("reg_strength", self.reg_strength),
            ("purify_lr", self.purify_lr),
            ("recovery_lr", self.recovery_lr),
            ("weight_decay", self.weight_decay),
            ("prune_threshold", self.prune_threshold),
            ("distill_weight", self.distill_weight),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return bad(field, "must be a finite non-negative number");
            }
        }
        if !(self.distill_temperature.is_finite() && self.distill_temperature > 0.0) {
            return bad("distill_temperature", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum", "must lie in [0, 1)");
        }
        if self.threads == Some(0) {
            return bad("threads", "must be at least 1");
        }
        parse_device(&self.device)?;
        Ok(())
    }
}

/// Parses `cpu` or `cuda:N` (bare `cuda` means `cuda:0`).
pub fn parse_device(spec: &str) -> Result<tch::Device, EngineError> {
    match spec {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(tch::Device::Cuda)
            .ok_or_else(|| {
                EngineError::InvalidInput(format!("device `{other}`: expected `cpu` or `cuda:N`"))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_partial_json_fills_in_defaults() {
        ScanConfig::default().validate().unwrap();
        let cfg: ScanConfig =
            serde_json::from_str(r#"{"regularizer": "l1", "purify_epochs": 3}"#).unwrap();
        assert_eq!(cfg.regularizer, Regularizer::L1);
        assert_eq!(cfg.purify_epochs, 3);
        assert_eq!(cfg.batch_size, ScanConfig::default().batch_size);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        assert!(serde_json::from_str::<ScanConfig>(r#"{"learning_rate": 1}"#).is_err());
        let cfg = ScanConfig {
            held_out_fraction: 1.0,
            ..Default::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("held_out_fraction"));
        let cfg = ScanConfig {
            device: "tpu".into(),
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn parses_devices() {
        assert_eq!(parse_device("cpu").unwrap(), tch::Device::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), tch::Device::Cuda(1));
        assert!(parse_device("cuda:x").is_err());
    }
}

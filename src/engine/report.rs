//! The salience report: what was scanned, how, what was found and what changed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::patterns::PatternProbe;
pub use super::unlearn::TargetSearch;

use super::config::ScanConfig;
use super::identify::Selection;
use super::metrics::Metrics;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScanReport {
    pub schema_version: u32,
    pub tool: ToolInfo,
    pub inputs: Inputs,
    pub config: ScanConfig,
    pub seed: u64,
    pub model: ModelSummary,
    pub split: SplitSummary,
    pub selection: Selection,
    pub layers: Vec<LayerReport>,
    /// Neurons flagged as not needed by the clean task (suspected backdoor neurons).
    pub flagged_count: usize,
    /// Flagged neurons whose every parameter ended at zero.
    pub pruned_neuron_count: usize,
    pub suspect_weight_count: i64,
    pub pruned_weight_count: i64,
    pub metrics: MetricsPair,
    /// Defense effectiveness rating; present when a poison bundle was given.
    pub der: Option<f64>,
    /// Shortcut unlearning's search for a trigger's target class (our method and its
    /// activation ablation).
    pub shortcut_search: Option<TargetSearch>,
    /// Our method and its activation ablation: the probe that decided whether
    /// purification trained against random image-wide patterns.
    pub pattern_probe: Option<PatternProbe>,
    /// Our method and its activation ablation: the model with every suspect entry set
    /// to zero, before any fine-tuning. How much of the backdoor identification alone
    /// takes out, separately from what purification then does.
    pub suspects_removed: Option<SuspectsRemoved>,
    /// Our method and its ablations: the peak rate purification started at
    /// (`purify_lr`, or `purify_lr_unnormalized` for a network without normalization).
    #[serde(default)]
    pub purify_peak_lr: Option<f64>,
    /// Per-epoch measurements of the purification and recovery phases.
    pub trace: Vec<EpochTrace>,
    pub artifact: ArtifactDigest,
    /// Things a reader should not miss, e.g. purification cost much clean accuracy.
    pub warnings: Vec<String>,
    /// Wall time per phase in milliseconds (the only part that varies between runs).
    pub timings_ms: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolInfo {
    pub bdscan_version: String,
    pub libtorch_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileDigest {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArtifactDigest {
    /// sha256 of the archive file (differs between runs: TorchScript embeds a random id).
    pub sha256: String,
    pub bytes: u64,
    /// sha256 of the purified parameters: identical for identical scans.
    pub parameters_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BundleDigest {
    pub sha256: String,
    pub bytes: u64,
    pub samples: usize,
    /// C, H, W.
    pub image_shape: [usize; 3],
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Inputs {
    pub model: FileDigest,
    pub clean: BundleDigest,
    pub test: Option<BundleDigest>,
    pub poison: Option<BundleDigest>,
    pub target_label: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelSummary {
    pub num_classes: i64,
    pub parameter_count: i64,
    pub layer_count: usize,
    pub neuron_count: usize,
    pub classifier_layer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitSummary {
    pub train: usize,
    pub held_out: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    pub name: String,
    pub weight_shape: Vec<i64>,
    /// Parameters grouped into this layer's neurons besides the weight (bias, BatchNorm).
    pub grouped_parameters: Vec<String>,
    pub is_classifier: bool,
    pub width: usize,
    /// What the scan's method ranks neurons by: benign salience (in the model's units
    /// of loss) for `benign_salience`; mean clean activation for `activation` and `fp`;
    /// the learned mask for `anp`; the channel Lipschitz bound for `clp`; zeros for
    /// `ft`. The name is kept for the schema's sake; `config.method` says which.
    #[serde(deserialize_with = "nan_as_null::many")]
    pub benign_salience: Vec<f64>,
    /// Those scores divided by the layer's mean (what our ranking uses without a
    /// shortcut).
    #[serde(deserialize_with = "nan_as_null::many")]
    pub normalized_salience: Vec<f64>,
    /// Our method and its activation ablation, when the shortcut search named a target
    /// and `shortcut_ranking` is on: each neuron's benign salience for the route to that
    /// target (clean images plus the found perturbation, labelled with the target).
    /// Suspects were then ranked by `relative_salience`. Absent otherwise.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nan_as_null::some_many"
    )]
    pub shortcut_salience: Option<Vec<f64>>,
    /// With `shortcut_salience`: what the suspects were ranked by, lowest first,
    /// (normalized_salience + 0.001) / (shortcut_salience over its layer's mean + 0.001).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nan_as_null::some_many"
    )]
    pub relative_salience: Option<Vec<f64>>,
    #[serde(deserialize_with = "nan_as_null::many")]
    pub norm_before: Vec<f64>,
    #[serde(deserialize_with = "nan_as_null::many")]
    pub norm_after: Vec<f64>,
    /// Indices of flagged neurons.
    pub flagged: Vec<usize>,
    /// Indices of neurons whose parameters are all zero after purification.
    pub pruned: Vec<usize>,
    pub suspect_weights: i64,
    pub pruned_weights: i64,
}

/// The model as it arrived with every suspect entry zeroed (measured, then undone).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SuspectsRemoved {
    /// Clean accuracy on the held-out split.
    pub held_out_acc: f64,
    /// Attack success rate and robust accuracy on the whole poison bundle, when given.
    pub asr: Option<f64>,
    pub ra: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricsPair {
    pub before: Metrics,
    pub after: Metrics,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochTrace {
    pub phase: String,
    pub epoch: usize,
    /// On `purify_step` entries (see `trace_step_epochs`): epochs of optimizer steps run
    /// when it was measured, e.g. 1.4 after the second of five steps of epoch 2, which
    /// `epoch` names; `train_loss` is that step's. Epoch entries have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_epoch: Option<f64>,
    #[serde(deserialize_with = "nan_as_null::one")]
    pub train_loss: f64,
    #[serde(deserialize_with = "nan_as_null::one")]
    pub held_out_acc: f64,
    /// Clean accuracy on the test bundle when one is given (on at most `trace_samples` of
    /// its images, every label in proportion); never used to steer the scan.
    pub test_acc: Option<f64>,
    /// With shortcut unlearning: the share of clean images that this epoch's
    /// perturbation (the one trained against) sent to the suspected target.
    pub shortcut_success: Option<f64>,
    /// With shortcut unlearning on images: the share of clean images that this epoch's
    /// patch (a free pattern on the positions the target search's perturbation
    /// concentrated on) sent to the suspected target. (Absent from older reports.)
    #[serde(default)]
    pub patch_success: Option<f64>,
    /// L2 norm of the suspect entries relative to their norm before purification.
    #[serde(deserialize_with = "nan_as_null::one")]
    pub suspect_norm_ratio: f64,
    /// Measured on the poison bundle when one is given (at most `trace_samples` of its
    /// images, every true label in proportion); never used to steer the scan.
    pub asr: Option<f64>,
}

/// serde_json writes a NaN or infinite float as `null` (JSON has no such numbers); these
/// read `null` back as NaN, so a stored report holding one (a model whose weights
/// overflow a norm, say) still loads, for its page and for comparison.
pub(crate) mod nan_as_null {
    use serde::{Deserialize, Deserializer};

    pub fn one<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    pub fn many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let values = Vec::<Option<f64>>::deserialize(d)?;
        Ok(values.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
    }

    pub fn some_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
        many(d).map(Some)
    }
}

impl ScanReport {
    /// The report with its run-dependent parts (timings, the archive file's hash) cleared,
    /// for comparing runs.
    pub fn reproducible_part(&self) -> ScanReport {
        let artifact = ArtifactDigest {
            sha256: String::new(),
            ..self.artifact.clone()
        };
        ScanReport {
            timings_ms: BTreeMap::new(),
            artifact,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_with_non_finite_scores_survives_a_json_round_trip() {
        let layer = LayerReport {
            name: "features.0".into(),
            weight_shape: vec![2, 1, 3, 3],
            grouped_parameters: vec![],
            is_classifier: false,
            width: 2,
            benign_salience: vec![f64::NAN, 1.0],
            normalized_salience: vec![f64::INFINITY, 0.5],
            shortcut_salience: Some(vec![2.0, f64::NAN]),
            relative_salience: Some(vec![0.5, 1.0]),
            norm_before: vec![1.0, f64::NEG_INFINITY],
            norm_after: vec![0.0, 1.0],
            flagged: vec![0],
            pruned: vec![],
            suspect_weights: 0,
            pruned_weights: 0,
        };
        let json = serde_json::to_string(&layer).unwrap();
        assert!(json.contains("[null,1.0]"), "{json}");
        let back: LayerReport = serde_json::from_str(&json).unwrap();
        assert!(back.benign_salience[0].is_nan() && back.benign_salience[1] == 1.0);
        assert!(back.normalized_salience[0].is_nan() && back.norm_before[1].is_nan());
        assert_eq!(back.norm_after, layer.norm_after);
        let shortcut = back.shortcut_salience.unwrap();
        assert!(shortcut[0] == 2.0 && shortcut[1].is_nan());
        // Reports without a shortcut leave the field out, and read back as `None`.
        assert_eq!(back.relative_salience, Some(vec![0.5, 1.0]));
        let without = LayerReport {
            shortcut_salience: None,
            relative_salience: None,
            ..layer
        };
        let json = serde_json::to_string(&without).unwrap();
        assert!(!json.contains("shortcut_salience"), "{json}");
        let back: LayerReport = serde_json::from_str(&json).unwrap();
        assert!(back.shortcut_salience.is_none() && back.relative_salience.is_none());

        let epoch: EpochTrace = serde_json::from_str(
            r#"{"phase":"purify","epoch":1,"train_loss":null,"held_out_acc":0.9,
                "test_acc":null,"shortcut_success":null,"suspect_norm_ratio":null,"asr":null}"#,
        )
        .unwrap();
        assert!(epoch.train_loss.is_nan() && epoch.suspect_norm_ratio.is_nan());
        assert!(epoch.patch_success.is_none());
    }
}

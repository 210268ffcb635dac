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

/// Which defense a scan runs. Every one shares loading, validation, metrics, the
/// artifact and the report; they differ in how neurons are scored, flagged and removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Benign salience + AR purification, distillation, pruning and recovery (ours).
    #[default]
    BenignSalience,
    /// Ablation: the same pipeline with neurons ranked by mean clean activation.
    Activation,
    /// Plain fine-tuning on the clean training split.
    Ft,
    /// Fine-Pruning (Liu et al., 2018): prune the last conv layer by clean activation, then fine-tune.
    Fp,
    /// Adversarial Neuron Pruning (Wu & Wang, 2021).
    Anp,
    /// Channel Lipschitzness-based Pruning (Zheng et al., 2022), data-free.
    Clp,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::BenignSalience => "benign_salience",
            Method::Activation => "activation",
            Method::Ft => "ft",
            Method::Fp => "fp",
            Method::Anp => "anp",
            Method::Clp => "clp",
        }
    }
}

/// Plain fine-tuning (`ft`, and the fine-tuning half of `fp`). Defaults follow
/// BackdoorBench's FT/FP configs: SGD, lr 0.01, momentum 0.9, weight decay 5e-4, cosine
/// annealing; 20 epochs over the clean training split (BackdoorBench trains 100 epochs
/// on its 5% subset; 20 keeps the CPU time near the default method's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FtConfig {
    pub epochs: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Default for FtConfig {
    fn default() -> Self {
        FtConfig {
            epochs: 20,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 5e-4,
        }
    }
}

/// Fine-Pruning. The stopping rule is BackdoorBench's: keep pruning while the held-out
/// accuracy stays within `acc_ratio` (relative) of the unpruned model's (`acc_ratio: 0.1`
/// in its `config/defense/fp/config.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FpConfig {
    pub acc_ratio: f64,
    /// Channels added to the pruned set per step (Liu et al. prune one at a time).
    pub channels_per_step: usize,
}

impl Default for FpConfig {
    fn default() -> Self {
        FpConfig {
            acc_ratio: 0.1,
            channels_per_step: 1,
        }
    }
}

/// Adversarial Neuron Pruning, defaults from Wu & Wang (2021) and their code
/// (csdongxian/ANP_backdoor): ε 0.4, α 0.2, mask lr 0.2 with momentum 0.9, one
/// perturbation step of size ε, 2000 iterations of batch 128, prune masks below 0.2.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AnpConfig {
    pub eps: f64,
    /// Weight of the natural (unperturbed) loss; 1 − α weighs the perturbed one.
    pub alpha: f64,
    pub mask_lr: f64,
    pub iterations: usize,
    pub batch_size: usize,
    pub prune_threshold: f64,
}

impl Default for AnpConfig {
    fn default() -> Self {
        AnpConfig {
            eps: 0.4,
            alpha: 0.2,
            mask_lr: 0.2,
            iterations: 2000,
            batch_size: 128,
            prune_threshold: 0.2,
        }
    }
}

/// Channel Lipschitzness-based Pruning: a channel is pruned when its upper bound of
/// channel Lipschitz constant exceeds mean + u·std of its layer (u = 3, Zheng et al. 2022).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClpConfig {
    pub u: f64,
}

impl Default for ClpConfig {
    fn default() -> Self {
        ClpConfig { u: 3.0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScanConfig {
    /// The defense to run (default: benign salience with AR).
    pub method: Method,
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
    /// When the shortcut search names a target, rank neurons and weights by their clean
    /// score relative to their salience for that shortcut (the search's perturbation
    /// towards the target), so that what the clean task does not need and the shortcut
    /// does comes first; false ranks by the clean score alone. The search runs for this
    /// even when `unlearn_weight` is 0.
    pub shortcut_ranking: bool,
    pub regularizer: Regularizer,
    /// λ of the penalty on suspect parameters.
    pub reg_strength: f64,
    pub purify_epochs: usize,
    /// Peak learning rate of the purification phase (cosine-annealed to zero), for a
    /// network with normalization layers; it also caps `purify_lr_unnormalized`.
    pub purify_lr: f64,
    /// The peak rate for a network without normalization (no hidden layer has a
    /// BatchNorm-like affine pair and the archive holds no BatchNorm statistics), at most
    /// `purify_lr`. Without normalization a step of the same size moves such a network
    /// further: the BatchNorm-free development CNNs were the ones that collapsed or
    /// dipped at 0.05, and at 0.025 the ten of them (MNIST and `shapes`, clean and
    /// BadNets, seeds 100–102) ended 0.6 points more accurate on average with less ASR.
    pub purify_lr_unnormalized: f64,
    /// Epochs of linear warm-up to the peak rate before the cosine decay.
    pub purify_warmup_epochs: usize,
    /// A purification that ends more than this (fraction) below the arriving held-out
    /// accuracy, short of a collapse, runs once more at half the rate and the better of
    /// the two is kept. 1 turns it off; at -1 every purification that does not collapse
    /// runs twice.
    pub purify_retry_drop: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Random translation of clean images by up to this many pixels during purification.
    pub augment_shift: usize,
    /// Suspect weights below this fraction of their layer's RMS are pruned after AR.
    pub prune_threshold: f64,
    /// Weight of distillation from the unmodified model during purification (0 turns it off).
    pub distill_weight: f64,
    pub distill_temperature: f64,
    /// Weight of the loss under each purification epoch's universal perturbation
    /// (shortcut unlearning; 0 turns it off, and the search runs only for
    /// `shortcut_ranking`).
    pub unlearn_weight: f64,
    /// Radii tried for that perturbation, smallest first: per-pixel RMS as a fraction
    /// of the pixel range.
    pub unlearn_radii: Vec<f64>,
    /// A class is a suspected target when a perturbation reaches it from at least this
    /// share of clean images…
    pub unlearn_min_success: f64,
    /// …and by at least this margin over every other class.
    pub unlearn_min_gap: f64,
    /// Or when it is reached, and its local reach (share reached × share of the
    /// perturbation's energy on 2% of the pixel positions) leads every other class's by
    /// at least this much: a patch trigger's target on a network with easy benign classes.
    pub unlearn_min_local_gap: f64,
    /// Gradient steps of each perturbation search, each on a fresh clean batch. The
    /// per-epoch re-searches during purification and recovery continue from the last
    /// epoch's δ and patch and take half as many (rounded up).
    pub unlearn_steps: usize,
    /// Weight of the loss under a random image-wide grating in every purification and
    /// recovery step (pattern unlearning; 0 turns it off).
    pub pattern_weight: f64,
    /// Largest grating amplitude drawn, as a fraction of the pixel range.
    pub pattern_max_amplitude: f64,
    /// Largest strength of the random smooth warps the pattern term also resamples each
    /// batch through, in WaNet's units (about s/2 pixels of displacement; 0 turns them
    /// off). The arriving model is probed under warps of this strength.
    pub pattern_max_warp: f64,
    /// Amplitude of the gratings the arriving model is probed with…
    pub pattern_probe_amplitude: f64,
    /// …and the accuracy it may lose under them for the patterns to be used: more, and
    /// the clean task depends on what a grating changes.
    pub pattern_probe_tolerance: f64,
    pub recovery_epochs: usize,
    pub recovery_lr: f64,
    /// Most images of the test bundle, and of the poison bundle, that each epoch's trace
    /// entry measures (every label in proportion; 0: none). They only measure, so
    /// this trades the trace's precision against time: measuring whole test and poison
    /// bundles (1,600 and 1,443 images) after every epoch took 40% of a default scan. The
    /// before/after metrics always use every image.
    pub trace_samples: usize,
    /// For this many first purification epochs the trace also measures after every
    /// optimizer step, in entries of phase `purify_step` whose `at_epoch` says how many
    /// epochs of steps had run (0: off). It only measures: on the benchmark models
    /// purification removes most of a backdoor within its first two epochs, where
    /// whole epochs are too coarse to tell the penalties apart. At 5 (20 entries of
    /// 500 + 500 images) it took the grid's traced runs from 31 to 33 s on average.
    pub trace_step_epochs: usize,
    /// Settings of the baseline defenses, used only by their method.
    pub ft: FtConfig,
    pub fp: FpConfig,
    pub anp: AnpConfig,
    pub clp: ClpConfig,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            method: Method::BenignSalience,
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
            shortcut_ranking: true,
            regularizer: Regularizer::Ar,
            reg_strength: 10.0,
            purify_epochs: 40,
            purify_lr: 0.05,
            purify_lr_unnormalized: 0.025,
            purify_warmup_epochs: 3,
            purify_retry_drop: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            augment_shift: 2,
            prune_threshold: 0.05,
            distill_weight: 0.5,
            distill_temperature: 2.0,
            unlearn_weight: 1.0,
            // 0.1 names the target of two of three Blended and one of three Trojan
            // development models (seeds 103–105) that 0.07 missed (reached from 83–89% and
            // 49% of the images there), and still none on 12 clean development models of
            // three architectures on both datasets (the MNIST ones reached from at most 51%
            // at 0.1) or on the all-to-all ones.
            unlearn_radii: vec![0.02, 0.03, 0.05, 0.07, 0.1],
            unlearn_min_success: 0.9,
            unlearn_min_gap: 0.25,
            unlearn_min_local_gap: 0.2,
            unlearn_steps: 10,
            pattern_weight: 1.0,
            pattern_max_amplitude: 1.0,
            pattern_max_warp: 2.0,
            pattern_probe_amplitude: 0.1,
            pattern_probe_tolerance: 0.02,
            recovery_epochs: 10,
            recovery_lr: 0.01,
            trace_samples: 500,
            trace_step_epochs: 0,
            ft: FtConfig::default(),
            fp: FpConfig::default(),
            anp: AnpConfig::default(),
            clp: ClpConfig::default(),
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
        // Counts beyond these are typos or hostile, never settings: unchecked, the
        // largest ones overflowed step arithmetic (a panic), and an `augment_shift` near
        // i64::MAX crashed the process inside libtorch's padding.
        for (field, value, max) in [
            ("batch_size", self.batch_size, MAX_BATCH_SIZE),
            ("purify_epochs", self.purify_epochs, MAX_EPOCHS),
            (
                "purify_warmup_epochs",
                self.purify_warmup_epochs,
                MAX_EPOCHS,
            ),
            ("recovery_epochs", self.recovery_epochs, MAX_EPOCHS),
            ("ft.epochs", self.ft.epochs, MAX_EPOCHS),
            ("unlearn_steps", self.unlearn_steps, MAX_ITERATIONS),
            ("anp.iterations", self.anp.iterations, MAX_ITERATIONS),
            ("anp.batch_size", self.anp.batch_size, MAX_BATCH_SIZE),
            ("augment_shift", self.augment_shift, MAX_AUGMENT_SHIFT),
            ("trace_step_epochs", self.trace_step_epochs, MAX_EPOCHS),
        ] {
            if value > max {
                return bad(field, &format!("must be at most {max}"));
            }
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
        // The step bounds the candidate grid (each candidate is a held-out evaluation);
        // at 1e-12 its allocation alone aborted the process.
        if !(self.fraction_step >= MIN_FRACTION_STEP
            && self.fraction_step <= self.max_fraction
            && self.max_fraction < 1.0)
        {
            return bad(
                "fraction_step",
                &format!("need {MIN_FRACTION_STEP} <= fraction_step <= max_fraction < 1"),
            );
        }
        for (field, value) in [
            ("reg_strength", self.reg_strength),
            ("purify_lr", self.purify_lr),
            ("purify_lr_unnormalized", self.purify_lr_unnormalized),
            ("recovery_lr", self.recovery_lr),
            ("weight_decay", self.weight_decay),
            ("prune_threshold", self.prune_threshold),
            ("distill_weight", self.distill_weight),
            ("unlearn_weight", self.unlearn_weight),
            ("pattern_weight", self.pattern_weight),
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
        for (field, value) in [
            ("ft.lr", self.ft.lr),
            ("ft.weight_decay", self.ft.weight_decay),
            ("anp.mask_lr", self.anp.mask_lr),
            ("clp.u", self.clp.u),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return bad(field, "must be a finite non-negative number");
            }
        }
        if !(0.0..1.0).contains(&self.ft.momentum) {
            return bad("ft.momentum", "must lie in [0, 1)");
        }
        for (field, value) in [
            ("fp.acc_ratio", self.fp.acc_ratio),
            // A mask perturbation past ±1 flips neurons' signs; far past it, libtorch's
            // clamp bounds overflowed f32 (a panic).
            ("anp.eps", self.anp.eps),
            ("anp.alpha", self.anp.alpha),
            ("anp.prune_threshold", self.anp.prune_threshold),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return bad(field, "must lie in [0, 1]");
            }
        }
        if self.fp.channels_per_step == 0 {
            return bad("fp.channels_per_step", "must be at least 1");
        }
        if self.anp.batch_size < 2 {
            return bad("anp.batch_size", "must be at least 2");
        }
        for (field, value) in [
            ("unlearn_min_success", self.unlearn_min_success),
            ("unlearn_min_gap", self.unlearn_min_gap),
            ("unlearn_min_local_gap", self.unlearn_min_local_gap),
            ("pattern_max_amplitude", self.pattern_max_amplitude),
            ("pattern_probe_amplitude", self.pattern_probe_amplitude),
            ("pattern_probe_tolerance", self.pattern_probe_tolerance),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return bad(field, "must lie in [0, 1]");
            }
        }
        if !(-1.0..=1.0).contains(&self.purify_retry_drop) {
            return bad("purify_retry_drop", "must lie in [-1, 1]");
        }
        // Past 16 (about 8 pixels each way) a warp is no longer a faint trigger's scale.
        if !(0.0..=MAX_WARP).contains(&self.pattern_max_warp) {
            return bad("pattern_max_warp", &format!("must lie in [0, {MAX_WARP}]"));
        }
        // Each radius is a full perturbation search per class.
        if self.unlearn_radii.len() > MAX_UNLEARN_RADII
            || self
                .unlearn_radii
                .iter()
                .any(|r| !(r.is_finite() && *r > 0.0 && *r <= 1.0))
        {
            return bad(
                "unlearn_radii",
                &format!("must be at most {MAX_UNLEARN_RADII} numbers in (0, 1]"),
            );
        }
        if let Some(threads) = self.threads {
            // libtorch takes an i32 and refuses 0; anything past this is a typo.
            if !(1..=MAX_THREADS).contains(&threads) {
                return bad("threads", &format!("must lie in [1, {MAX_THREADS}]"));
            }
        }
        parse_device(&self.device)?;
        Ok(())
    }
}

/// Most libtorch threads a scan may ask for.
pub const MAX_THREADS: usize = 1024;
/// Most epochs of any training phase (the defaults run at most 40).
pub const MAX_EPOCHS: usize = 10_000;
/// Most gradient steps of a search or mask optimisation (the defaults run at most 2,000).
pub const MAX_ITERATIONS: usize = 1_000_000;
/// Largest batch (the default is 64); past it a batch of even small images outgrows
/// the memory a scan can count on.
pub const MAX_BATCH_SIZE: usize = 65_536;
/// Finest step of the suspect-fraction grid (at most 1,000 candidates).
pub const MIN_FRACTION_STEP: f64 = 1e-3;
/// Largest `pattern_max_warp` (WaNet strength units).
pub const MAX_WARP: f64 = 16.0;
/// Most perturbation radii a shortcut search tries.
pub const MAX_UNLEARN_RADII: usize = 16;
/// Largest random translation in pixels: past it most images of the sizes bdscan is used
/// on would be padding (the default is 2).
pub const MAX_AUGMENT_SHIFT: usize = 64;

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

/// Largest settings file read (a scan's JSON config, the server's TOML): real ones are
/// a few KiB.
pub const MAX_SETTINGS_FILE_BYTES: u64 = 1 << 20;

/// A settings file's text, refused past [`MAX_SETTINGS_FILE_BYTES`]: `--config` naming
/// the model (a mix-up with `--model`) or `/dev/zero` was read whole, or without end.
pub fn read_settings_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_SETTINGS_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SETTINGS_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_SETTINGS_FILE_BYTES} bytes; is this the settings file?"
        )));
    }
    Ok(text)
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
        assert_eq!(cfg.method, Method::BenignSalience);
        let cfg: ScanConfig =
            serde_json::from_str(r#"{"method": "anp", "anp": {"iterations": 5}}"#).unwrap();
        assert_eq!(cfg.method, Method::Anp);
        assert_eq!(cfg.anp.iterations, 5);
        assert_eq!(cfg.anp.eps, 0.4);
        assert!(serde_json::from_str::<ScanConfig>(r#"{"anp": {"epsilon": 1}}"#).is_err());
        assert!(serde_json::from_str::<ScanConfig>(r#"{"method": "nc"}"#).is_err());
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
        for threads in [0, MAX_THREADS + 1, 1 << 32] {
            let cfg = ScanConfig {
                threads: Some(threads),
                ..Default::default()
            };
            assert!(
                cfg.validate().unwrap_err().to_string().contains("threads"),
                "{threads}"
            );
        }
        for rate in [-0.01, f64::NAN, f64::INFINITY] {
            let cfg = ScanConfig {
                purify_lr_unnormalized: rate,
                ..Default::default()
            };
            let message = cfg.validate().unwrap_err().to_string();
            assert!(message.contains("`purify_lr_unnormalized`"), "{message}");
        }
        for warp in [-0.5, MAX_WARP + 1.0, f64::NAN, f64::INFINITY] {
            let cfg = ScanConfig {
                pattern_max_warp: warp,
                ..Default::default()
            };
            assert!(
                cfg.validate()
                    .unwrap_err()
                    .to_string()
                    .contains("pattern_max_warp"),
                "{warp}"
            );
        }
        for drop in [-1.5, 1.5, f64::NAN] {
            let cfg = ScanConfig {
                purify_retry_drop: drop,
                ..Default::default()
            };
            let refused = cfg.validate().unwrap_err().to_string();
            assert!(refused.contains("purify_retry_drop"), "{drop}: {refused}");
        }
        for drop in [-1.0, 0.0, 1.0] {
            let cfg = ScanConfig {
                purify_retry_drop: drop,
                ..Default::default()
            };
            assert!(cfg.validate().is_ok(), "{drop}");
        }
        for warp in [0.0, MAX_WARP] {
            let cfg = ScanConfig {
                pattern_max_warp: warp,
                ..Default::default()
            };
            assert!(cfg.validate().is_ok(), "{warp}");
        }
    }

    #[test]
    fn counts_past_their_limits_are_refused_naming_the_field() {
        type Setter = fn(&mut ScanConfig, usize);
        let cases: [(&str, Setter, usize); 10] = [
            ("batch_size", |c, v| c.batch_size = v, MAX_BATCH_SIZE),
            ("purify_epochs", |c, v| c.purify_epochs = v, MAX_EPOCHS),
            (
                "purify_warmup_epochs",
                |c, v| c.purify_warmup_epochs = v,
                MAX_EPOCHS,
            ),
            ("recovery_epochs", |c, v| c.recovery_epochs = v, MAX_EPOCHS),
            (
                "trace_step_epochs",
                |c, v| c.trace_step_epochs = v,
                MAX_EPOCHS,
            ),
            ("ft.epochs", |c, v| c.ft.epochs = v, MAX_EPOCHS),
            ("unlearn_steps", |c, v| c.unlearn_steps = v, MAX_ITERATIONS),
            (
                "anp.iterations",
                |c, v| c.anp.iterations = v,
                MAX_ITERATIONS,
            ),
            (
                "anp.batch_size",
                |c, v| c.anp.batch_size = v,
                MAX_BATCH_SIZE,
            ),
            (
                "augment_shift",
                |c, v| c.augment_shift = v,
                MAX_AUGMENT_SHIFT,
            ),
        ];
        for (field, set, max) in cases {
            let mut cfg = ScanConfig::default();
            set(&mut cfg, max);
            cfg.validate()
                .unwrap_or_else(|e| panic!("{field} at its limit: {e}"));
            for value in [max + 1, usize::MAX] {
                set(&mut cfg, value);
                let message = cfg.validate().unwrap_err().to_string();
                assert!(
                    message.contains(&format!("`{field}`")) && message.contains("at most"),
                    "{field} = {value}: {message}"
                );
            }
        }
    }

    #[test]
    fn values_that_crashed_or_hung_a_scan_are_refused() {
        let cases: [(&str, ScanConfig); 4] = [
            (
                "fraction_step",
                ScanConfig {
                    fraction_step: 1e-12,
                    ..Default::default()
                },
            ),
            (
                "anp.eps",
                ScanConfig {
                    anp: AnpConfig {
                        eps: 1e300,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            ),
            (
                "unlearn_radii",
                ScanConfig {
                    unlearn_radii: vec![0.01; MAX_UNLEARN_RADII + 1],
                    ..Default::default()
                },
            ),
            (
                "unlearn_radii",
                ScanConfig {
                    unlearn_radii: vec![1e300],
                    ..Default::default()
                },
            ),
        ];
        for (field, cfg) in cases {
            let message = cfg.validate().unwrap_err().to_string();
            assert!(message.contains(&format!("`{field}`")), "{message}");
        }
        let finest = ScanConfig {
            fraction_step: MIN_FRACTION_STEP,
            unlearn_radii: vec![1.0; MAX_UNLEARN_RADII],
            ..Default::default()
        };
        finest.validate().unwrap();
    }

    #[test]
    fn parses_devices() {
        assert_eq!(parse_device("cpu").unwrap(), tch::Device::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), tch::Device::Cuda(1));
        assert!(parse_device("cuda:x").is_err());
    }
}

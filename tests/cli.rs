//! The `bdscan scan` contract for bad input: each mistake is one line on stderr naming
//! the problem, exit code 2, never a panic. Runs the real binary on real files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bdscan::engine::bundle::{RawTensor, TensorDtype};
use common::*;

struct Outcome {
    code: i32,
    stderr: String,
}

fn scan(dir: &Path, model: &Path, clean: &Path, extra: &[&str]) -> Outcome {
    let out = Command::new(bdscan_bin())
        .arg("scan")
        .arg("--model")
        .arg(model)
        .arg("--clean")
        .arg(clean)
        .arg("--out")
        .arg(dir.join("out.pt"))
        .arg("--report")
        .arg(dir.join("report.json"))
        .args(["--threads", "1"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    Outcome::of(out)
}

impl Outcome {
    fn of(output: std::process::Output) -> Self {
        Outcome {
            code: output.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Asserts exit code 2 and a single `error:` line containing `needle`, with no panic.
fn assert_input_error(outcome: &Outcome, needle: &str) {
    assert_eq!(outcome.code, 2, "stderr: {}", outcome.stderr);
    assert!(!outcome.stderr.contains("panicked"), "{}", outcome.stderr);
    let errors: Vec<&str> = outcome
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "one error line expected: {}",
        outcome.stderr
    );
    assert!(
        errors[0].contains(needle),
        "expected `{needle}` in: {}",
        errors[0]
    );
}

fn mnist_model() -> std::path::PathBuf {
    fixture("models/mnist_cnn.pt")
}

fn bundle_case(name: &str, tensors: &[(&str, &RawTensor)], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.safetensors"));
    write_safetensors(&path, tensors);
    assert_input_error(&scan(dir.path(), &mnist_model(), &path, &[]), needle);
    let npz = dir.path().join(format!("{name}.npz"));
    write_npz(&npz, tensors);
    assert_input_error(&scan(dir.path(), &mnist_model(), &npz, &[]), needle);
}

#[test]
fn missing_images_or_labels() {
    bundle_case(
        "no_labels",
        &[("images", &u8_images(&[8, 1, 28, 28], 0))],
        "no `labels` tensor (found: images)",
    );
    bundle_case(
        "no_images",
        &[("labels", &labels(&[0; 8]))],
        "no `images` tensor",
    );
}

#[test]
fn wrong_rank() {
    bundle_case(
        "flat",
        &[
            ("images", &u8_images(&[8, 784], 0)),
            ("labels", &labels(&[0; 8])),
        ],
        "must be 4-D",
    );
}

#[test]
fn wrong_dtype() {
    let float_labels = f32_images(&[8], |_| 0.0);
    bundle_case(
        "float_labels",
        &[
            ("images", &u8_images(&[8, 1, 28, 28], 0)),
            ("labels", &float_labels),
        ],
        "expected int64",
    );
}

#[test]
fn count_mismatch() {
    bundle_case(
        "mismatch",
        &[
            ("images", &u8_images(&[8, 1, 28, 28], 0)),
            ("labels", &labels(&[0; 7])),
        ],
        "8 samples but `labels` holds 7",
    );
}

#[test]
fn empty_bundle() {
    bundle_case(
        "empty",
        &[
            ("images", &u8_images(&[0, 1, 28, 28], 0)),
            ("labels", &labels(&[])),
        ],
        "bundle is empty",
    );
}

#[test]
fn non_finite_pixels() {
    let images = f32_images(&[8, 1, 28, 28], |i| if i == 5 { f32::NAN } else { 0.5 });
    bundle_case(
        "nan",
        &[("images", &images), ("labels", &labels(&[0; 8]))],
        "NaN or infinite",
    );
}

#[test]
fn pixels_so_large_the_logits_overflow() {
    // Finite, so the bundle itself is valid; the model's logits are not. This used to
    // pass the checks and fail much later as an internal error (exit 3). Only the
    // sixth image is so large: every image is checked, not just the first few.
    let images = f32_images(&[8, 1, 28, 28], |i| if i / 784 == 5 { 3e38 } else { 0.5 });
    bundle_case(
        "huge",
        &[("images", &images), ("labels", &labels(&[0; 8]))],
        "the model's logits for sample 5 are NaN or infinite",
    );
}

#[test]
fn labels_outside_the_models_classes() {
    let mut values = vec![1i64; 8];
    values[6] = 10;
    bundle_case(
        "label10",
        &[
            ("images", &u8_images(&[8, 1, 28, 28], 0)),
            ("labels", &labels(&values)),
        ],
        "contains 10 at index 6",
    );
}

#[test]
fn images_the_model_rejects() {
    // Three-channel images for a one-channel conv net.
    bundle_case(
        "rgb",
        &[
            ("images", &u8_images(&[8, 3, 28, 28], 0)),
            ("labels", &labels(&[0; 8])),
        ],
        "the model rejects these images",
    );
}

#[test]
fn not_a_bundle_not_a_model_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"definitely not a tensor file").unwrap();
    assert_input_error(
        &scan(dir.path(), &mnist_model(), &junk, &[]),
        "not a .safetensors or .npz file",
    );

    let clean = dir.path().join("clean.safetensors");
    std::fs::write(&clean, mnist(16).to_safetensors()).unwrap();
    assert_input_error(
        &scan(dir.path(), &junk, &clean, &[]),
        "not a loadable TorchScript archive",
    );
    // Weights saved with torch.save: libtorch blamed a corrupted checkpoint.
    let state_dict =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny_mlp_state_dict.pt");
    assert_input_error(
        &scan(dir.path(), &state_dict, &clean, &[]),
        "written by torch.save: save the model as TorchScript",
    );
    // A model archive given as the bundle: its entries are named, but not all 30-odd.
    let outcome = scan(dir.path(), &mnist_model(), &mnist_model(), &[]);
    assert_input_error(&outcome, "more)");
    assert!(outcome.stderr.len() < 1000, "{}", outcome.stderr);
    assert_input_error(
        &scan(dir.path(), &dir.path().join("absent.pt"), &clean, &[]),
        "cannot read",
    );
    assert_input_error(
        &scan(
            dir.path(),
            &mnist_model(),
            &dir.path().join("absent.npz"),
            &[],
        ),
        "cannot read",
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.safetensors");
    std::fs::write(&clean, mnist(16).to_safetensors()).unwrap();
    // --poison needs --target-label unless the bundle holds `targets` (and the reverse).
    let outcome = scan(
        dir.path(),
        &mnist_model(),
        &clean,
        &["--poison", clean.to_str().unwrap()],
    );
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    let outcome = scan(dir.path(), &mnist_model(), &clean, &["--device", "tpu:0"]);
    assert_input_error(&outcome, "expected `cpu` or `cuda:N`");
    let outcome = scan(
        dir.path(),
        &mnist_model(),
        &clean,
        &["--poison", clean.to_str().unwrap(), "--target-label", "12"],
    );
    assert_input_error(&outcome, "target label 12");
    let bad_config = dir.path().join("config.json");
    for (config, field) in [
        (r#"{"purify_lr": -1}"#, "purify_lr"),
        // This one crashed the process inside libtorch (SIGSEGV) before it was bounded.
        (r#"{"augment_shift": 9223372036854775807}"#, "augment_shift"),
    ] {
        std::fs::write(&bad_config, config).unwrap();
        let args = ["--config", bad_config.to_str().unwrap()];
        assert_input_error(&scan(dir.path(), &mnist_model(), &clean, &args), field);
    }
    let status = Command::new(bdscan_bin())
        .arg("frobnicate")
        .output()
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(2));
    // A work folder that cannot be made (here: a file is in the way) was exit 3.
    let demo = Command::new(bdscan_bin())
        .args(["demo", "--work-dir"])
        .arg(&clean)
        .output()
        .unwrap();
    assert_input_error(&Outcome::of(demo), "--work-dir");
    // A folder that exists but takes no files failed after the training, as internal.
    let demo = Command::new(bdscan_bin())
        .args(["demo", "--work-dir", "/proc"])
        .output()
        .unwrap();
    assert_input_error(&Outcome::of(demo), "cannot write in /proc");
    // Flags the method does not use were ignored without a word.
    for (method, flags, needle) in [
        (
            "clp",
            ["--epochs", "5"],
            "--epochs does not apply to --method clp",
        ),
        (
            "ft",
            ["--regularizer", "l1"],
            "--regularizer does not apply to --method ft",
        ),
        (
            "benign_salience",
            ["--epochs", "10001"],
            "--epochs must be at most 10000",
        ),
        // Read without end before settings files had a size limit.
        (
            "benign_salience",
            ["--config", "/dev/zero"],
            "larger than 1048576 bytes",
        ),
    ] {
        let args = [&["--method", method][..], &flags[..]].concat();
        assert_input_error(&scan(dir.path(), &mnist_model(), &clean, &args), needle);
    }
    // A device the machine lacks was refused only after training the demo's model, and
    // its temporary folder stayed behind.
    let temp = tempfile::tempdir().unwrap();
    let demo = Command::new(bdscan_bin())
        .args(["demo", "--device", "cuda:63"])
        .env("TMPDIR", temp.path())
        .output()
        .unwrap();
    let trained = String::from_utf8_lossy(&demo.stdout).contains("training");
    assert_input_error(&Outcome::of(demo), "cuda:63");
    assert!(!trained, "the demo trained before refusing the device");
    assert_eq!(std::fs::read_dir(temp.path()).unwrap().count(), 0);
}

#[test]
fn a_failed_scan_leaves_no_artifact_or_report_behind() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.safetensors");
    write_safetensors(
        &clean,
        &[
            ("images", &u8_images(&[8, 3, 28, 28], 0)),
            ("labels", &labels(&[0; 8])),
        ],
    );
    let outcome = scan(dir.path(), &mnist_model(), &clean, &[]);
    assert_eq!(outcome.code, 2);
    assert!(!dir.path().join("out.pt").exists());
    assert!(!dir.path().join("report.json").exists());
}

/// Scripts a 4→3→2 MLP whose `forward` does `variant` (Python, run with the .venv torch).
fn odd_model(dir: &Path, name: &str, variant: &str) -> std::path::PathBuf {
    odd_model_with(dir, name, "pass", variant, "")
}

/// `odd_model`, with `init` run at the end of `__init__` and `methods` added to the class.
fn odd_model_with(
    dir: &Path,
    name: &str,
    init: &str,
    variant: &str,
    methods: &str,
) -> std::path::PathBuf {
    let script = format!(
        r#"
import sys, torch
from torch import nn
from typing import Dict
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)
        self.unused = nn.Linear(4, 4)
        {init}
    def forward(self, x):
        x = x.to(torch.float32).flatten(1)
        {variant}
{methods}
torch.manual_seed(0)
torch.jit.script(M()).save(sys.argv[1])
"#
    );
    scripted_model(dir, name, &script)
}

#[test]
fn models_that_break_differentiation_are_refused_or_scanned_but_never_crash() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.safetensors");
    let pixels: Vec<u8> = (0..40 * 4).map(|i| (i * 37 % 251) as u8).collect();
    let images = RawTensor::new("images", TensorDtype::U8, vec![40, 1, 2, 2], pixels).unwrap();
    let label_values: Vec<i64> = (0..40).map(|i| i % 2).collect();
    write_safetensors(
        &clean,
        &[("images", &images), ("labels", &labels(&label_values))],
    );
    let quick = dir.path().join("quick.json");
    std::fs::write(
        &quick,
        r#"{"purify_epochs": 1, "recovery_epochs": 1, "unlearn_steps": 1,
            "purify_warmup_epochs": 0, "anp": {"iterations": 2}}"#,
    )
    .unwrap();
    let config = ["--config", quick.to_str().unwrap()];
    // Detached logits: differentiating them crashed libtorch (SIGSEGV) under
    // `--method activation`; now the model is refused when it is loaded.
    let detached = odd_model(
        dir.path(),
        "detached",
        "return self.out(torch.relu(self.hidden(x))).detach()",
    );
    for method in ["benign_salience", "activation"] {
        let args = [&config[..], &["--method", method]].concat();
        assert_input_error(
            &scan(dir.path(), &detached, &clean, &args),
            "logits carry no gradient",
        );
    }
    // NaN logits (here from the forward; non-finite weights do the same) made every
    // accuracy and loss meaningless and failed late as an internal error.
    let nan_logits = odd_model(
        dir.path(),
        "nan_logits",
        "return self.out(torch.relu(self.hidden(x))) * float('nan')",
    );
    assert_input_error(
        &scan(dir.path(), &nan_logits, &clean, &config),
        "the model's logits for sample 0 are NaN or infinite",
    );
    // A submodule `forward` never calls has no gradient, and a model that ignores its
    // input gives the shortcut search none: both were internal errors (exit 3); they
    // are zeros, and the scan completes.
    let unused = odd_model(
        dir.path(),
        "unused",
        "return self.out(torch.relu(self.hidden(x)))",
    );
    let ignores_input = odd_model(
        dir.path(),
        "ignores_input",
        "return self.out(torch.relu(self.hidden(torch.ones_like(x))))",
    );
    for (model, method) in [
        (&unused, "benign_salience"),
        (&unused, "anp"),
        (&ignores_input, "benign_salience"),
    ] {
        let args = [&config[..], &["--method", method]].concat();
        let outcome = scan(dir.path(), model, &clean, &args);
        assert_eq!(outcome.code, 0, "{method} {model:?}: {}", outcome.stderr);
    }
}

#[test]
fn models_and_bundles_a_scan_cannot_use_are_refused_at_load_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let write_clean = |name: &str, label_of: fn(i64) -> i64| {
        let path = dir.path().join(name);
        let pixels: Vec<u8> = (0..40 * 4).map(|i| (i * 37 % 251) as u8).collect();
        let images = RawTensor::new("images", TensorDtype::U8, vec![40, 1, 2, 2], pixels).unwrap();
        let values: Vec<i64> = (0..40).map(label_of).collect();
        write_safetensors(&path, &[("images", &images), ("labels", &labels(&values))]);
        path
    };
    let clean = write_clean("clean.safetensors", |i| i % 2);
    let plain = "return self.out(torch.relu(self.hidden(x)))";
    // Each of these ran for a while and then failed as an internal error, or as a
    // divergence blamed on the learning rate.
    let cases = [
        (
            odd_model(dir.path(), "squeezed", &format!("{plain}.squeeze()")),
            "fails on a batch of one image",
        ),
        (
            odd_model(
                dir.path(),
                "batch_of_two",
                &format!("x = x.view(2, -1)\n        {plain}"),
            ),
            "fails on a batch of one image",
        ),
        (
            odd_model_with(
                dir.path(),
                "nan_unused_weight",
                "self.unused.weight.data[0, 0] = float('nan')",
                plain,
                "",
            ),
            "parameter `unused.weight` holds NaN or infinite values",
        ),
        (
            odd_model_with(
                dir.path(),
                "float8_parameter",
                "self.p = nn.Parameter(torch.zeros(4, dtype=torch.float8_e4m3fn), requires_grad=False)",
                plain,
                "",
            ),
            "parameter `p` is Float8e4m3fn; a scan needs float32",
        ),
        // A dtype newer than tch's: `Tensor::kind` panicked on it.
        (
            odd_model_with(
                dir.path(),
                "uint16_parameter",
                "self.p = nn.Parameter(torch.zeros(4, dtype=torch.uint16), requires_grad=False)",
                plain,
                "",
            ),
            "parameter `p` is of a dtype tch does not know",
        ),
        (
            odd_model_with(
                dir.path(),
                "empty_layer",
                "self.empty = nn.Linear(0, 4)",
                plain,
                "",
            ),
            "parameter `empty.weight` has shape [4, 0], which holds no values",
        ),
        // The model's own error, not libtorch's "The following operation failed in the
        // TorchScript interpreter." that precedes it.
        (
            odd_model(
                dir.path(),
                "raises",
                &format!(
                    "if x.size(0) < 1000:\n            \
                     raise ValueError(\"give me batches of 1000\")\n        {plain}"
                ),
            ),
            "the model rejects these images (shape [2, 1, 2, 2], dtype uint8): \
             builtins.ValueError: give me batches of 1000",
        ),
    ];
    for (model, reason) in &cases {
        assert_input_error(&scan(dir.path(), model, &clean, &[]), reason);
    }
    // A model that runs at load (eval mode, two images and one) and fails later, in its
    // own code: a client error naming the batch and the mode, not an internal one.
    let refuses_training = odd_model(
        dir.path(),
        "refuses_training",
        &format!("if self.training:\n            raise ValueError(\"eval only\")\n        {plain}"),
    );
    assert_input_error(
        &scan(dir.path(), &refuses_training, &clean, &[]),
        "images in training mode: builtins.ValueError: eval only",
    );
    let small_batches_only = odd_model(
        dir.path(),
        "small_batches_only",
        &format!(
            "if x.size(0) > 2:\n            raise ValueError(\"two at most\")\n        {plain}"
        ),
    );
    assert_input_error(
        &scan(dir.path(), &small_batches_only, &clean, &[]),
        "images in eval mode: builtins.ValueError: two at most",
    );
    // NaN only in training mode, which ANP's mask search runs the model in: a
    // divergence the caller can act on, as for every other method, not an internal error.
    let nan_in_training = odd_model(
        dir.path(),
        "nan_in_training",
        &format!("if self.training:\n            x = x * float('nan')\n        {plain}"),
    );
    let quick_anp = dir.path().join("quick_anp.json");
    std::fs::write(&quick_anp, r#"{"anp": {"iterations": 2}}"#).unwrap();
    assert_input_error(
        &scan(
            dir.path(),
            &nan_in_training,
            &clean,
            &["--method", "anp", "--config", quick_anp.to_str().unwrap()],
        ),
        "ANP's mask search loss stopped being a number at iteration 1",
    );
    // NaN activations flattened the `activation` ranking without a word.
    let nan_activations = odd_model_with(
        dir.path(),
        "nan_activations",
        "pass",
        plain,
        r#"
    @torch.jit.export
    def activations(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        h = torch.relu(self.hidden(x.to(torch.float32).flatten(1)))
        return {"hidden": h * float('nan')}"#,
    );
    assert_input_error(
        &scan(
            dir.path(),
            &nan_activations,
            &clean,
            &["--method", "activation"],
        ),
        "its `activations` entry `hidden` holds NaN or infinite values",
    );
    let one_class = write_clean("one_class.safetensors", |_| 1);
    let fine = odd_model(dir.path(), "fine", plain);
    assert_input_error(
        &scan(dir.path(), &fine, &one_class, &[]),
        "every sample is of class 1",
    );
}

#[test]
fn outputs_the_scan_could_not_write_are_refused_before_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.safetensors");
    write_safetensors(
        &clean,
        &[
            ("images", &u8_images(&[8, 1, 28, 28], 0)),
            ("labels", &labels(&[0; 8])),
        ],
    );
    let clean_bytes = std::fs::read(&clean).unwrap();
    let (o, r) = (dir.path().join("o.pt"), dir.path().join("r.json"));
    let missing = dir.path().join("missing");
    let config = dir.path().join("scan.json");
    std::fs::write(&config, "{}").unwrap();
    let cases: [(PathBuf, PathBuf, &str); 7] = [
        (missing.join("o.pt"), r.clone(), "does not exist"),
        (o.clone(), missing.join("r.json"), "does not exist"),
        // Found at the end, these failed the whole scan as internal errors, the first
        // leaving `<dir>.pt.partial` behind.
        (dir.path().to_path_buf(), r.clone(), "is a directory"),
        ("/proc/o.pt".into(), r.clone(), "cannot write in /proc"),
        // Accepted: one output overwrote the other, or the clean bundle.
        (
            o.clone(),
            o.clone(),
            "--out and --report name the same file",
        ),
        (o.clone(), clean.clone(), "--report names the --clean file"),
        (
            o.clone(),
            config.clone(),
            "--report names the --config file",
        ),
    ];
    for (out_path, report_path, needle) in cases {
        let out = Command::new(bdscan_bin())
            .args(["scan", "--model"])
            .arg(mnist_model())
            .arg("--clean")
            .arg(&clean)
            .arg("--out")
            .arg(&out_path)
            .arg("--report")
            .arg(&report_path)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert_input_error(&Outcome::of(out), needle);
        assert!(!o.exists() && !r.exists());
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "{}");
        let partial = dir.path().with_extension("pt.partial");
        assert!(!partial.exists());
        assert_eq!(std::fs::read(&clean).unwrap(), clean_bytes);
    }
}

#[test]
fn fine_tuning_that_overflows_the_weights_fails_as_the_callers_to_fix_and_writes_nothing() {
    // At this rate the last step turns the weights to NaN after the epoch's loss was
    // measured; the scan used to succeed and save a model of NaNs.
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.safetensors");
    let label_values: Vec<i64> = (0..40).map(|i| i % 10).collect();
    write_safetensors(
        &clean,
        &[
            ("images", &u8_images(&[40, 1, 28, 28], 7)),
            ("labels", &labels(&label_values)),
        ],
    );
    let config = dir.path().join("ft.json");
    std::fs::write(&config, r#"{"ft": {"lr": 1e300, "epochs": 1}}"#).unwrap();
    let args = ["--method", "ft", "--config", config.to_str().unwrap()];
    let outcome = scan(dir.path(), &mnist_model(), &clean, &args);
    // The rate is the caller's to lower: exit 2, like any other setting a scan cannot use.
    assert_input_error(&outcome, "training diverged: weights stopped being finite");
    assert!(!dir.path().join("out.pt").exists());
    assert!(!dir.path().join("report.json").exists());
}

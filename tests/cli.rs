//! The `bdscan scan` contract for bad input: each mistake is one line on stderr naming
//! the problem, exit code 2, never a panic. Runs the real binary on real files.

mod common;

use std::path::Path;
use std::process::Command;

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
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
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

fn bundle_case(name: &str, tensors: &[(&str, &bdscan::engine::bundle::RawTensor)], needle: &str) {
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

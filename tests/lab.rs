//! `bdscan lab` end to end: the real binary trains a small backdoored model and writes the
//! files a defender gets; `bdscan scan` accepts its all-to-all poison bundle (per-sample
//! `targets`, no --target-label). Also the `targets` round trip through `.npz`.

mod common;

use std::path::Path;
use std::process::Output;

use bdscan::engine::bundle::load_bundle;
use common::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The arguments of a one-thread `bdscan lab` run of a MNIST CNN with `flags` (attack,
/// epochs, …) written to `out`.
fn mnist_cnn_lab(flags: &[&str], out: &Path) -> Vec<String> {
    [
        "lab",
        "--dataset",
        "mnist",
        "--arch",
        "cnn",
        "--threads",
        "1",
    ]
    .iter()
    .chain(flags)
    .map(|arg| arg.to_string())
    .chain(["--out".to_string(), out.to_str().unwrap().to_string()])
    .collect()
}

fn lab_all_to_all(dir: &Path) -> Output {
    run_bdscan(&mnist_cnn_lab(
        &["--attack", "badnets", "--all-to-all", "--epochs", "1"],
        dir,
    ))
}

#[test]
fn lab_writes_model_bundles_and_meta_and_scan_reads_all_to_all_targets() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = lab_all_to_all(&run);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in [
        "model.pt",
        "clean.safetensors",
        "test.safetensors",
        "poison.safetensors",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    assert!(!run.join("architecture.pt").exists());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["dataset"], "mnist");
    assert_eq!(meta["arch"], "cnn");
    assert_eq!(meta["attack"]["name"], "badnets");
    assert_eq!(meta["attack"]["parameters"]["patch"], 3);
    assert_eq!(meta["all_to_all"], true);
    assert!(meta["target"].is_null());
    assert_eq!(meta["poison_rate"], 0.1);
    assert_eq!(meta["poisoned_samples"], 800);
    assert_eq!(meta["epochs"], 1);
    assert_eq!(meta["seed"], 0);
    assert_eq!(meta["bdscan_version"], env!("CARGO_PKG_VERSION"));
    let clean_acc = meta["clean_acc"].as_f64().unwrap();
    assert!(clean_acc > 0.8, "clean accuracy {clean_acc}");
    assert!(meta["asr"].as_f64().is_some());
    assert!(meta["train_seconds"].as_f64().unwrap() > 0.0);

    let clean = load_bundle(&run.join("clean.safetensors")).unwrap();
    assert_eq!(clean.len(), 400);
    let test = load_bundle(&run.join("test.safetensors")).unwrap();
    let poison = load_bundle(&run.join("poison.safetensors")).unwrap();
    assert_eq!(poison.len(), test.len());
    let targets = poison
        .targets
        .as_ref()
        .expect("all-to-all poison carries targets");
    assert!(poison
        .labels
        .iter()
        .zip(targets)
        .all(|(&l, &t)| t == (l + 1) % 10));

    // The same run again gives the same bundles (TorchScript archives carry a random id,
    // so the model is compared by its measured metrics).
    let again = dir.path().join("again");
    assert!(lab_all_to_all(&again).status.success());
    for file in ["clean.safetensors", "poison.safetensors"] {
        assert_eq!(
            std::fs::read(run.join(file)).unwrap(),
            std::fs::read(again.join(file)).unwrap()
        );
    }
    let meta_again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta_again["clean_acc"], meta["clean_acc"]);
    assert_eq!(meta_again["asr"], meta["asr"]);

    // `bdscan scan` takes the poison bundle without --target-label and measures ASR
    // against each sample's own target.
    let config = dir.path().join("quick.json");
    std::fs::write(&config, r#"{"purify_epochs": 1, "recovery_epochs": 1}"#).unwrap();
    let p = |f: &str| run.join(f).to_str().unwrap().to_string();
    let report = dir.path().join("report.json");
    let out = run_bdscan(&[
        "scan",
        "--model",
        &p("model.pt"),
        "--clean",
        &p("clean.safetensors"),
        "--test",
        &p("test.safetensors"),
        "--poison",
        &p("poison.safetensors"),
        "--out",
        dir.path().join("purified.pt").to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["metrics"]["before"]["asr"], meta["asr"]);
    assert!(report["inputs"]["target_label"].is_null());

    // A target label beside per-sample targets was silently ignored (any value, -1
    // included), leaving a report that named a target ASR was not measured against.
    for label in ["0", "-1"] {
        let refused = run_bdscan(&[
            "scan",
            "--model",
            &p("model.pt"),
            "--clean",
            &p("clean.safetensors"),
            "--poison",
            &p("poison.safetensors"),
            &format!("--target-label={label}"),
            "--out",
            dir.path().join("refused.pt").to_str().unwrap(),
            "--report",
            dir.path().join("refused.json").to_str().unwrap(),
            "--threads",
            "1",
        ]);
        assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
        let message = stderr(&refused);
        assert!(
            message.contains(&format!("leave out target label {label}")),
            "{message}"
        );
        assert!(!dir.path().join("refused.pt").exists());
    }
}

#[test]
fn a_lab_run_that_fails_leaves_nothing_and_takes_an_earlier_run_s_files_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    assert!(lab_all_to_all(&run).status.success());
    // A rerun into the same folder that diverges: before, the earlier run's model and
    // meta.json stayed beside this run's bundles, looking like one set.
    let out = run_bdscan(&mnist_cnn_lab(
        &["--attack", "blended", "--lr", "1e30", "--epochs", "1"],
        &run,
    ));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("diverged"), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(&run).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_folder_holding_someone_s_own_model_is_refused_not_emptied() {
    // Before, `--out` pointing at a folder with its own model.pt and bundles deleted them
    // as "an earlier run's files".
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.pt"), b"my model").unwrap();
    std::fs::write(dir.path().join("meta.json"), b"{\"mine\": true}").unwrap();
    let out = run_bdscan(&mnist_cnn_lab(
        &["--attack", "badnets", "--epochs", "1"],
        dir.path(),
    ));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("holds meta.json, model.pt without a lab run's meta.json"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(dir.path().join("model.pt")).unwrap(),
        b"my model"
    );
}

#[test]
fn lab_rejects_bad_flags_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--attack", "badnets", "--alpha", "0.3"],
            "--alpha does not apply to --attack badnets",
        ),
        (&["--attack", "sig", "--all-to-all"], "SIG is clean-label"),
        (&["--attack", "badnets", "--target", "12"], "--target 12"),
        (
            &["--attack", "badnets", "--poison-rate", "1.5"],
            "--poison-rate 1.5",
        ),
        // These three panicked or aborted the process before they were bounded.
        (
            &["--attack", "wanet", "--wanet-grid", "100000"],
            "--wanet-grid 100000 is larger than the dataset's 28×28 images",
        ),
        (
            &["--attack", "badnets", "--trigger-size", "29"],
            "--trigger-size 29",
        ),
        (
            &["--attack", "none", "--epochs", "18446744073709551615"],
            "--epochs must lie in [1, 10000]",
        ),
        // libtorch panicked past i32, overflowed its stack at 100000.
        (
            &["--attack", "badnets", "--threads", "4294967296"],
            "--threads must lie in [1, 1024]",
        ),
        // Read as an unknown flag `-0` before negative numbers were allowed.
        (
            &["--attack", "badnets", "--poison-rate", "-0.1"],
            "--poison-rate -0.1",
        ),
        // Accepted and ignored before.
        (
            &["--attack", "none", "--poison-rate", "0.2"],
            "--poison-rate does not apply to --attack none",
        ),
        (
            &["--attack", "badnets", "--all-to-all", "--target", "3"],
            "--target does not apply with --all-to-all",
        ),
        (
            &["--attack", "sig", "--sig-delta", "1e9"],
            "--sig-delta is in pixel levels out of 255",
        ),
        // Each of these left the images as they were, or clipped the trigger without a
        // word: a model trained on label noise, or on another trigger than asked for.
        (
            &["--attack", "sig", "--sig-frequency", "14"],
            "--sig-frequency 14 must be below half the image width (28/2)",
        ),
        (
            &["--attack", "blended", "--alpha", "0"],
            "--alpha must be a positive number, got 0",
        ),
        (
            &["--attack", "wanet", "--wanet-strength", "1e30"],
            "must be at most the image width (28 pixels)",
        ),
        (
            &["--attack", "badnets", "--trigger-size", "28"],
            "--trigger-size 28 is larger than the dataset's 28×28 images with its 1-pixel margin",
        ),
        (
            &["--attack", "dynamic", "--dynamic-region", "0"],
            "--dynamic-region must lie in [1, 23] for --trigger-size 5 on 28×28 images",
        ),
        (
            &["--attack", "badnets", "--poison-rate", "0.00005"],
            "--poison-rate 0.00005 poisons no training sample of this split",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "lab",
            "--dataset",
            "mnist",
            "--arch",
            "cnn",
            "--out",
            out_dir,
        ];
        args.extend_from_slice(extra);
        let out = run_bdscan(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.lines()
                .any(|l| l.starts_with("error:") && l.contains(needle)),
            "{needle}: {err}"
        );
    }
    let out = run_bdscan(&[
        "lab",
        "--dataset",
        "cifar",
        "--arch",
        "cnn",
        "--attack",
        "none",
        "--out",
        out_dir,
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn poison_targets_round_trip_through_npz() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poison.npz");
    let images = u8_images(&[3, 1, 2, 2], 9);
    // `labels()` builds any 1-D int64 array; its name in the file is the entry's name.
    let (label_values, targets) = (labels(&[0, 1, 2]), labels(&[1, 2, 0]));
    write_npz(
        &path,
        &[
            ("images", &images),
            ("labels", &label_values),
            ("targets", &targets),
        ],
    );
    let bundle = load_bundle(&path).unwrap();
    assert_eq!(bundle.targets, Some(vec![1, 2, 0]));
    let short = labels(&[1]);
    write_npz(
        &path,
        &[
            ("images", &images),
            ("labels", &label_values),
            ("targets", &short),
        ],
    );
    let err = load_bundle(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`images` holds 3 samples but `targets` holds 1"
    );
}

/// Ctrl-C (SIGINT) during training: the lab stops at its next step, removes the files it
/// had written (its bundles are written before the training) and exits 130. Before, the
/// process died at once and left the bundles without a model or `meta.json`.
#[test]
fn an_interrupted_lab_run_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let child = std::process::Command::new(bdscan_bin())
        .args(mnist_cnn_lab(
            &["--attack", "badnets", "--epochs", "200"],
            &run,
        ))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !run.join("test.safetensors").exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the lab wrote no bundle"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sent = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("kill -INT {}", child.id()))
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(&run).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

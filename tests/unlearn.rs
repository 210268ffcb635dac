//! Shortcut unlearning's target search on real lab models: on a BadNets `shapes` VGG
//! (target 0) a small universal perturbation reaches class 0 from nearly every clean image
//! and no other class comes close, so the search names it by reach; on the `shapes` ResNet
//! benign classes are nearly as easy to reach, and the target is named by locality; on
//! both architectures trained without poison no class stands out and nothing is
//! unlearnt. What the search finds also ranks the suspects: on a MNIST BadNets VGG they
//! then carry the backdoor. The search only ever sees the clean bundle; the last test
//! gives a poison bundle to measure what zeroing the suspects removes.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn assert_ran(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lab(dir: &Path, arch: &str, attack: &str, seed: &str) {
    lab_on("shapes", dir, arch, attack, seed)
}

fn lab_on(dataset: &str, dir: &Path, arch: &str, attack: &str, seed: &str) {
    assert_ran(&run_bdscan(&[
        "lab",
        "--dataset",
        dataset,
        "--arch",
        arch,
        "--attack",
        attack,
        "--seed",
        seed,
        "--threads",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]));
}

/// A scan with the shortest purification: the search runs before it, in full.
fn scan_clean_only(dir: &Path) -> Value {
    scan(dir, r#"{"purify_epochs": 1, "recovery_epochs": 1}"#, &[])
}

/// `scan_clean_only` with a config of its own and more arguments.
fn scan(dir: &Path, config_json: &str, more: &[&str]) -> Value {
    let config = dir.join("config.json");
    std::fs::write(&config, config_json).unwrap();
    let report = dir.join("report.json");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let mut args = vec![
        "scan".to_string(),
        "--model".into(),
        path("model.pt"),
        "--clean".into(),
        path("clean.safetensors"),
        "--config".into(),
        path("config.json"),
        "--threads".into(),
        "1".into(),
        "--out".into(),
        path("purified.pt"),
        "--report".into(),
        path("report.json"),
    ];
    args.extend(more.iter().map(|a| a.to_string()));
    assert_ran(&run_bdscan(&args));
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

#[test]
fn the_search_names_a_backdoors_target_and_nothing_on_a_clean_model() {
    let root = tempfile::tempdir().unwrap();
    let backdoored = root.path().join("badnets");
    lab(&backdoored, "vgg-bn", "badnets", "0");
    let report = scan_clean_only(&backdoored);
    let search = &report["shortcut_search"];
    assert_eq!(search["target"], 0, "{search}");
    assert_eq!(search["found_by"], "reach", "{search}");
    let success = per_class(search, "success_per_class");
    assert_eq!(success.len(), 10);
    assert!(success[0] >= 0.9, "{success:?}");
    assert!(
        success[1..].iter().all(|&s| s <= success[0] - 0.3),
        "{success:?}"
    );
    // Unlearning ran: every purification epoch records its perturbation's success.
    let trace = report["trace"].as_array().unwrap();
    assert!(trace
        .iter()
        .all(|t| t["shortcut_success"].as_f64().is_some()));
    // The patch search on the perturbation's support found a patch that, on the model
    // as it arrived, sends nearly every clean image to the target: the trigger's place.
    let first_patch = trace[0]["patch_success"].as_f64().unwrap();
    assert!(first_patch >= 0.9, "{}", trace[0]);

    let clean = root.path().join("none");
    lab(&clean, "vgg-bn", "none", "0");
    assert_no_target(&scan_clean_only(&clean));
}

fn assert_no_target(report: &Value) {
    assert!(
        report["shortcut_search"]["target"].is_null(),
        "{}",
        report["shortcut_search"]
    );
    assert!(report["trace"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["shortcut_success"].is_null() && t["patch_success"].is_null()));
}

fn per_class(search: &Value, key: &str) -> Vec<f64> {
    search[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn on_a_residual_network_the_target_is_named_by_the_locality_of_its_shortcut() {
    let root = tempfile::tempdir().unwrap();
    let backdoored = root.path().join("badnets");
    lab(&backdoored, "resnet", "badnets", "100");
    let report = scan_clean_only(&backdoored);
    let search = &report["shortcut_search"];
    assert_eq!(search["target"], 0, "{search}");
    assert_eq!(search["found_by"], "locality", "{search}");
    // Reach alone would not have named it: some benign class comes within 30 points.
    let success = per_class(search, "success_per_class");
    assert!(
        success[1..].iter().any(|&s| s > success[0] - 0.3),
        "{success:?}"
    );
    // The target's perturbation is the patch-like one.
    let locality = per_class(search, "locality_per_class");
    assert!(
        locality[1..].iter().all(|&l| l < locality[0]),
        "{locality:?}"
    );

    let clean = root.path().join("none");
    lab(&clean, "resnet", "none", "100");
    assert_no_target(&scan_clean_only(&clean));
}

/// On a MNIST BadNets VGG, clean salience alone flags neurons and weights the clean task
/// can spare, but zeroing them leaves a quarter of the backdoor's success; ranked
/// relative to the salience of the shortcut the search found, the suspects within the
/// same held-out budgets carry nearly all of it. The poison bundle only measures.
#[test]
fn ranked_relative_to_the_shortcut_the_suspects_carry_the_backdoor() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("mnist-badnets");
    lab_on("mnist", &dir, "vgg-bn", "badnets", "103");
    let poison = dir.join("poison.safetensors");
    let measured = [
        "--poison",
        poison.to_str().unwrap(),
        "--target-label",
        "0",
        "--seed",
        "103",
    ];
    let shortest = |ranking: bool| {
        format!(
            r#"{{"purify_epochs": 1, "recovery_epochs": 1, "trace_samples": 0,
                "shortcut_ranking": {ranking}}}"#
        )
    };
    let ranked = scan(&dir, &shortest(true), &measured);
    let plain = scan(&dir, &shortest(false), &measured);

    for report in [&ranked, &plain] {
        assert_eq!(
            report["shortcut_search"]["target"], 0,
            "{}",
            report["shortcut_search"]
        );
    }
    assert_eq!(ranked["selection"]["shortcut_target"], 0);
    assert!(plain["selection"].get("shortcut_target").is_none());
    for layer in ranked["layers"].as_array().unwrap() {
        let width = layer["width"].as_u64().unwrap();
        for field in ["shortcut_salience", "relative_salience"] {
            let scores = layer[field].as_array().unwrap();
            assert_eq!(scores.len() as u64, width, "{field}");
            assert!(scores.iter().all(|s| s.as_f64().unwrap() >= 0.0));
            assert!(scores.iter().any(|s| s.as_f64().unwrap() > 0.0));
        }
    }
    assert!(plain["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| { l.get("shortcut_salience").is_none() && l.get("relative_salience").is_none() }));

    let removed_asr = |r: &Value| r["suspects_removed"]["asr"].as_f64().unwrap();
    let asr_before = ranked["metrics"]["before"]["asr"].as_f64().unwrap();
    assert!(
        asr_before > 0.95,
        "the lab model must be backdoored: {asr_before}"
    );
    assert!(removed_asr(&plain) > 0.15, "{}", plain["suspects_removed"]);
    assert!(
        removed_asr(&ranked) < 0.05,
        "{}",
        ranked["suspects_removed"]
    );
    // And the model without them still does its clean task.
    let held_out = ranked["suspects_removed"]["held_out_acc"].as_f64().unwrap();
    assert!(
        held_out >= 0.9,
        "held-out accuracy with the suspects zeroed {held_out}"
    );
}

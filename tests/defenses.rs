//! The baseline defenses and the activation ablation on real libtorch: what each one
//! flags is checked by construction where possible, and every method runs through the
//! real binary on a BadNets-backdoored MNIST CNN.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bdscan::engine::anp::AnpSearch;
use bdscan::engine::archive::read_float_tensors;
use bdscan::engine::bundle::load_bundle;
use bdscan::engine::data::SampleSet;
use bdscan::engine::model::ScanModel;
use bdscan::engine::{run_scan, Method, Monitor, ScanConfig, ScanInputs, ScanReport};

use common::*;
use tch::{Device, Tensor};

fn scan(model: &Path, config: &ScanConfig, out: PathBuf) -> ScanReport {
    let files = demo_files();
    let inputs = ScanInputs {
        model: model.to_path_buf(),
        clean: files.clean.clone(),
        test: Some(files.test.clone()),
        poison: Some(files.poison.clone()),
        target_label: Some(files.target),
        out,
    };
    let mut on_progress = |_: &bdscan::engine::Progress| {};
    run_scan(&inputs, config, &mut Monitor::new(&mut on_progress, None)).unwrap()
}

fn clean_set() -> SampleSet {
    SampleSet::from_bundle(&load_bundle(&demo_files().clean).unwrap(), Device::Cpu).unwrap()
}

fn layer<'a>(report: &'a ScanReport, name: &str) -> &'a bdscan::engine::report::LayerReport {
    report.layers.iter().find(|l| l.name == name).unwrap()
}

#[test]
fn fixture_models_report_activations_for_every_hidden_layer() {
    let images = clean_set().images.narrow(0, 0, 5);
    for fixture_name in ["models/mnist_cnn_bn.pt", "models/mnist_cnn.pt"] {
        let model = ScanModel::load(&fixture(fixture_name), Device::Cpu, &images).unwrap();
        let activations = model.activations(&images, "test").unwrap();
        for layer in model.layers.iter().filter(|l| !l.is_classifier) {
            let (_, act) = activations
                .iter()
                .find(|(name, _)| *name == layer.name)
                .unwrap_or_else(|| panic!("{fixture_name}: no activations for {}", layer.name));
            assert_eq!(act.size(), vec![5, layer.width as i64]);
            // Post-ReLU means.
            assert!(act.min().double_value(&[]) >= 0.0);
        }
    }
}

#[test]
fn activation_methods_explain_what_a_model_without_activations_must_export() {
    let dir = tempfile::tempdir().unwrap();
    let model = scripted_model(
        dir.path(),
        "plain",
        "import sys, torch\n\
         class Plain(torch.nn.Module):\n\
         \x20   def __init__(self):\n\
         \x20       super().__init__()\n\
         \x20       self.hidden = torch.nn.Linear(784, 16)\n\
         \x20       self.out = torch.nn.Linear(16, 10)\n\
         \x20   def forward(self, x):\n\
         \x20       return self.out(torch.relu(self.hidden(x.float().flatten(1) / 255.0)))\n\
         torch.jit.script(Plain()).save(sys.argv[1])\n",
    );
    let files = demo_files();
    for method in ["fp", "activation"] {
        let out = Command::new(bdscan_bin())
            .args(["scan", "--model"])
            .arg(&model)
            .arg("--clean")
            .arg(&files.clean)
            .arg("--out")
            .arg(dir.path().join("out.pt"))
            .arg("--report")
            .arg(dir.path().join("r.json"))
            .args(["--method", method, "--threads", "1"])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "method `{method}` needs the model to export `activations(x) -> Dict[str, Tensor]`"
            )),
            "{stderr}"
        );
    }
}

#[test]
fn anp_mask_gradient_equals_autograd() {
    // tiny_mlp: hidden = relu(W x + b) (3 units, no BatchNorm), out = V hidden + c.
    let x = Tensor::from_slice(&[
        0.5f32, 1.0, -0.3, 0.8, 1.2, -0.7, 0.4, 0.1, 0.3, 0.9, 1.1, -0.2,
    ])
    .reshape([3, 1, 1, 4]);
    let labels = Tensor::from_slice(&[0i64, 1, 1]);
    let mut model = ScanModel::load(&fixture("models/tiny_mlp.pt"), Device::Cpu, &x).unwrap();
    let mut search = AnpSearch::new(&model).unwrap();
    assert_eq!(search.layers.len(), 1, "the classifier is not masked");
    let masks = Tensor::from_slice(&[0.9f32, 0.6, 0.3]);
    let scale_noise = Tensor::from_slice(&[0.2f32, -0.3, 0.1]);
    let shift_noise = Tensor::from_slice(&[-0.1f32, 0.4, 0.2]);
    search.masks[0] = masks.copy();
    search.scale_noise[0] = scale_noise.copy();
    search.shift_noise[0] = shift_noise.copy();
    let params: Vec<Tensor> = model
        .params
        .iter()
        .map(|p| p.tensor.detach().copy())
        .collect();
    let (w, b, v, c) = (&params[0], &params[1], &params[2], &params[3]);
    for perturbed in [false, true] {
        let ours = search
            .gradients(&mut model, &x, &labels, perturbed)
            .unwrap();
        let m = masks.copy().set_requires_grad(true);
        let xi = shift_noise.copy().set_requires_grad(true);
        let (coefficient, shift) = if perturbed {
            (&m + &scale_noise, &xi + 1.0)
        } else {
            (m.shallow_clone(), xi.zeros_like() + 1.0)
        };
        let hidden = (x
            .flatten(1, -1)
            .matmul(&(w * coefficient.unsqueeze(1)).tr())
            + b * shift)
            .relu();
        let logits = hidden.matmul(&v.tr()) + c;
        let loss = logits.cross_entropy_for_logits(&labels);
        let grads = Tensor::run_backward(&[&loss], &[&m, &xi], false, false);
        assert!((ours.loss - loss.double_value(&[])).abs() < 1e-6);
        assert!(
            ours.mask[0].allclose(&grads[0], 1e-5, 1e-6, false),
            "mask gradient {:?} vs autograd {:?}",
            ours.mask[0],
            grads[0]
        );
        if perturbed {
            let shift_grad = ours.shift_noise[0].as_ref().unwrap();
            assert!(shift_grad.allclose(&grads[1], 1e-5, 1e-6, false));
        }
    }
    // The search leaves the parameters as it found them.
    search.restore(&mut model).unwrap();
    for (p, saved) in model.params.iter().zip(&params) {
        assert!(p.tensor.equal(saved));
    }
}

#[test]
fn clp_flags_the_channel_whose_kernel_was_scaled_tenfold() {
    let files = demo_files();
    let dir = tempfile::tempdir().unwrap();
    // The lab's model was written by libtorch, not Python: its BatchNorm statistics must
    // be readable too, and they are trained (not the initial ones).
    let buffers = read_float_tensors(&files.backdoored_model).unwrap();
    let var = &buffers["features.5.running_var"];
    assert_eq!(var.size(), vec![32]);
    assert!(!var.equal(&var.ones_like()));

    let images = clean_set().images.narrow(0, 0, 2);
    let mut model = ScanModel::load(&files.backdoored_model, Device::Cpu, &images).unwrap();
    let conv = model
        .params
        .iter()
        .position(|p| p.name == "features.4.weight")
        .unwrap();
    tch::no_grad(|| {
        let _ = model.params[conv]
            .tensor
            .get(5)
            .f_mul_scalar_(10.0)
            .unwrap();
    });
    let edited = dir.path().join("edited.pt");
    model.save(&edited).unwrap();

    let config = ScanConfig {
        method: Method::Clp,
        threads: Some(1),
        ..Default::default()
    };
    let plain = scan(&files.backdoored_model, &config, dir.path().join("a.pt"));
    let report = scan(&edited, &config, dir.path().join("b.pt"));
    let (before, after) = (layer(&plain, "features.4"), layer(&report, "features.4"));
    assert!(after.flagged.contains(&5), "flagged {:?}", after.flagged);
    assert_eq!(after.pruned, after.flagged);
    assert_eq!(after.norm_after[5], 0.0);
    // UCLC is σ_max(W_k)·|γ_k|/sqrt(var_k + ε): scaling W_k scales it exactly.
    let ratio = after.benign_salience[5] / before.benign_salience[5];
    assert!((ratio - 10.0).abs() < 1e-3, "UCLC ratio {ratio}");
    assert!(
        layer(&report, "classifier.1").flagged.is_empty(),
        "CLP prunes convolutions only"
    );
    assert!(report.trace.is_empty(), "CLP does not fine-tune");
}

#[test]
fn fp_prunes_the_weakest_channels_of_the_last_conv_layer_until_its_stop_rule() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ScanConfig {
        method: Method::Fp,
        threads: Some(1),
        ..Default::default()
    };
    config.ft.epochs = 2;
    let report = scan(
        &demo_files().backdoored_model,
        &config,
        dir.path().join("fp.pt"),
    );
    let last = layer(&report, "features.4");
    for other in report.layers.iter().filter(|l| l.name != "features.4") {
        assert!(other.flagged.is_empty(), "{} flagged", other.name);
    }
    // The flagged channels are exactly the lowest-activation ones.
    let k = last.flagged.len();
    assert!(k > 0 && k < last.width);
    let mut order: Vec<usize> = (0..last.width).collect();
    order.sort_by(|&a, &b| {
        last.benign_salience[a]
            .total_cmp(&last.benign_salience[b])
            .then(a.cmp(&b))
    });
    let mut lowest = order[..k].to_vec();
    lowest.sort();
    assert_eq!(last.flagged, lowest);
    // The stop rule: every kept step stayed within acc_ratio; the one after did not.
    let baseline = report.selection.held_out_acc;
    let drop = |acc: f64| (acc - baseline).abs() / baseline;
    let trials = &report.selection.neuron_trials;
    for trial in &trials[..k] {
        assert!(drop(trial.held_out_acc) < config.fp.acc_ratio);
    }
    if let Some(next) = trials.get(k) {
        assert!(drop(next.held_out_acc) >= config.fp.acc_ratio);
    }
    // Pruned channels stay at zero through fine-tuning, which is traced per epoch.
    assert!(last.flagged.iter().all(|&c| last.norm_after[c] == 0.0));
    assert_eq!(report.trace.len(), 2);
    assert!(report.trace.iter().all(|t| t.asr.is_some()));
}

/// Every method through the real binary with short schedules: a complete report and an
/// artifact that loads.
#[test]
fn every_method_runs_through_the_cli() {
    let files = demo_files();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("short.json");
    std::fs::write(
        &config,
        r#"{"purify_epochs": 1, "recovery_epochs": 1, "ft": {"epochs": 1},
            "anp": {"iterations": 10}}"#,
    )
    .unwrap();
    let images = clean_set().images.narrow(0, 0, 2);
    for method in ["benign_salience", "activation", "ft", "fp", "anp", "clp"] {
        let out = dir.path().join(format!("{method}.pt"));
        let report_path = dir.path().join(format!("{method}.json"));
        let output = Command::new(bdscan_bin())
            .arg("scan")
            .args(["--model", files.backdoored_model.to_str().unwrap()])
            .args(["--clean", files.clean.to_str().unwrap()])
            .args([
                "--poison",
                files.poison.to_str().unwrap(),
                "--target-label",
                "0",
            ])
            .arg("--out")
            .arg(&out)
            .arg("--report")
            .arg(&report_path)
            .arg("--config")
            .arg(&config)
            .args(["--method", method, "--threads", "1"])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{method}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
        assert_eq!(json["config"]["method"], method);
        assert!(json["metrics"]["after"]["asr"].is_f64(), "{method}");
        assert!(json["der"].is_f64(), "{method}");
        for layer in json["layers"].as_array().unwrap() {
            let width = layer["width"].as_u64().unwrap() as usize;
            assert_eq!(layer["benign_salience"].as_array().unwrap().len(), width);
        }
        let trace = json["trace"].as_array().unwrap();
        let fine_tunes = matches!(method, "benign_salience" | "activation" | "ft" | "fp");
        assert_eq!(!trace.is_empty(), fine_tunes, "{method}: trace {trace:?}");
        // Only the methods that flag suspects and then purify them measure the model
        // without its suspects; the poison bundle was given, so ASR is measured too.
        let removed = &json["suspects_removed"];
        if matches!(method, "benign_salience" | "activation") {
            assert!(removed["asr"].is_f64(), "{method}: {removed}");
            assert!((0.0..=1.0).contains(&removed["held_out_acc"].as_f64().unwrap()));
        } else {
            assert!(removed.is_null(), "{method}: {removed}");
        }
        // The same two purify at a peak rate they report; the baselines have their own.
        let peak = &json["purify_peak_lr"];
        if matches!(method, "benign_salience" | "activation") {
            assert!(peak.as_f64().unwrap() > 0.0, "{method}: {peak}");
        } else {
            assert!(peak.is_null(), "{method}: {peak}");
        }
        // The same two purify with the pattern probe's decision; the baselines follow
        // their papers and have none.
        let probe = &json["pattern_probe"];
        if matches!(method, "benign_salience" | "activation") {
            assert!(probe["enabled"].is_boolean(), "{method}: {probe}");
            assert!(probe["patterned_acc"].as_f64().unwrap() <= 1.0);
        } else {
            assert!(probe.is_null(), "{method}: {probe}");
        }
        let reloaded = ScanModel::load(&out, Device::Cpu, &images).unwrap();
        assert_eq!(reloaded.num_classes, 10);
        assert_eq!(
            reloaded.parameters_sha256().unwrap(),
            json["artifact"]["parameters_sha256"].as_str().unwrap()
        );
    }
    let anp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("anp.json")).unwrap()).unwrap();
    let masks = anp["layers"][0]["benign_salience"].as_array().unwrap();
    assert!(masks
        .iter()
        .all(|m| (0.0..=1.0).contains(&m.as_f64().unwrap())));
}

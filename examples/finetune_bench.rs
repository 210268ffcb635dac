//! Fine-tuning throughput of the engine's training loop (`engine::training::fine_tune`)
//! on a TorchScript model, for comparison with benches/finetune_python.py on the same
//! model, data, batch size and thread count. Prints one JSON line.
//!
//! cargo run --release --example finetune_bench -- MODEL.pt SAMPLES BATCH THREADS EPOCHS [DEVICE]

use std::time::Instant;

use bdscan::engine::data::SampleSet;
use bdscan::engine::model::ScanModel;
use bdscan::engine::training::{fine_tune, FineTune, Schedule};
use bdscan::engine::{Monitor, Phase};
use rand::SeedableRng;

fn main() {
    // As every engine command of the CLI does (src/engine/allocator.rs).
    bdscan::engine::allocator::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let (model_path, samples, batch, threads, epochs, device_name) = match &args[..] {
        [_, m, s, b, t, e] => (m, s, b, t, e, "cpu"),
        [_, m, s, b, t, e, d] => (m, s, b, t, e, d.as_str()),
        _ => {
            eprintln!("usage: finetune_bench MODEL.pt SAMPLES BATCH THREADS EPOCHS [cpu|cuda:N]");
            std::process::exit(2);
        }
    };
    let device = bdscan::engine::config::parse_device(device_name).unwrap();
    let (samples, batch, threads, epochs): (usize, usize, i32, usize) = (
        samples.parse().unwrap(),
        batch.parse().unwrap(),
        threads.parse().unwrap(),
        epochs.parse().unwrap(),
    );
    tch::set_num_threads(threads);
    let bundle = bdscan::lab::demo::mnist_fixture().slice(0..samples);
    let data = SampleSet::from_bundle(&bundle, device).unwrap();
    let mut model =
        ScanModel::load(model_path.as_ref(), device, &data.images.narrow(0, 0, 2)).unwrap();
    let plan = |epochs| FineTune {
        distill: None,
        epochs,
        batch_size: batch,
        peak_lr: 0.01,
        schedule: Schedule::Constant,
        momentum: 0.9,
        weight_decay: 5e-4,
        augment_shift: 0,
        unlearn: None,
        patterns: None,
        phase: Phase::Train,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut quiet = |_: &bdscan::engine::Progress| {};
    let mut run = |epochs| {
        let started = Instant::now();
        fine_tune(
            &mut model,
            &data,
            &plan(epochs),
            &mut rng,
            &mut Monitor::new(&mut quiet, None),
            &mut |_, _, _| Ok(()),
            &mut |_, _, _| Ok(()),
        )
        .unwrap();
        // CUDA kernels run asynchronously: count them only once they have finished.
        if let tch::Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        started.elapsed().as_secs_f64()
    };
    run(1); // warm-up: allocator, first-call dispatch
    let seconds = run(epochs);
    let trained = (samples / batch * batch
        + if samples % batch >= 2 {
            samples % batch
        } else {
            0
        })
        * epochs;
    println!(
        "{{\"impl\": \"bdscan (Rust, tch)\", \"device\": \"{device_name}\", \"threads\": {threads}, \"batch\": {batch}, \"samples\": {samples}, \"epochs\": {epochs}, \"seconds\": {seconds:.3}, \"samples_per_second\": {:.1}}}",
        trained as f64 / seconds
    );
}

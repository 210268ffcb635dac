//! Helpers shared by the integration tests: fixture paths, bundle writers, the binary.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use bdscan::engine::bundle::{Bundle, RawTensor, TensorDtype};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub fn bdscan_bin() -> &'static str {
    env!("CARGO_BIN_EXE_bdscan")
}

/// Runs the real `bdscan` binary with `args` (quiet logs) and returns what it did.
pub fn run_bdscan<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    std::process::Command::new(bdscan_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// Runs the .venv Python with `args` and asserts it succeeded (its stderr otherwise).
pub fn run_python_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    let output = std::process::Command::new(python())
        .args(args)
        .output()
        .expect("python from .venv");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The Python of the project's virtualenv (torch installed), for checks that the
/// artifacts load in PyTorch itself.
pub fn python() -> PathBuf {
    std::env::var_os("BDSCAN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

/// Runs `script` (Python that saves a scripted model to `sys.argv[1]`) and returns where
/// it saved it, `dir/name.pt`. From a file, not `python -c`: TorchScript reads a class's
/// source back.
pub fn scripted_model(dir: &Path, name: &str, script: &str) -> PathBuf {
    let model = dir.join(format!("{name}.pt"));
    let source = dir.join(format!("{name}.py"));
    std::fs::write(&source, script).unwrap();
    run_python_ok(&[source.as_os_str(), model.as_os_str()]);
    model
}

pub fn u8_images(shape: &[usize], value: u8) -> RawTensor {
    RawTensor::new(
        "images",
        TensorDtype::U8,
        shape.to_vec(),
        vec![value; shape.iter().product()],
    )
    .unwrap()
}

pub fn f32_images(shape: &[usize], values: impl Fn(usize) -> f32) -> RawTensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| values(i).to_le_bytes()).collect();
    RawTensor::new("images", TensorDtype::F32, shape.to_vec(), data).unwrap()
}

pub fn labels(values: &[i64]) -> RawTensor {
    RawTensor::new(
        "labels",
        TensorDtype::I64,
        vec![values.len()],
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
    .unwrap()
}

/// A `.safetensors` file with exactly the given named arrays (valid or not as a bundle).
pub fn write_safetensors(path: &Path, tensors: &[(&str, &RawTensor)]) {
    use safetensors::tensor::{Dtype, TensorView};
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, t)| {
            let dtype = match t.dtype {
                TensorDtype::U8 => Dtype::U8,
                TensorDtype::F32 => Dtype::F32,
                TensorDtype::I64 => Dtype::I64,
            };
            (
                name.to_string(),
                TensorView::new(dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn npy_bytes(t: &RawTensor) -> Vec<u8> {
    let mut out = npy_header(t.dtype, &t.shape);
    out.extend(&t.data);
    out
}

/// The `.npy` header of an array of `dtype` and `shape`: what precedes its data.
fn npy_header(dtype: TensorDtype, shape: &[usize]) -> Vec<u8> {
    let descr = match dtype {
        TensorDtype::U8 => "|u1",
        TensorDtype::F32 => "<f4",
        TensorDtype::I64 => "<i8",
    };
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out
}

/// A compressed `.npz` of `n` all-zero float32 images of `image` (C, H, W) and labels 0:
/// a file of about a thousandth of what it inflates to, written without holding it.
pub fn write_zeros_npz(path: &Path, n: usize, image: [usize; 3]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    let shape = [n, image[0], image[1], image[2]];
    zip.start_file("images.npy", options).unwrap();
    zip.write_all(&npy_header(TensorDtype::F32, &shape))
        .unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = shape.iter().product::<usize>() * 4;
    while left > 0 {
        let now = left.min(chunk.len());
        zip.write_all(&chunk[..now]).unwrap();
        left -= now;
    }
    zip.start_file("labels.npy", options).unwrap();
    zip.write_all(&npy_header(TensorDtype::I64, &[n])).unwrap();
    zip.write_all(&vec![0u8; n * 8]).unwrap();
    zip.finish().unwrap();
}

/// A deflate-compressed `.npz` with the given arrays, as `np.savez_compressed` writes.
pub fn write_npz(path: &Path, tensors: &[(&str, &RawTensor)]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, t) in tensors {
        zip.start_file(format!("{name}.npy"), options).unwrap();
        zip.write_all(&npy_bytes(t)).unwrap();
    }
    zip.finish().unwrap();
}

/// The first `n` digits of the committed MNIST fixture as a bundle.
pub fn mnist(n: usize) -> Bundle {
    bdscan::lab::demo::mnist_fixture().slice(0..n)
}

struct Demo {
    files: bdscan::lab::demo::DemoFiles,
    _dir: tempfile::TempDir,
}

/// The demo's backdoored MNIST model and bundles, trained once per test binary (a few
/// seconds) and shared by its tests.
pub fn demo_files() -> &'static bdscan::lab::demo::DemoFiles {
    static DEMO: std::sync::OnceLock<Demo> = std::sync::OnceLock::new();
    &DEMO
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let mut on_progress = |_: &bdscan::engine::Progress| {};
            let files = bdscan::lab::demo::prepare(
                dir.path(),
                bdscan::lab::demo::MNIST_CNN_BN,
                0,
                &mut bdscan::engine::Monitor::new(&mut on_progress, None),
            )
            .unwrap();
            Demo { files, _dir: dir }
        })
        .files
}

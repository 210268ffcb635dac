//! Finds the libtorch that torch-sys links against, so that
//! - the binaries carry an rpath to it and run without LD_LIBRARY_PATH, and
//! - reports can name the libtorch version (BDSCAN_LIBTORCH_VERSION), and
//! - a CUDA libtorch's `libtorch_cuda` is really loaded (see below).
//!
//! Mirrors torch-sys's own lookup: `LIBTORCH`, else `LIBTORCH_USE_PYTORCH` with Python.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    // Migrations are embedded at compile time by sqlx::migrate!.
    println!("cargo:rerun-if-changed=migrations");
    for var in ["LIBTORCH", "LIBTORCH_USE_PYTORCH", "PYTHON_SYS_EXECUTABLE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let torch_dir = env::var_os("LIBTORCH").map(PathBuf::from).or_else(|| {
        env::var_os("LIBTORCH_USE_PYTORCH")?;
        let python = env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into());
        let out = Command::new(python)
            .args([
                "-c",
                "import os, torch; print(os.path.dirname(torch.__file__))",
            ])
            .output()
            .ok()?;
        Some(PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()))
    });
    let mut version = "unknown".to_string();
    // Where libtorch's libraries are (empty if not found), for the test that checks the
    // CUDA library is loaded.
    let mut lib_dir = String::new();
    if let Some(dir) = torch_dir {
        let lib = dir.join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        lib_dir = lib.display().to_string();
        // torch-sys names torch_cuda on the link line, but nothing of ours calls into it
        // directly, so the linker's --as-needed dropped it: the binaries then never
        // loaded it, libtorch registered no CUDA backend, and `cuda:0` counted zero
        // devices even on a GPU machine. Keep it as a dependency so CUDA builds see GPUs.
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-search=native={}", lib.display());
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
        // The PyPI wheel has version.py; a libtorch zip has build-version.
        if let Ok(text) = std::fs::read_to_string(dir.join("version.py")) {
            if let Some(line) = text.lines().find(|l| l.starts_with("__version__")) {
                version = line
                    .split(['\'', '"'])
                    .nth(1)
                    .unwrap_or("unknown")
                    .to_string();
            }
        } else if let Ok(text) = std::fs::read_to_string(dir.join("build-version")) {
            version = text.trim().to_string();
        }
    }
    println!("cargo:rustc-env=BDSCAN_LIBTORCH_VERSION={version}");
    println!("cargo:rustc-env=BDSCAN_LIBTORCH_LIB={lib_dir}");
}

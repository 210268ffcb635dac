//! The child-process side of a job: `bdscan job --spec FILE`.
//!
//! libtorch runs in a process of its own so that a crash (a segfault or abort inside
//! C++) fails one job instead of the server. The protocol with the worker:
//! - stdin: closing it asks the scan to stop at its next step;
//! - stdout: one JSON object per progress step, `{"phase":…,"step":…,"total":…}`;
//! - files: the report and the purified model on success, a [`ChildError`] otherwise;
//! - exit code: 0 done, 2 bad input or settings (training diverged included), 3 internal
//!   failure, 4 cancelled.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::sandbox::{confine, Confined, Confinement};
use crate::engine::{run_scan, EngineError, Monitor, Progress, ScanConfig, ScanInputs};

pub const EXIT_OK: u8 = 0;
pub const EXIT_INPUT: u8 = 2;
pub const EXIT_INTERNAL: u8 = 3;
pub const EXIT_CANCELLED: u8 = 4;

/// The job error code of a scan that needed more memory than `job_memory_limit`.
pub const MEMORY_LIMIT_CODE: &str = "memory_limit";
/// The job error code of a scan refused memory with no `job_memory_limit` applying (none
/// set, or a CUDA slot): the machine or the device ran out.
pub const OUT_OF_MEMORY_CODE: &str = "out_of_memory";

/// Everything the child needs, written by the worker as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub model: PathBuf,
    pub clean: PathBuf,
    pub test: Option<PathBuf>,
    pub poison: Option<PathBuf>,
    pub target_label: Option<i64>,
    pub config: ScanConfig,
    /// Most private writable memory the child may map (RLIMIT_DATA), set before it
    /// reads anything; `None`: the limit it inherited.
    #[serde(default)]
    pub memory_limit: Option<u64>,
    /// How the child confines itself before it opens the model; `None`: not at all.
    #[serde(default)]
    pub confinement: Option<Confinement>,
    /// Where to write the purified model, the report and (on failure) the error.
    pub artifact: PathBuf,
    pub report: PathBuf,
    pub error: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressLine {
    pub phase: String,
    pub step: u64,
    pub total: u64,
}

/// Runs the job described by `spec_path`; returns the exit code.
pub fn run_job_process(spec_path: &Path) -> u8 {
    let spec: JobSpec = match std::fs::read_to_string(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("error: job spec {}: {e}", spec_path.display());
            return EXIT_INTERNAL;
        }
    };
    if let Some(limit) = spec.memory_limit {
        if let Err(e) = limit_data_memory(limit) {
            eprintln!("error: setting the job's memory limit: {e}");
            return EXIT_INTERNAL;
        }
    }
    // Before any other thread starts (libtorch's pools, the stdin watcher), so that
    // every one of them is confined too.
    if let Some(confinement) = &spec.confinement {
        match confine(confinement) {
            Ok(Confined::Fully) => {}
            Ok(Confined::Partly) => {
                eprintln!("warning: this kernel's Landlock enforces only part of the job's sandbox")
            }
            Ok(Confined::Not) => eprintln!(
                "warning: no Landlock on this kernel: the job runs under the seccomp filter \
                 only, not confined to its folder"
            ),
            Err(e) => {
                // Said in the job's error, not only on stderr: every job on this machine
                // fails the same way until the sandbox works or is turned off.
                let error = ChildError {
                    code: "internal".into(),
                    message: format!(
                        "confining the job's process: {e} (BDSCAN_JOB_SANDBOX=false runs jobs unconfined)"
                    ),
                };
                eprintln!("error: {}", error.message);
                write_error(&spec.error, &error);
                return EXIT_INTERNAL;
            }
        }
    }
    if let Some(threads) = spec.config.threads {
        tch::set_num_threads(threads as i32);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // The worker closes our stdin to cancel; so does its death.
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        flag.store(true, Ordering::Relaxed);
    });
    let inputs = ScanInputs {
        model: spec.model.clone(),
        clean: spec.clean.clone(),
        test: spec.test.clone(),
        poison: spec.poison.clone(),
        target_label: spec.target_label,
        out: spec.artifact.clone(),
    };
    let mut stdout = std::io::stdout().lock();
    let mut on_progress = |p: &Progress| {
        let line = ProgressLine {
            phase: p.phase.as_str().to_string(),
            step: p.step,
            total: p.total,
        };
        if let Ok(json) = serde_json::to_string(&line) {
            let _ = writeln!(stdout, "{json}");
            let _ = stdout.flush();
        }
    };
    let outcome = run_scan(
        &inputs,
        &spec.config,
        &mut Monitor::new(&mut on_progress, Some(&cancel)),
    )
    .and_then(|report| {
        let json =
            serde_json::to_string(&report).map_err(|e| EngineError::Internal(e.to_string()))?;
        let neurons = report.layers.iter().map(|layer| layer.width).sum();
        report_fits(&json, neurons, super::worker::MAX_REPORT_BYTES)?;
        std::fs::write(&spec.report, json)
            .map_err(|e| EngineError::Internal(format!("writing the report: {e}")))
    });
    let (exit, error) = match outcome {
        Ok(()) => return EXIT_OK,
        // Checked first: libtorch's refusal can surface as any kind of error (the model
        // rejecting the probe images, its forward failing, an internal failure in
        // training). Not ours to fix either way: the caller can ask for less (a smaller
        // `batch_size`) or run it where more memory is free.
        Err(e) if is_out_of_memory(&e.to_string()) => (
            EXIT_INPUT,
            match spec.memory_limit {
                Some(limit) => ChildError {
                    code: MEMORY_LIMIT_CODE.into(),
                    message: memory_limit_message(limit, &e.to_string()),
                },
                None => ChildError {
                    code: OUT_OF_MEMORY_CODE.into(),
                    message: out_of_memory_message(&e.to_string()),
                },
            },
        ),
        Err(EngineError::Cancelled) => (
            EXIT_CANCELLED,
            ChildError {
                code: "cancelled".into(),
                message: "scan cancelled".into(),
            },
        ),
        Err(e @ EngineError::InvalidInput(_)) => (
            EXIT_INPUT,
            ChildError {
                code: "invalid_input".into(),
                message: e.to_string(),
            },
        ),
        Err(e @ EngineError::Diverged(_)) => (
            EXIT_INPUT,
            ChildError {
                code: "diverged".into(),
                message: e.to_string(),
            },
        ),
        Err(e) => (
            EXIT_INTERNAL,
            ChildError {
                code: "internal".into(),
                message: e.to_string(),
            },
        ),
    };
    write_error(&spec.error, &error);
    exit
}

/// Refuses a report larger than the server reads back (a model with hundreds of
/// thousands of neurons: each has a few numbers in it) as the model's size, not as a
/// job that ended without usable outputs (`internal`).
fn report_fits(json: &str, neurons: usize, limit: u64) -> Result<(), EngineError> {
    if json.len() as u64 <= limit {
        return Ok(());
    }
    Err(EngineError::InvalidInput(format!(
        "model: its report would be {} bytes ({neurons} neurons in its scanned layers), \
         over the {limit} bytes this server stores for a job",
        json.len()
    )))
}

/// Leaves `error` where the worker reads why the job failed. Best effort: if even this
/// fails, the worker reports the exit code and the stderr tail instead.
fn write_error(path: &Path, error: &ChildError) {
    if let Ok(json) = serde_json::to_string(error) {
        let _ = std::fs::write(path, json);
    }
}

/// Caps the private writable memory this process may map (heap, anonymous `mmap`s,
/// thread stacks: RLIMIT_DATA), so that a model allocating without end gets an
/// allocation error, which the scan reports, instead of driving the machine into the
/// kernel's OOM killer. Read-only mappings (libtorch's code) do not count, unlike under
/// RLIMIT_AS.
fn limit_data_memory(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct it is given and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether an error is an allocation refused: libtorch's CPU allocator, C++'s `new`
/// (which TorchScript's interpreter reports as `RuntimeError: std::bad_alloc`), or
/// libtorch's CUDA caching allocator (`CUDA out of memory. Tried to allocate …`,
/// raised as `torch.OutOfMemoryError` inside TorchScript), or cuBLAS and cuDNN failing
/// to allocate their workspace.
pub fn is_out_of_memory(message: &str) -> bool {
    message.contains("can't allocate memory")
        || message.contains("not enough memory")
        || message.contains("std::bad_alloc")
        || message.contains("CUDA out of memory")
        || message.contains("OutOfMemoryError")
        || message.contains("CUBLAS_STATUS_ALLOC_FAILED")
        || message.contains("CUDNN_STATUS_ALLOC_FAILED")
}

/// What a job refused memory with no limit applying reports, then what failed.
pub fn out_of_memory_message(failure: &str) -> String {
    format!("the scan ran out of memory (a smaller batch_size needs less): {failure}")
}

/// What a job that ran out of its memory limit reports: the limit, then what failed.
pub fn memory_limit_message(limit: u64, failure: &str) -> String {
    format!(
        "the scan needed more memory than this server allows a job (job_memory_limit \
         = {limit} bytes): {failure}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_failures_of_every_allocator_are_out_of_memory() {
        for message in [
            "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes.",
            "RuntimeError: std::bad_alloc",
            "CUDA out of memory. Tried to allocate 2.00 GiB",
            "torch.OutOfMemoryError: CUDA out of memory.",
            "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
            "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        ] {
            assert!(is_out_of_memory(message), "{message}");
        }
        for message in [
            "CUDA error: an illegal memory access was encountered",
            "builtins.ValueError: eval only",
        ] {
            assert!(!is_out_of_memory(message), "{message}");
        }
    }

    #[test]
    fn a_report_over_the_servers_limit_is_the_models_size_not_an_internal_error() {
        assert!(report_fits("{}", 3, 2).is_ok());
        let err = report_fits("{\"a\":1}", 900_000, 2).unwrap_err();
        assert!(err.is_client_error());
        assert_eq!(
            err.to_string(),
            "model: its report would be 7 bytes (900000 neurons in its scanned layers), \
             over the 2 bytes this server stores for a job"
        );
    }
}

//! The job child's sandbox (Landlock): what a confined process can and cannot do, probed
//! from a process of this test binary that confines itself, and the real `bdscan job`
//! child refusing an input outside its folder. Linux only, and skipped where the kernel
//! has no Landlock (the server then warns at start that jobs run unconfined).
#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use bdscan::server::child::JobSpec;
use bdscan::server::sandbox::{confine, kernel_support, Confinement};

const PROBE_DIR: &str = "BDSCAN_SANDBOX_PROBE_WORK_DIR";

/// Each probe's outcome: "ok", or "denied: <error>".
type Outcomes = BTreeMap<String, String>;

/// Runs `probe_entry` of this binary in a process of its own, confined as asked (or not
/// at all), and returns what each probe did.
fn probe(work: &Path, secret: &Path, port: u16, confinement: Option<bool>) -> Outcomes {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["probe_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(PROBE_DIR, work)
        .env("BDSCAN_SANDBOX_PROBE_SECRET", secret)
        .env("BDSCAN_SANDBOX_PROBE_PORT", port.to_string())
        .env(
            "BDSCAN_SANDBOX_PROBE_MODE",
            match confinement {
                None => "off",
                Some(true) => "restrict_reads",
                Some(false) => "open_reads",
            },
        );
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        // The harness prints "test probe_entry ... " ahead of the first line.
        .filter_map(|line| line.split_once("PROBE ").map(|(_, probe)| probe))
        .filter_map(|line| line.split_once(' '))
        .map(|(name, outcome)| (name.to_string(), outcome.to_string()))
        .collect()
}

/// Not a test of its own: the body of the probe process `probe` starts, which does
/// nothing when run by the harness (no probe directory in its environment).
#[test]
fn probe_entry() {
    let Some(work) = std::env::var_os(PROBE_DIR) else {
        return;
    };
    let work = std::path::PathBuf::from(work);
    let secret = std::path::PathBuf::from(std::env::var_os("BDSCAN_SANDBOX_PROBE_SECRET").unwrap());
    let port: u16 = std::env::var("BDSCAN_SANDBOX_PROBE_PORT")
        .unwrap()
        .parse()
        .unwrap();
    let mode = std::env::var("BDSCAN_SANDBOX_PROBE_MODE").unwrap();
    if mode != "off" {
        let confined = confine(&Confinement {
            work_dir: work.clone(),
            restrict_reads: mode == "restrict_reads",
        })
        .unwrap();
        println!("PROBE confined {confined:?}");
    }
    let report = |name: &str, outcome: std::io::Result<()>| match outcome {
        Ok(()) => println!("PROBE {name} ok"),
        Err(e) => println!("PROBE {name} denied: {e}"),
    };
    let read = |path: &Path| std::fs::read(path).map(drop);
    report("read_work", read(&work.join("input.txt")));
    report(
        "write_work",
        std::fs::write(work.join("output.txt"), b"result"),
    );
    report("read_secret", read(&secret.join("secret.txt")));
    report(
        "write_secret",
        std::fs::write(secret.join("planted.txt"), b"x"),
    );
    report("read_proc_cpuinfo", read(Path::new("/proc/cpuinfo")));
    let parent = std::os::unix::process::parent_id();
    report(
        "read_parent_environ",
        read(Path::new(&format!("/proc/{parent}/environ"))),
    );
    // Signal 0 checks the right to signal without sending anything.
    // SAFETY: kill with signal 0 only checks permissions.
    let signalled = unsafe { libc::kill(parent as libc::pid_t, 0) };
    report("signal_parent", os_result(signalled == 0));
    report(
        "execute",
        Command::new("/bin/sh")
            .args(["-c", "true"])
            .status()
            .map(drop),
    );
    report(
        "connect_tcp",
        std::net::TcpStream::connect(("127.0.0.1", port)).map(drop),
    );
    report(
        "rename_work",
        std::fs::write(work.join("model.pt.partial"), b"weights")
            .and_then(|()| std::fs::rename(work.join("model.pt.partial"), work.join("model.pt"))),
    );
    // Kinds of file the server would trip over when it reads the job's outputs.
    report(
        "make_symlink",
        std::os::unix::fs::symlink(secret.join("secret.txt"), work.join("purified.pt")),
    );
    let fifo = std::ffi::CString::new(
        work.join("report.json")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which lives until it returns.
    let made = unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) };
    report("make_fifo", os_result(made == 0));
    report(
        "connect_unix",
        std::os::unix::net::UnixStream::connect(secret.join("server.sock")).map(drop),
    );
    report("udp", std::net::UdpSocket::bind("127.0.0.1:0").map(drop));
    // SAFETY: setsid takes no arguments; the probe process is not a group leader.
    let session = unsafe { libc::setsid() };
    report("new_session", os_result(session >= 0));
    // SAFETY: the forked copy only calls _exit; the parent reaps it.
    let forked = unsafe { libc::fork() };
    if forked == 0 {
        unsafe { libc::_exit(0) };
    }
    if forked > 0 {
        unsafe { libc::waitpid(forked, std::ptr::null_mut(), 0) };
    }
    report("fork", os_result(forked > 0));
    // The system's temporary folder: a confined child writes scratch files in its own
    // folder, through TMPDIR, instead.
    report(
        "write_tmp",
        tempfile::tempfile_in(std::env::temp_dir()).map(drop),
    );
    // A library loaded after confinement (as libtorch loads the CUDA driver's): the
    // dynamic loader only reads it, which the sandbox allows where it allows reading.
    // SAFETY: dlopen of a glibc library that runs no constructor of ours.
    let library = unsafe { libc::dlopen(c"libresolv.so.2".as_ptr(), libc::RTLD_NOW) };
    report(
        "load_library",
        if library.is_null() {
            Err(std::io::Error::other("dlopen failed"))
        } else {
            Ok(())
        },
    );
    // libtorch still works confined, its thread pool included.
    tch::set_num_threads(2);
    let product = tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu)).matmul(
        &tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu)),
    );
    report(
        "libtorch",
        if product.double_value(&[0, 0]) == 64.0 {
            Ok(())
        } else {
            Err(std::io::Error::other("wrong product"))
        },
    );
}

/// A system call's outcome: `Ok` where it succeeded, its errno otherwise.
fn os_result(succeeded: bool) -> std::io::Result<()> {
    if succeeded {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The parts of the machine a probe is pointed at: the job's folder with an input, a
/// folder beside it with a secret, and a listening TCP port.
struct Scene {
    _root: tempfile::TempDir,
    work: std::path::PathBuf,
    secret: std::path::PathBuf,
    listener: std::net::TcpListener,
    _unix_listener: std::os::unix::net::UnixListener,
}

/// `under`: the folder that holds the scene, never /tmp (the system's temporary folder
/// is itself probed).
fn scene(under: &Path) -> Scene {
    let root = tempfile::tempdir_in(under).unwrap();
    let work = root.path().join("work");
    let secret = root.path().join("data");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(work.join("input.txt"), b"model").unwrap();
    std::fs::write(secret.join("secret.txt"), b"another client's upload").unwrap();
    let unix_listener = std::os::unix::net::UnixListener::bind(secret.join("server.sock")).unwrap();
    Scene {
        _unix_listener: unix_listener,
        _root: root,
        work,
        secret,
        listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    }
}

/// Whether this kernel's Landlock enforces the whole policy (ABI 6: Linux 6.12); the
/// tests are skipped, saying so, where it does not.
fn landlock_available() -> bool {
    match kernel_support() {
        Ok(abi) if abi >= 6 => true,
        Ok(abi) => {
            eprintln!(
                "skipped: this kernel's Landlock (ABI {abi}) enforces only part of the sandbox"
            );
            false
        }
        Err(e) => {
            eprintln!("skipped: this kernel has no Landlock ({e})");
            false
        }
    }
}

/// Every probe `probe_entry` runs.
const PROBES: [&str; 19] = [
    "read_work",
    "write_work",
    "read_secret",
    "write_secret",
    "read_proc_cpuinfo",
    "read_parent_environ",
    "signal_parent",
    "execute",
    "connect_tcp",
    "write_tmp",
    "rename_work",
    "make_symlink",
    "make_fifo",
    "connect_unix",
    "udp",
    "new_session",
    "fork",
    "load_library",
    "libtorch",
];

/// Each of `PROBES` succeeded if `allowed` names it, and was denied otherwise.
fn assert_only_these_allowed(outcomes: &Outcomes, allowed: &[&str]) {
    for name in PROBES {
        assert_outcome(outcomes, name, allowed.contains(&name));
    }
}

fn assert_outcome(outcomes: &Outcomes, name: &str, allowed: bool) {
    let outcome = outcomes
        .get(name)
        .unwrap_or_else(|| panic!("{name} not probed: {outcomes:?}"));
    assert_eq!(
        outcome == "ok",
        allowed,
        "{name}: {outcome} (all: {outcomes:?})"
    );
}

#[test]
fn a_confined_process_keeps_to_its_job_folder() {
    if !landlock_available() {
        return;
    }
    let scene = scene(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let port = scene.listener.local_addr().unwrap().port();

    // Unconfined, every probe succeeds: the denials below are the sandbox's doing.
    let open = probe(&scene.work, &scene.secret, port, None);
    assert_only_these_allowed(&open, &PROBES);
    std::fs::remove_file(scene.secret.join("planted.txt")).unwrap();
    for planted in ["purified.pt", "report.json"] {
        std::fs::remove_file(scene.work.join(planted)).unwrap();
    }

    // What `serve` does at start: this process stands for the server below.
    bdscan::server::sandbox::protect_server_process().unwrap();

    // A CPU slot's child.
    let confined = probe(&scene.work, &scene.secret, port, Some(true));
    assert_eq!(confined["confined"], "Fully", "{confined:?}");
    assert_only_these_allowed(
        &confined,
        &[
            "read_work",
            "write_work",
            "read_proc_cpuinfo",
            "rename_work",
            "load_library",
            "libtorch",
        ],
    );
    assert!(!scene.secret.join("planted.txt").exists());

    // A CUDA slot's child reads anywhere but is otherwise as confined.
    let cuda = probe(&scene.work, &scene.secret, port, Some(false));
    assert_only_these_allowed(
        &cuda,
        &[
            "read_work",
            "write_work",
            "read_secret",
            "read_proc_cpuinfo",
            "rename_work",
            "load_library",
            "libtorch",
        ],
    );
    drop(scene.listener);
}

/// A server installed beside its data (`/srv/bdscan/bdscan`, data in `/srv/bdscan/data`):
/// the executable's folder (here this test binary's) holds the job's folder, and is not
/// opened (only shared libraries' folders are, and never one that holds the job's).
#[test]
fn a_job_folder_beside_the_binary_keeps_its_neighbours_closed() {
    if !landlock_available() {
        return;
    }
    let binary_folder = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let scene = scene(&binary_folder);
    let port = scene.listener.local_addr().unwrap().port();
    let confined = probe(&scene.work, &scene.secret, port, Some(true));
    assert_eq!(confined["confined"], "Fully", "{confined:?}");
    for name in ["read_work", "write_work", "libtorch"] {
        assert_outcome(&confined, name, true);
    }
    for name in ["read_secret", "write_secret"] {
        assert_outcome(&confined, name, false);
    }
}

/// The real child: with the sandbox it cannot open a model outside its job folder, and
/// scans the same model copied into it (its scratch files in the folder too).
#[test]
fn the_job_child_reads_only_inside_its_folder() {
    if !landlock_available() {
        return;
    }
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let work = root.path().join("job");
    std::fs::create_dir_all(&work).unwrap();
    let outside = root.path().join("elsewhere.pt");
    std::fs::copy(common::fixture("models/mnist_cnn.pt"), &outside).unwrap();
    std::fs::write(
        work.join("clean.safetensors"),
        common::mnist(100).to_safetensors(),
    )
    .unwrap();
    let config: bdscan::engine::ScanConfig = serde_json::from_value(
        serde_json::json!({"method": "ft", "ft": {"epochs": 1}, "threads": 1}),
    )
    .unwrap();
    let run_confined_to = |model: &Path, confined_to: &Path| {
        let spec = JobSpec {
            model: model.to_path_buf(),
            clean: work.join("clean.safetensors"),
            test: None,
            poison: None,
            target_label: None,
            config: config.clone(),
            memory_limit: None,
            confinement: Some(Confinement {
                work_dir: confined_to.to_path_buf(),
                restrict_reads: true,
            }),
            artifact: work.join("purified.pt"),
            report: work.join("report.json"),
            error: work.join("error.json"),
        };
        let spec_path = work.join("spec.json");
        std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
        // Its stdin stays open: the child takes its end for a cancellation.
        let mut child = Command::new(common::bdscan_bin())
            .args(["job", "--spec"])
            .arg(&spec_path)
            .env("TMPDIR", &work)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // wait_with_output would close it first.
        let stdin = child.stdin.take();
        let output = child.wait_with_output().unwrap();
        drop(stdin);
        let mut error = String::new();
        if let Ok(mut file) = std::fs::File::open(work.join("error.json")) {
            file.read_to_string(&mut error).unwrap();
        }
        (output, error)
    };
    let run = |model: &Path| run_confined_to(model, &work);

    let (output, error) = run(&outside);
    assert_eq!(output.status.code(), Some(2), "{error}");
    assert!(error.contains("Permission denied"), "{error}");
    assert!(!work.join("report.json").exists());

    std::fs::remove_file(work.join("error.json")).unwrap();
    let inside = work.join("model.pt");
    std::fs::copy(&outside, &inside).unwrap();
    let (output, error) = run(&inside);
    assert!(
        output.status.success(),
        "{error}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(work.join("report.json").exists() && work.join("purified.pt").exists());
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("warning"),
        "fully confined, no warning: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A sandbox that cannot be set up fails the job, saying why, rather than running it
    // unconfined: here its folder is gone.
    std::fs::remove_file(work.join("report.json")).unwrap();
    let (output, error) = run_confined_to(&inside, &root.path().join("gone"));
    assert_eq!(output.status.code(), Some(3), "{error}");
    assert!(error.contains("confining the job's process"), "{error}");
    assert!(!work.join("report.json").exists());
}

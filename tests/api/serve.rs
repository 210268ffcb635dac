//! The `bdscan serve` binary itself: default SQLite store, port 0, clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn serve_binary_uses_sqlite_in_the_data_dir_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bdscan"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let address = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let address = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| line.split("address=").nth(1).map(|a| a.trim().to_string()))
            .expect("the server logs its address");
        // Keep draining so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        address
    })
    .await
    .unwrap();

    let client = reqwest::Client::new();
    let ready = client
        .get(format!("http://{address}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    assert!(
        dir.path().join("bdscan.sqlite").exists(),
        "SQLite database in --data-dir"
    );

    // The shell's builtin `kill`: no procps needed.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {}", child.id()))
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
}

/// `bdscan serve` with `args` that must be refused before it binds: exit 2 and stderr.
fn refused_serve(args: &[&str], envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_bdscan"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("BDSCAN_WORKERS")
        .env_remove("BDSCAN_DEVICES")
        .env_remove("BDSCAN_CONFIG");
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    stderr
}

#[test]
fn serve_refuses_devices_it_cannot_use() {
    let missing = format!("cuda:{}", tch::Cuda::device_count().max(0));
    let stderr = refused_serve(&["--devices", &format!("cpu,{missing}")], &[]);
    assert!(
        stderr.contains(&format!("{missing} is not available")),
        "{stderr}"
    );
    let stderr = refused_serve(&[], &[("BDSCAN_DEVICES", "cpu,tpu")]);
    assert!(stderr.contains("device `tpu`"), "{stderr}");
    let stderr = refused_serve(&["--workers", "3", "--devices", "cpu,cpu"], &[]);
    assert!(stderr.contains("disagree"), "{stderr}");
}

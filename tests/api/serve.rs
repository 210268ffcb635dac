//! The `bdscan serve` binary itself: default SQLite store, port 0, clean exit on SIGTERM,
//! settings from flags, environment and a config file, refused settings.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `command` (a `bdscan serve`) and returns it with the address it logged.
async fn start(mut command: Command) -> (Child, String) {
    let mut child = command
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
            .find_map(|line| {
                let after = line.split("address=").nth(1)?;
                after.split_whitespace().next().map(str::to_string)
            })
            .expect("the server logs its address");
        // Keep draining so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        address
    })
    .await
    .unwrap();
    (child, address)
}

/// SIGTERM, then the exit status within 20 s.
async fn terminate(mut child: Child) -> std::process::ExitStatus {
    // The shell's builtin `kill`: no procps needed.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {}", child.id()))
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn serve_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bdscan"));
    command.arg("serve");
    for key in [
        "DATABASE_URL",
        "BDSCAN_CONFIG",
        "BDSCAN_LISTEN",
        "BDSCAN_DATA_DIR",
        "BDSCAN_WORKERS",
        "BDSCAN_DEVICES",
        "BDSCAN_MAX_BLOB_BYTES",
        "BDSCAN_JOB_THREADS",
        "BDSCAN_LEASE_SECS",
        "BDSCAN_MAX_ATTEMPTS",
        "BDSCAN_MAX_STORE_BYTES",
        "BDSCAN_MAX_QUEUED_JOBS",
        "BDSCAN_MAX_CONNECTIONS",
        "BDSCAN_JOB_MEMORY_LIMIT",
        "BDSCAN_JOB_TIMEOUT_SECS",
        "BDSCAN_JOB_RETENTION_SECS",
        "BDSCAN_API_TOKEN",
    ] {
        command.env_remove(key);
    }
    command
}

#[tokio::test]
async fn serve_binary_uses_sqlite_in_the_data_dir_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = serve_command();
    command
        .args(["--listen", "127.0.0.1:0", "--workers", "1", "--data-dir"])
        .arg(dir.path());
    let (child, address) = start(command).await;

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
    let exit = terminate(child).await;
    assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
}

#[tokio::test]
async fn serve_settings_come_from_flags_then_environment_then_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (file_dir, flag_dir) = (dir.path().join("from-file"), dir.path().join("from-flag"));
    let config = dir.path().join("bdscan.toml");
    std::fs::write(
        &config,
        format!(
            "# every key of the flags\nlisten = \"127.0.0.1:9\"\ndata_dir = \"{}\"\nworkers = 0\nmax_blob_bytes = 1000\n",
            file_dir.display()
        ),
    )
    .unwrap();
    let mut command = serve_command();
    command
        .arg("--data-dir")
        .arg(&flag_dir)
        .env("BDSCAN_CONFIG", &config)
        .env("BDSCAN_LISTEN", "127.0.0.1:0");
    let (child, address) = start(command).await;
    assert!(
        !address.ends_with(":9"),
        "the environment's port 0 beats the file's 9: {address}"
    );
    assert!(
        flag_dir.join("bdscan.sqlite").exists(),
        "the flag's data dir beats the file's"
    );
    assert!(!file_dir.exists());
    // Only the file sets the upload limit: 1000 bytes, not the 1 GiB default.
    let client = reqwest::Client::new();
    let upload = |size: usize| {
        client
            .post(format!("http://{address}/v1/blobs"))
            .body(vec![1u8; size])
            .send()
    };
    assert_eq!(
        upload(1000).await.unwrap().status(),
        reqwest::StatusCode::CREATED
    );
    assert_eq!(
        upload(1001).await.unwrap().status(),
        reqwest::StatusCode::PAYLOAD_TOO_LARGE
    );
    let exit = terminate(child).await;
    assert!(exit.success(), "{exit}");
}

#[test]
fn serve_refuses_a_config_file_with_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bdscan.toml");
    std::fs::write(&config, "workers = 1\ncolour = \"red\"\n").unwrap();
    let path = config.to_str().unwrap();
    let stderr = refused_serve(&["--config", path], &[]);
    assert!(stderr.contains("unknown field `colour`"), "{stderr}");
    assert!(stderr.contains(path), "names the file: {stderr}");
    let stderr = refused_serve(&[], &[("BDSCAN_CONFIG", path)]);
    assert!(stderr.contains("unknown field `colour`"), "{stderr}");
    let stderr = refused_serve(&["--config", "/nonexistent/bdscan.toml"], &[]);
    assert!(stderr.contains("/nonexistent/bdscan.toml"), "{stderr}");
}

/// `bdscan serve` with `args` that must be refused before it binds: exit 2 and stderr.
fn refused_serve(args: &[&str], envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = serve_command();
    command
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args);
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

#[test]
fn serve_refuses_a_guessable_api_token_and_never_prints_it() {
    let stderr = refused_serve(&[], &[("BDSCAN_API_TOKEN", "hunter2")]);
    assert!(stderr.contains("at least 32 characters"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    // `BDSCAN_API_TOKEN=` (an environment file with the value left out) would otherwise
    // have opened the API without a word.
    let stderr = refused_serve(&[], &[("BDSCAN_API_TOKEN", "")]);
    assert!(stderr.contains("at least 32 characters"), "{stderr}");
}

/// The container files cannot be built here (no Docker engine), but the settings they
/// give `bdscan serve` must be ones it knows, and the config file they ship must load.
#[test]
fn container_files_use_settings_that_serve_knows() {
    let help = Command::new(env!("CARGO_BIN_EXE_bdscan"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut named = 0;
    for file in ["docker/Dockerfile", "deploy/docker-compose.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (at, _) in text.match_indices("BDSCAN_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            if name == "BDSCAN_" {
                continue; // prose: "BDSCAN_* variables"
            }
            // `[env: NAME]` for a secret, whose value help hides.
            assert!(
                help.contains(&format!("[env: {name}="))
                    || help.contains(&format!("[env: {name}]")),
                "{file} sets {name}, which `bdscan serve` does not read"
            );
            named += 1;
        }
        assert!(
            text.contains("BDSCAN_CONFIG=/etc/bdscan/bdscan.toml")
                || text.contains("BDSCAN_CONFIG: /etc/bdscan/bdscan.toml"),
            "{file}"
        );
    }
    assert!(named >= 3);
    assert!(help.contains("[env: DATABASE_URL"));
    let compose = std::fs::read_to_string(root.join("deploy/docker-compose.yml")).unwrap();
    assert!(compose.contains("DATABASE_URL: postgres://"));

    let settings = bdscan::server::ServeSettings::from_file(&root.join("deploy/bdscan.toml"))
        .expect("deploy/bdscan.toml loads");
    let config = settings
        .into_config(env!("CARGO_BIN_EXE_bdscan").into())
        .expect("deploy/bdscan.toml is a valid configuration on a CPU machine");
    assert_eq!(config.listen.port(), 8080);
    assert_eq!(config.data_dir, std::path::PathBuf::from("/data"));
}

#[test]
fn serve_refuses_its_own_settings_it_cannot_use_as_usage_errors() {
    // A data directory where a file is: was exit 3 with only "File exists".
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"in the way").unwrap();
    let output = serve_command()
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("data_dir") && stderr.contains("a-file"),
        "{stderr}"
    );
    // A database the store cannot use, and an address another process holds.
    let stderr = refused_serve(&[], &[("DATABASE_URL", "mysql://db.example/bdscan")]);
    assert!(stderr.contains("unsupported database URL"), "{stderr}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let output = serve_command()
        .args(["--listen", &address, "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&address), "{stderr}");
}

#[test]
fn serve_names_why_it_cannot_reach_its_database() {
    // A port nothing listens on: the database's own reason once the 10 s a starting
    // database gets are over. It used to retry for the pool's 30 s and then say only
    // "pool timed out".
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://bdscan:s3cret-pass@{closed}/bdscan");
    let output = serve_command()
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot connect to the database at postgres://bdscan:***@{closed}/bdscan"
        )),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
    assert!(!stderr.contains("s3cret-pass"), "{stderr}");
    assert!(!stderr.contains("pool timed out"), "{stderr}");

    // A server that accepts the connection and never answers: the start fails after the
    // first connection's timeout instead of hanging on it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_address = silent.local_addr().unwrap();
    let output = serve_command()
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env(
            "DATABASE_URL",
            format!("postgres://bdscan@{silent_address}/bdscan"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no answer within 10 s"), "{stderr}");
    drop(silent);

    // A database that answers and refuses (no such database) is said at once: trying
    // again cannot help, unlike a server that is not there yet.
    if let Ok(base) = std::env::var("BDSCAN_TEST_POSTGRES_URL") {
        let (server, _) = base.rsplit_once('/').unwrap();
        let started = std::time::Instant::now();
        let output = serve_command()
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("DATABASE_URL", format!("{server}/no_such_database"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert_eq!(output.status.code(), Some(3), "{stderr}");
        assert!(stderr.contains("no_such_database"), "{stderr}");
        assert!(stderr.contains("does not exist"), "{stderr}");
        // Not retried for the 10 s a starting database gets.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(8),
            "{stderr}"
        );
    }
}

/// A PostgreSQL that does not accept connections yet (as while it starts, beside the
/// server in one compose file or pod): `serve` keeps trying and starts once it answers,
/// here 1.5 s later through a proxy opened on the port it was given. Between bbea5d3
/// and dc97d33 it exited at once on "connection refused".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_waits_for_a_database_that_is_still_starting() {
    let Some(server_url) = crate::helpers::postgres_url("serve_waits_for_a_database") else {
        return;
    };
    let database = crate::helpers::fresh_postgres_database(&server_url).await;
    let (scheme_and_user, rest) = database.url.split_once('@').unwrap();
    let (host_port, path) = rest.split_once('/').unwrap();
    let real: std::net::SocketAddr = host_port.parse().unwrap();
    // A port nothing listens on until the proxy opens it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(real).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut command = serve_command();
    command
        .args(["--listen", "127.0.0.1:0", "--workers", "0", "--data-dir"])
        .arg(dir.path())
        .env(
            "DATABASE_URL",
            format!("{scheme_and_user}@127.0.0.1:{port}/{path}"),
        );
    let started = Instant::now();
    let (child, address) = start(command).await;
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let ready = reqwest::get(format!("http://{address}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    let exit = terminate(child).await;
    assert!(exit.success(), "{exit}");
    proxy.abort();
    drop(database);
}

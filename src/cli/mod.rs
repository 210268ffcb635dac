//! The `bdscan` command line. Exit codes: 0 done, 2 bad input, usage or settings (training
//! that diverged included), 3 internal failure.

mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::config::MAX_EPOCHS;
use crate::engine::scan::{check_writable_dir, directory_of};
use crate::engine::{
    run_scan, EngineError, Method, Monitor, Regularizer, ScanConfig, ScanInputs, ScanReport,
};
use crate::lab::{demo, scenario as lab};
use progress::ProgressView;

pub const EXIT_INPUT: u8 = 2;
pub const EXIT_INTERNAL: u8 = 3;
/// `scan`, `demo` or `lab` stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Set by the first SIGINT or SIGTERM during `scan`, `demo` or `lab`. The engine stops
/// at its next step with `Cancelled`, and the command then removes what it had written
/// (the lab's files, the demo's temporary folder) instead of dying half-way and leaving
/// them. A second signal takes the default action and ends the process at once.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn stop_on_interrupt() {
    // SAFETY: the action is zeroed then filled in; the handler only stores to an atomic.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "bdscan",
    // The libtorch it was built against: a different one at run time is unsupported.
    version = concat!(env!("CARGO_PKG_VERSION"), " (libtorch ", env!("BDSCAN_LIBTORCH_VERSION"), ")"),
    about = "Find and remove backdoors in neural networks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Score every neuron by benign salience, purify the suspects, write a purified model and a report.
    Scan(ScanArgs),
    /// Train a BadNets-backdoored CNN on the bundled MNIST digits, scan it, print before/after.
    Demo(DemoArgs),
    /// Train a (backdoored) model reproducibly and write it with the defender's bundles.
    Lab(LabArgs),
    /// Run the HTTP scanning service (SQLite in the data dir unless DATABASE_URL says otherwise).
    Serve(ServeArgs),
    /// Run one job of the service in this process (started by the service's workers).
    #[command(hide = true)]
    Job(JobArgs),
}

/// Every setting is a flag, an environment variable and a key of the `--config` file;
/// a flag beats the environment, which beats the file, which beats the default.
#[derive(Args)]
pub struct ServeArgs {
    /// TOML file with any of these settings as keys (`listen`, `data_dir`, `devices`, …).
    #[arg(long, env = "BDSCAN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "BDSCAN_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Folder for the SQLite database and jobs' scratch files [default: ./.data].
    #[arg(long, env = "BDSCAN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `postgres://…` to use PostgreSQL (default: SQLite in the data dir).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// CPU job slots of this process (0: API only) [default: 1].
    #[arg(long, env = "BDSCAN_WORKERS")]
    pub workers: Option<usize>,
    /// One job slot per listed libtorch device, e.g. `cpu,cuda:0,cuda:1` (replaces --workers).
    #[arg(long, env = "BDSCAN_DEVICES", value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    /// Largest accepted upload, per file, in bytes [default: 1073741824].
    #[arg(long, env = "BDSCAN_MAX_BLOB_BYTES")]
    pub max_blob_bytes: Option<u64>,
    /// libtorch threads per job when its config does not say (default: cores / slots).
    #[arg(long, env = "BDSCAN_JOB_THREADS")]
    pub job_threads: Option<usize>,
    /// Seconds a worker holds a job without renewing its lease before the job is re-queued [default: 30].
    #[arg(long, env = "BDSCAN_LEASE_SECS")]
    pub lease_secs: Option<u64>,
    /// Runs of a job before a lost lease fails it (clients may set their own per job) [default: 3].
    #[arg(long, env = "BDSCAN_MAX_ATTEMPTS")]
    pub max_attempts: Option<i64>,
    /// Most bytes the store may hold in all; an upload past it gets 507 [default: no limit].
    #[arg(long, env = "BDSCAN_MAX_STORE_BYTES")]
    pub max_store_bytes: Option<u64>,
    /// Most jobs waiting in the queue; a new job past it gets 503 [default: no limit].
    #[arg(long, env = "BDSCAN_MAX_QUEUED_JOBS")]
    pub max_queued_jobs: Option<u64>,
    /// Most connections open at once; past it new ones wait to be accepted [default: 512].
    #[arg(long, env = "BDSCAN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most memory, in bytes, a job on a CPU slot may allocate (RLIMIT_DATA); past it the
    /// job fails with `memory_limit` [default: no limit].
    #[arg(long, env = "BDSCAN_JOB_MEMORY_LIMIT")]
    pub job_memory_limit: Option<u64>,
    /// Seconds one attempt at a job may run; past it the job fails with `timed_out`
    /// [default: no limit].
    #[arg(long, env = "BDSCAN_JOB_TIMEOUT_SECS")]
    pub job_timeout_secs: Option<u64>,
    /// Seconds a finished job, its report, purified model and unshared inputs are kept
    /// before they are deleted, and uploads no job uses (after a day at least); at least
    /// 60 [default: for ever].
    #[arg(long, env = "BDSCAN_JOB_RETENTION_SECS")]
    pub job_retention_secs: Option<u64>,
    /// Confine each job's process (Landlock, Linux): it may write only in its job's
    /// folder, read only system and libtorch files (CPU slots), execute nothing and reach
    /// no network; `false` only where it gets in a device driver's way [default: true].
    #[arg(long, env = "BDSCAN_JOB_SANDBOX")]
    pub job_sandbox: Option<bool>,
    /// Bearer token every /v1 request must carry, at least 32 characters (several,
    /// separated by spaces, are each accepted: for rotating); set it in the
    /// environment, where `ps` does not show it [default: none, the API is open].
    #[arg(long, env = "BDSCAN_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
}

/// By way of the settings' own Debug, which leaves the API token and the database
/// password out.
impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field("config", &self.config)
            .field("settings", &self.settings())
            .finish()
    }
}

impl ServeArgs {
    /// The flags-and-environment layer of the settings.
    fn settings(&self) -> crate::server::ServeSettings {
        crate::server::ServeSettings {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            workers: self.workers,
            devices: self.devices.clone(),
            max_blob_bytes: self.max_blob_bytes,
            job_threads: self.job_threads,
            lease_secs: self.lease_secs,
            max_attempts: self.max_attempts,
            max_store_bytes: self.max_store_bytes,
            max_queued_jobs: self.max_queued_jobs,
            max_connections: self.max_connections,
            job_memory_limit: self.job_memory_limit,
            job_timeout_secs: self.job_timeout_secs,
            job_retention_secs: self.job_retention_secs,
            job_sandbox: self.job_sandbox,
            api_token: self.api_token.clone(),
        }
    }
}

/// Closes the server's environment to its job processes (see `sandbox`), and says at
/// start whether they will be confined, and how far this kernel can.
fn log_job_sandbox(enabled: bool) {
    if let Err(e) = crate::server::sandbox::protect_server_process() {
        tracing::warn!(
            "making the server non-dumpable: {e}: a job process may read its environment"
        );
    }
    if !enabled {
        tracing::warn!("job_sandbox is off: each job's process (the uploaded TorchScript) runs unconfined, as the server's user");
        return;
    }
    match crate::server::sandbox::kernel_support() {
        Ok(abi) if abi >= 6 => tracing::info!(landlock_abi = abi, "job processes are sandboxed"),
        Ok(abi) => tracing::warn!(
            landlock_abi = abi,
            "this kernel's Landlock enforces only part of the job sandbox (before Linux 6.12: \
             no signal or abstract-socket scoping; before 6.7: no TCP rules; before 6.2: \
             no control of truncation): see README, The job's child process"
        ),
        Err(e) => tracing::warn!(
            "this kernel has no Landlock ({e}): each job's process (the uploaded \
             TorchScript) runs as the server's user with only the seccomp filter (no \
             sockets, no new processes), not confined to its folder"
        ),
    }
}

#[derive(Args, Debug)]
pub struct JobArgs {
    /// The job spec written by the worker.
    #[arg(long)]
    pub spec: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// `cpu` or `cuda:N` [default: the config file's, else cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// Seed of every random choice [default: the config file's, else 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// libtorch CPU threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// JSON file with scan settings (any subset of the report's `config`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Defense to run (default: benign_salience); overrides the config file's `method`.
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum MethodArg {
    /// Benign salience + AR purification (ours).
    #[value(name = "benign_salience", alias = "benign-salience")]
    BenignSalience,
    /// Ablation: our pipeline ranking neurons by mean clean activation.
    Activation,
    /// Plain fine-tuning.
    Ft,
    /// Fine-Pruning (Liu et al. 2018).
    Fp,
    /// Adversarial Neuron Pruning (Wu & Wang 2021).
    Anp,
    /// Channel Lipschitzness-based Pruning (Zheng et al. 2022), data-free.
    Clp,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::BenignSalience => Method::BenignSalience,
            MethodArg::Activation => Method::Activation,
            MethodArg::Ft => Method::Ft,
            MethodArg::Fp => Method::Fp,
            MethodArg::Anp => Method::Anp,
            MethodArg::Clp => Method::Clp,
        }
    }
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// TorchScript archive: forward(N×C×H×W) -> N×K logits.
    #[arg(long)]
    pub model: PathBuf,
    /// Clean samples (.safetensors or .npz with `images` and `labels`).
    #[arg(long)]
    pub clean: PathBuf,
    /// Where to write the purified TorchScript archive.
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write the JSON salience report.
    #[arg(long)]
    pub report: PathBuf,
    /// Clean test samples for accuracy (default: the held-out split of --clean).
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Triggered samples with their true labels, to measure ASR and RA.
    #[arg(long)]
    pub poison: Option<PathBuf>,
    /// The attack's target class (not needed when the poison bundle holds `targets`).
    #[arg(long, requires = "poison", allow_negative_numbers = true)]
    pub target_label: Option<i64>,
    /// Penalty on the suspects: ar (default), l1, l2 or none.
    #[arg(long, value_enum)]
    pub regularizer: Option<RegularizerArg>,
    /// Purification epochs (fine-tuning epochs for `ft` and `fp`).
    #[arg(long)]
    pub epochs: Option<usize>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the demo's models and bundles here (default: a temporary folder).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Architecture to backdoor: the VGG-style CNN with BatchNorm, or the same without.
    #[arg(long, value_enum, default_value = "cnn-bn")]
    pub arch: DemoArch,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
pub struct LabArgs {
    /// The committed MNIST fixture, or the procedural 3×32×32 shapes dataset.
    #[arg(long, value_enum)]
    pub dataset: LabDataset,
    /// VGG-style CNN with BatchNorm, ResNet-style with BatchNorm, or VGG-style without.
    #[arg(long, value_enum)]
    pub arch: LabArch,
    /// The backdoor attack (`none` trains a clean model).
    #[arg(long, value_enum)]
    pub attack: LabAttack,
    /// Each class y is mapped to (y + 1) mod 10 instead of one target.
    #[arg(long)]
    pub all_to_all: bool,
    /// The all-to-one target class (default 0).
    #[arg(long, allow_negative_numbers = true)]
    pub target: Option<i64>,
    /// Share of training samples poisoned (SIG: share of the target class). Default: 0.1; SIG 0.8.
    #[arg(long, allow_negative_numbers = true)]
    pub poison_rate: Option<f64>,
    /// BadNets patch side / Trojan watermark side / dynamic pattern side, in pixels.
    #[arg(long)]
    pub trigger_size: Option<usize>,
    /// Blended: weight of the noise pattern (default 0.2).
    #[arg(long, allow_negative_numbers = true)]
    pub alpha: Option<f32>,
    /// Blended / Trojan / WaNet: seed of the fixed pattern or warp field.
    #[arg(long)]
    pub pattern_seed: Option<u64>,
    /// SIG: amplitude Δ in pixel levels out of 255 (default 160; the paper's 20 is not learnt here).
    #[arg(long, allow_negative_numbers = true)]
    pub sig_delta: Option<f32>,
    /// SIG: periods across the width (default 6).
    #[arg(long, allow_negative_numbers = true)]
    pub sig_frequency: Option<f32>,
    /// WaNet: warp strength s (default 0.5 on mnist, 4 on shapes).
    #[arg(long, allow_negative_numbers = true)]
    pub wanet_strength: Option<f32>,
    /// WaNet: control points per side k (default 4).
    #[arg(long)]
    pub wanet_grid: Option<usize>,
    /// WaNet noise mode: cross samples per poisoned sample (default 2 on mnist, 0 on shapes).
    #[arg(long, allow_negative_numbers = true)]
    pub cross_ratio: Option<f64>,
    /// Dynamic: side of the bottom-right area where patterns are placed (default 14).
    #[arg(long)]
    pub dynamic_region: Option<usize>,
    /// Training epochs (default per dataset and architecture).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Training learning rate (default per dataset and architecture).
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// libtorch CPU threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Folder for model.pt, clean/test/poison.safetensors and meta.json.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum LabDataset {
    Mnist,
    Shapes,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum LabArch {
    VggBn,
    Resnet,
    Cnn,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq)]
pub enum LabAttack {
    None,
    Badnets,
    Blended,
    Trojan,
    Sig,
    Wanet,
    Dynamic,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum DemoArch {
    CnnBn,
    Cnn,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum RegularizerArg {
    Ar,
    L1,
    L2,
    None,
}

impl From<RegularizerArg> for Regularizer {
    fn from(r: RegularizerArg) -> Self {
        match r {
            RegularizerArg::Ar => Regularizer::Ar,
            RegularizerArg::L1 => Regularizer::L1,
            RegularizerArg::L2 => Regularizer::L2,
            RegularizerArg::None => Regularizer::None,
        }
    }
}

/// Parses arguments, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_INPUT } else { 0 });
        }
    };
    init_tracing();
    // Every command but `serve` is a short process that runs the engine.
    if !matches!(cli.command, Command::Serve(_)) {
        crate::engine::allocator::keep_freed_memory();
    }
    let outcome = match cli.command {
        Command::Serve(args) => return serve(args),
        Command::Job(args) => {
            return ExitCode::from(crate::server::child::run_job_process(&args.spec))
        }
        Command::Scan(args) => {
            stop_on_interrupt();
            scan(args)
        }
        Command::Demo(args) => {
            stop_on_interrupt();
            demo_command(args)
        }
        Command::Lab(args) => {
            stop_on_interrupt();
            lab_command(args)
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(EngineError::Cancelled) => {
            eprintln!(
                "interrupted: stopped before its outputs were written (a lab run's files and \
                 the demo's temporary folder are removed; a --work-dir keeps what it holds)"
            );
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(if err.is_client_error() {
                EXIT_INPUT
            } else {
                EXIT_INTERNAL
            })
        }
    }
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn serve(args: ServeArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: locating this program (to run jobs): {e}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let file = match &args.config {
        Some(path) => match crate::server::ServeSettings::from_file(path) {
            Ok(file) => file,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INPUT);
            }
        },
        None => crate::server::ServeSettings::default(),
    };
    let config = match args.settings().or(file).into_config(exe) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(EXIT_INPUT);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let outcome = runtime.block_on(async move {
        let app = crate::server::Application::build(config)
            .await
            .map_err(|e| match e {
                // A setting the user can fix: a usage error, like a bad flag. A listen
                // address another process holds is one too.
                crate::server::StartError::Config(_) | crate::server::StartError::Bind(..) => {
                    (EXIT_INPUT, e.to_string())
                }
                other => (EXIT_INTERNAL, other.to_string()),
            })?;
        let authenticated = app.state().config.api_token.is_some();
        let authentication = if authenticated {
            "bearer token"
        } else {
            "none"
        };
        tracing::info!(address = %app.local_addr(), authentication, "bdscan serving");
        if !authenticated && !app.local_addr().ip().is_loopback() {
            tracing::warn!(
                address = %app.local_addr(),
                "no api_token is set: anyone who can reach this address can read, cancel \
                 and delete every job; set BDSCAN_API_TOKEN or put an authenticating proxy \
                 in front"
            );
        }
        log_job_sandbox(app.state().config.worker.job_sandbox);
        let token = app.shutdown_token();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            token.cancel();
        });
        app.run_until_stopped()
            .await
            .map_err(|e| (EXIT_INTERNAL, e.to_string()))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("error: {e}");
            ExitCode::from(code)
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

fn base_config(run: &RunArgs) -> Result<ScanConfig, EngineError> {
    let mut config = match run.config.as_deref() {
        Some(path) => {
            let text = crate::engine::config::read_settings_file(path)
                .map_err(|e| EngineError::input(&format!("config {}", path.display()), e))?;
            serde_json::from_str(&text)
                .map_err(|e| EngineError::input(&format!("config {}", path.display()), e))?
        }
        None => ScanConfig::default(),
    };
    // Flags override the file only where given, so a file's `seed` or `device` holds.
    if let Some(device) = &run.device {
        config.device = device.clone();
    }
    if let Some(seed) = run.seed {
        config.seed = seed;
    }
    if let Some(method) = run.method {
        config.method = method.into();
    }
    if run.threads.is_some() {
        config.threads = run.threads;
    }
    config.validate()?;
    Ok(config)
}

fn scan(args: ScanArgs) -> Result<(), EngineError> {
    let mut config = base_config(&args.run)?;
    // Refused rather than ignored, as `lab` does with flags its attack does not take.
    let method = config.method;
    if args.regularizer.is_some() && !matches!(method, Method::BenignSalience | Method::Activation)
    {
        return Err(EngineError::InvalidInput(format!(
            "--regularizer does not apply to --method {} (only benign_salience and activation \
             purify with a penalty)",
            method.as_str()
        )));
    }
    if args.epochs.is_some() && matches!(method, Method::Anp | Method::Clp) {
        return Err(EngineError::InvalidInput(format!(
            "--epochs does not apply to --method {} (it does not fine-tune)",
            method.as_str()
        )));
    }
    if args.epochs.is_some_and(|epochs| epochs > MAX_EPOCHS) {
        return Err(EngineError::InvalidInput(format!(
            "--epochs must be at most {MAX_EPOCHS}"
        )));
    }
    if let Some(r) = args.regularizer {
        config.regularizer = r.into();
    }
    if let Some(epochs) = args.epochs {
        match config.method {
            Method::Ft | Method::Fp => config.ft.epochs = epochs,
            _ => config.purify_epochs = epochs,
        }
    }
    let inputs = ScanInputs {
        model: args.model,
        clean: args.clean,
        test: args.test,
        poison: args.poison,
        target_label: args.target_label,
        out: args.out,
    };
    check_writable_dir(&args.report, "report")?;
    refuse_clashing_paths(&inputs, &args.report, args.run.config.as_deref())?;
    let report = run_with_progress(&inputs, &config)?;
    let json =
        serde_json::to_string_pretty(&report).map_err(|e| EngineError::Internal(e.to_string()))?;
    if let Err(e) = write_atomically(&args.report, json.as_bytes()) {
        // One output without the other is a failed run: leave neither.
        let _ = std::fs::remove_file(&inputs.out);
        return Err(EngineError::input(
            &format!("report {}", args.report.display()),
            e,
        ));
    }
    print_summary(&report);
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file beside it, renamed over it: a
/// failure leaves no half-written file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = tempfile::NamedTempFile::new_in(directory_of(path))?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.persist(path).map(|_| ()).map_err(|e| e.error)
}

/// Refuses outputs that would overwrite each other or an input (`--report` naming the
/// clean bundle destroyed it, and `--out` = `--report` left only the report).
fn refuse_clashing_paths(
    inputs: &ScanInputs,
    report: &Path,
    config: Option<&Path>,
) -> Result<(), EngineError> {
    // The outputs' directories exist (checked before), the inputs themselves too.
    let resolved = |path: &Path| {
        let name = path.file_name().map(PathBuf::from).unwrap_or_default();
        let dir = directory_of(path).canonicalize().ok()?;
        Some(dir.join(name))
    };
    let out = resolved(&inputs.out);
    if out.is_some() && out == resolved(report) {
        return Err(EngineError::InvalidInput(
            "--out and --report name the same file".into(),
        ));
    }
    let config = config.map(Path::to_path_buf);
    let named_inputs = [
        ("--model", Some(&inputs.model)),
        ("--clean", Some(&inputs.clean)),
        ("--test", inputs.test.as_ref()),
        ("--poison", inputs.poison.as_ref()),
        ("--config", config.as_ref()),
    ];
    for (output_flag, output) in [("--out", &inputs.out), ("--report", &report.to_path_buf())] {
        let Some(output) = resolved(output) else {
            continue;
        };
        for (input_flag, input) in named_inputs {
            if input.and_then(|p| resolved(p)).as_ref() == Some(&output) {
                return Err(EngineError::InvalidInput(format!(
                    "{output_flag} names the {input_flag} file: it would be overwritten"
                )));
            }
        }
    }
    Ok(())
}

fn run_with_progress(inputs: &ScanInputs, config: &ScanConfig) -> Result<ScanReport, EngineError> {
    let mut view = ProgressView::for_stderr();
    let mut on_progress = |p: &crate::engine::Progress| view.update(p);
    let result = run_scan(
        inputs,
        config,
        &mut Monitor::new(&mut on_progress, Some(&INTERRUPTED)),
    );
    view.finish();
    result
}

fn demo_command(args: DemoArgs) -> Result<(), EngineError> {
    let config = base_config(&args.run)?;
    // Before the training, not after it: a device the machine lacks is refused at once.
    crate::engine::scan::open_device(&config)?;
    // Removed when this returns, failed or not (`--work-dir` keeps everything).
    let temp;
    let dir = match &args.work_dir {
        // Made here, where a failure is still the caller's path to fix (a file in the
        // way, no permission); the demo's own writes failing later are not.
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                EngineError::InvalidInput(format!("--work-dir {}: {e}", dir.display()))
            })?;
            // A folder that exists but takes no files (no permission, read-only) is
            // the caller's to fix too, and is found before the training, not after.
            check_writable_dir(&dir.join("report.json"), "--work-dir")?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("bdscan-demo-")
                .tempdir()
                .map_err(|e| EngineError::Internal(format!("creating a temporary folder: {e}")))?;
            temp.path().to_path_buf()
        }
    };
    println!(
        "training a BadNets-backdoored CNN on {} MNIST digits (seed {})…",
        demo::TRAIN_SAMPLES,
        config.seed
    );
    let mut view = ProgressView::for_stderr();
    let mut on_progress = |p: &crate::engine::Progress| view.update(p);
    let architecture = match args.arch {
        DemoArch::CnnBn => demo::MNIST_CNN_BN,
        DemoArch::Cnn => demo::MNIST_CNN,
    };
    let files = demo::prepare(
        &dir,
        architecture,
        config.seed,
        &mut Monitor::new(&mut on_progress, Some(&INTERRUPTED)),
    )?;
    view.finish();
    println!(
        "defending it with `{}` and {} clean samples…",
        config.method.as_str(),
        demo::CLEAN_SAMPLES
    );
    let inputs = ScanInputs {
        model: files.backdoored_model.clone(),
        clean: files.clean.clone(),
        test: Some(files.test.clone()),
        poison: Some(files.poison.clone()),
        target_label: Some(files.target),
        out: dir.join("purified.pt"),
    };
    let report = run_with_progress(&inputs, &config)?;
    let report_path = dir.join("report.json");
    std::fs::write(
        &report_path,
        serde_json::to_string_pretty(&report).map_err(|e| EngineError::Internal(e.to_string()))?,
    )
    .map_err(|e| EngineError::Internal(e.to_string()))?;
    print_summary(&report);
    if args.work_dir.is_some() {
        println!(
            "files: {} (purified.pt, report.json, bundles)",
            dir.display()
        );
    }
    Ok(())
}

fn lab_attack(args: &LabArgs) -> Result<lab::Attack, EngineError> {
    use crate::lab::attacks::{BadNets, Blended, Dynamic, Sig, Trojan, WaNet};
    use LabAttack as A;
    // Attack-specific flags given to another attack are a mistake worth naming.
    let flags: [(&str, bool, &[LabAttack]); 9] = [
        (
            "--trigger-size",
            args.trigger_size.is_some(),
            &[A::Badnets, A::Trojan, A::Dynamic],
        ),
        ("--alpha", args.alpha.is_some(), &[A::Blended]),
        (
            "--pattern-seed",
            args.pattern_seed.is_some(),
            &[A::Blended, A::Trojan, A::Wanet],
        ),
        ("--sig-delta", args.sig_delta.is_some(), &[A::Sig]),
        ("--sig-frequency", args.sig_frequency.is_some(), &[A::Sig]),
        (
            "--wanet-strength",
            args.wanet_strength.is_some(),
            &[A::Wanet],
        ),
        ("--wanet-grid", args.wanet_grid.is_some(), &[A::Wanet]),
        ("--cross-ratio", args.cross_ratio.is_some(), &[A::Wanet]),
        (
            "--dynamic-region",
            args.dynamic_region.is_some(),
            &[A::Dynamic],
        ),
    ];
    for (flag, given, applies) in flags {
        if given && !applies.contains(&args.attack) {
            return Err(EngineError::InvalidInput(format!(
                "{flag} does not apply to --attack {}",
                value_name(args.attack)
            )));
        }
    }
    // A clean model has no poison and no target; all-to-all has no single target.
    if args.attack == A::None {
        for (flag, given) in [
            ("--poison-rate", args.poison_rate.is_some()),
            ("--target", args.target.is_some()),
        ] {
            if given {
                return Err(EngineError::InvalidInput(format!(
                    "{flag} does not apply to --attack none"
                )));
            }
        }
    }
    if args.all_to_all && args.target.is_some() {
        return Err(EngineError::InvalidInput(
            "--target does not apply with --all-to-all (each class y goes to y + 1)".into(),
        ));
    }
    // Above zero: each of these at 0 leaves the images as they were, so the run would
    // train a model on label noise and call it an attack.
    let positive = |flag: &str, v: f32| {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(EngineError::InvalidInput(format!(
                "{flag} must be a positive number, got {v}"
            )))
        }
    };
    let size = |default: usize| match args.trigger_size {
        Some(0) => Err(EngineError::InvalidInput(
            "--trigger-size must be at least 1".into(),
        )),
        Some(s) => Ok(s),
        None => Ok(default),
    };
    Ok(match args.attack {
        A::None => lab::Attack::None,
        A::Badnets => lab::Attack::Badnets(BadNets {
            patch: size(BadNets::default().patch)?,
            ..BadNets::default()
        }),
        A::Blended => {
            let d = Blended::default();
            let alpha = positive("--alpha", args.alpha.unwrap_or(d.alpha))?;
            if alpha > 1.0 {
                return Err(EngineError::InvalidInput(format!(
                    "--alpha must lie in (0, 1], got {alpha}"
                )));
            }
            lab::Attack::Blended(Blended {
                alpha,
                pattern_seed: args.pattern_seed.unwrap_or(d.pattern_seed),
            })
        }
        A::Trojan => {
            let d = Trojan::default();
            lab::Attack::Trojan(Trojan {
                size: size(d.size)?,
                pattern_seed: args.pattern_seed.unwrap_or(d.pattern_seed),
                ..d
            })
        }
        A::Sig => {
            let d = Sig::default();
            lab::Attack::Sig(Sig {
                delta: args
                    .sig_delta
                    .map(|v| match positive("--sig-delta", v)? {
                        v if v <= 255.0 => Ok(v / 255.0),
                        v => Err(EngineError::InvalidInput(format!(
                            "--sig-delta is in pixel levels out of 255, got {v}"
                        ))),
                    })
                    .transpose()?
                    .unwrap_or(d.delta),
                frequency: positive("--sig-frequency", args.sig_frequency.unwrap_or(d.frequency))?,
            })
        }
        A::Wanet => {
            let d = WaNet::default();
            let grid = args.wanet_grid.unwrap_or(d.grid);
            if grid < 2 {
                return Err(EngineError::InvalidInput(
                    "--wanet-grid must be at least 2".into(),
                ));
            }
            lab::Attack::Wanet(WaNet {
                grid,
                strength: positive(
                    "--wanet-strength",
                    args.wanet_strength
                        .unwrap_or(lab::wanet_default_strength(dataset(args.dataset))),
                )?,
                field_seed: args.pattern_seed.unwrap_or(d.field_seed),
            })
        }
        A::Dynamic => {
            let d = Dynamic::default();
            lab::Attack::Dynamic(Dynamic {
                size: size(d.size)?,
                region: args.dynamic_region.unwrap_or(d.region),
            })
        }
    })
}

fn dataset(arg: LabDataset) -> lab::Dataset {
    match arg {
        LabDataset::Mnist => lab::Dataset::Mnist,
        LabDataset::Shapes => lab::Dataset::Shapes,
    }
}

/// The command-line spelling of a value (`vgg-bn`, `badnets`).
fn value_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}

fn lab_command(args: LabArgs) -> Result<(), EngineError> {
    if let Some(threads) = args.threads {
        let max = crate::engine::config::MAX_THREADS;
        if !(1..=max).contains(&threads) {
            return Err(EngineError::InvalidInput(format!(
                "--threads must lie in [1, {max}]"
            )));
        }
        tch::set_num_threads(threads as i32);
    }
    let attack = lab_attack(&args)?;
    let dataset = dataset(args.dataset);
    let arch = match args.arch {
        LabArch::VggBn => lab::Arch::VggBn,
        LabArch::Resnet => lab::Arch::Resnet,
        LabArch::Cnn => lab::Arch::Cnn,
    };
    let mut plan = lab::LabSpec::default_plan(dataset, arch);
    plan.seed = args.seed;
    if let Some(epochs) = args.epochs {
        plan.epochs = epochs;
    }
    if let Some(lr) = args.lr {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(EngineError::InvalidInput(format!(
                "--lr must be positive, got {lr}"
            )));
        }
        plan.lr = lr;
    }
    let spec = lab::LabSpec {
        dataset,
        arch,
        attack,
        target: args.target.unwrap_or(0),
        all_to_all: args.all_to_all,
        poison_rate: args.poison_rate.unwrap_or(attack.default_poison_rate()),
        cross_ratio: args
            .cross_ratio
            .unwrap_or(attack.default_cross_ratio(dataset)),
        plan,
    };
    spec.validate()?;
    println!(
        "training {} on {} with attack {}{} for {} epochs (seed {})…",
        value_name(args.arch),
        value_name(args.dataset),
        value_name(args.attack),
        if spec.all_to_all { " (all-to-all)" } else { "" },
        spec.plan.epochs,
        spec.plan.seed
    );
    let mut view = ProgressView::for_stderr();
    let mut on_progress = |p: &crate::engine::Progress| view.update(p);
    let (meta, files) = lab::run_lab(
        &spec,
        &args.out,
        &mut Monitor::new(&mut on_progress, Some(&INTERRUPTED)),
    )?;
    view.finish();
    println!(
        "clean acc {}  ASR {}  RA {}  ({:.1} s training)",
        percent(Some(meta.clean_acc)),
        percent(meta.asr),
        percent(meta.ra),
        meta.train_seconds
    );
    println!(
        "wrote {} (model.pt, clean/test{} .safetensors, meta.json)",
        args.out.display(),
        if files.poison.is_some() {
            "/poison"
        } else {
            ""
        }
    );
    Ok(())
}

fn percent(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{:.2}%", v * 100.0))
}

fn print_summary(report: &ScanReport) {
    let (b, a) = (&report.metrics.before, &report.metrics.after);
    println!("method {}", report.config.method.as_str());
    println!(
        "flagged {} of {} neurons ({} pruned); {} suspect weights, {} pruned",
        report.flagged_count,
        report.model.neuron_count,
        report.pruned_neuron_count,
        report.suspect_weight_count,
        report.pruned_weight_count
    );
    if let Some(target) = report.selection.shortcut_target {
        println!("suspects ranked relative to the shortcut to class {target}");
    }
    if let Some(rate) = report.purify_peak_lr {
        // Say why when it is not the setting a user would look for first.
        let why = if rate == report.config.purify_lr {
            ""
        } else {
            " (purify_lr_unnormalized: the network has no normalization layer)"
        };
        println!("purification peak rate {rate}{why}");
    }
    println!("          clean acc   ASR      RA");
    println!(
        "before    {:<11} {:<8} {}",
        percent(Some(b.clean_acc)),
        percent(b.asr),
        percent(b.ra)
    );
    println!(
        "after     {:<11} {:<8} {}",
        percent(Some(a.clean_acc)),
        percent(a.asr),
        percent(a.ra)
    );
    if let Some(removed) = &report.suspects_removed {
        println!(
            "suspects zeroed, before fine-tuning: held-out acc {}, ASR {}, RA {}",
            percent(Some(removed.held_out_acc)),
            percent(removed.asr),
            percent(removed.ra)
        );
    }
    if let Some(probe) = &report.pattern_probe {
        println!(
            "pattern unlearning {}: train-split acc {} clean, {} under gratings of {:.0}% of the range",
            if probe.enabled { "on" } else { "off" },
            percent(Some(probe.clean_acc)),
            percent(Some(probe.patterned_acc)),
            probe.amplitude * 100.0
        );
        if let Some(warped) = probe.warped_acc {
            println!(
                "warp unlearning {}: train-split acc {} under warps of strength {}",
                if probe.warps_enabled { "on" } else { "off" },
                percent(Some(warped)),
                probe.warp_strength
            );
        }
    }
    if let Some(der) = report.der {
        println!("DER {der:.4}");
    }
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(config: Option<PathBuf>) -> RunArgs {
        RunArgs {
            device: None,
            seed: None,
            threads: None,
            config,
            method: None,
        }
    }

    #[test]
    fn flags_override_the_config_file_only_where_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scan.json");
        std::fs::write(&path, r#"{"seed": 5, "purify_epochs": 2}"#).unwrap();
        let from_file = base_config(&run_args(Some(path.clone()))).unwrap();
        assert_eq!((from_file.seed, from_file.purify_epochs), (5, 2));
        assert_eq!(from_file.device, "cpu");
        let overridden = base_config(&RunArgs {
            seed: Some(7),
            ..run_args(Some(path))
        })
        .unwrap();
        assert_eq!((overridden.seed, overridden.purify_epochs), (7, 2));
        assert_eq!(base_config(&run_args(None)).unwrap().seed, 0);
    }

    #[test]
    fn thread_counts_libtorch_refuses_are_input_errors_not_panics() {
        for threads in [0, usize::MAX] {
            let error = base_config(&RunArgs {
                threads: Some(threads),
                ..run_args(None)
            })
            .unwrap_err();
            assert!(error.is_client_error(), "{error}");
        }
    }
}

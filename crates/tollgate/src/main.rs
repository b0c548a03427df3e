//! The `tollgate` binary: argument parsing and wiring only.
//!
//! Exit codes: 0 success; 1 the policy file is invalid (each problem printed
//! on stderr as `file:line:column: message`) or the server could not start;
//! 2 bad command-line usage.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate_server::config::{self, DEFAULT_POLICY, ServerConfig};

mod load;

/// Rate-limit, quota and credits gateway for metered HTTP APIs.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: the proxy and decision API on --listen, the admin API
    /// and metrics on --admin-listen. Flags override the policy file's [server] section.
    Serve(Serve),
    /// Validate a policy file: exit 0 if valid, otherwise print every problem
    /// with file, line and column, and exit 1.
    CheckConfig {
        /// The policy file (TOML).
        file: PathBuf,
        /// Print nothing on success.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Drive a URL at a rate or concurrency for a duration and print counts
    /// per status, the 429 share, latency percentiles and requests/s.
    Load(load::Load),
}

#[derive(Debug, clap::Args)]
struct Serve {
    /// Policy file (TOML). Without it, the built-in default policy runs.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Proxy and decision API address [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Admin API and metrics address [default: 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Upstream base URL, http:// or https:// (a private CA for https goes in
    /// the policy file's [server] upstream_ca_file) [default: a built-in echo server].
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Directory of the SQLite database [default: ./tollgate-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Counter store: `memory`, `redis://host:port/db` or
    /// `redis-cluster://host:port,host:port` [default: memory]. Replicas sharing
    /// Redis should share a secret in TOLLGATE_STORE_SECRET (seeds counter keys).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Database: an SQLite file path, or postgres://… [default: DATA_DIR/tollgate.db].
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// Admin bearer token. Without one the admin API refuses every call.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,
    /// Trusted proxy address or CIDR whose X-Forwarded-For is believed (repeatable).
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    trusted_proxies: Vec<String>,
    /// Runtime worker threads [default: TOKIO_WORKER_THREADS if set, else one
    /// per CPU the process may run on].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, quiet } => check_config(&file, quiet),
        Command::Load(args) => load::run(args),
        Command::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn check_config(file: &Path, quiet: bool) -> ExitCode {
    let policy = match tollgate_core::policy::load(file) {
        Ok(p) => p,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            let n = errors.0.len();
            eprintln!("{}: {} found", file.display(), count(n, "problem"));
            return ExitCode::FAILURE;
        }
    };
    let src = std::fs::read_to_string(file).unwrap_or_default();
    let server = config::server_section(&src)
        .map_err(|e| vec![e])
        .and_then(|s| ServerConfig::default().apply(&s));
    if let Err(problems) = server {
        for p in &problems {
            eprintln!("{}: {p}", file.display());
        }
        eprintln!(
            "{}: {} found",
            file.display(),
            count(problems.len(), "problem")
        );
        return ExitCode::FAILURE;
    }
    if !quiet {
        println!(
            "{}: ok (policy `{}`: {}, {}, {})",
            file.display(),
            policy.name,
            count(policy.plans.len(), "plan"),
            count(policy.operations.len() - 1, "operation"),
            count(policy.limits.len(), "limit")
        );
    }
    ExitCode::SUCCESS
}

fn serve(args: Serve) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // rustls' platform verifier logs every certificate it refuses at
            // ERROR; tollgate logs those failures itself (the upstream's
            // and a webhook's warning give the reason), so its own line is
            // left out unless RUST_LOG asks for it.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rustls_platform_verifier=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let (src, file) = match &args.config {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("{}: cannot read the policy file: {e}", path.display())
            })?,
            path.display().to_string(),
        ),
        None => (
            DEFAULT_POLICY.to_owned(),
            "(built-in default policy)".to_owned(),
        ),
    };
    let policy = tollgate_core::policy::parse(&src, &file)
        .map_err(|e| anyhow::anyhow!("invalid policy:\n{e}"))?;
    let mut cfg = ServerConfig::default();
    let section = config::server_section(&src).map_err(anyhow::Error::msg)?;
    cfg.apply(&section)
        .map_err(|p| anyhow::anyhow!("{file}: {}", p.join("\n")))?;
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.admin_listen {
        cfg.admin_listen = v;
    }
    let flags = config::ServerSection {
        upstream: args.upstream,
        store: args.store,
        workers: args.workers,
        trusted_proxies: if args.trusted_proxies.is_empty() {
            section.trusted_proxies.clone()
        } else {
            args.trusted_proxies
        },
        ..Default::default()
    };
    cfg.apply(&flags)
        .map_err(|p| anyhow::anyhow!("{}", p.join("\n")))?;
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = args.database {
        cfg.database = Some(v);
    }
    cfg.admin_token = args.admin_token.and_then(config::AdminToken::new);
    // Environment only: a flag would show in `ps`.
    cfg.store_secret = std::env::var("TOLLGATE_STORE_SECRET")
        .ok()
        .and_then(config::StoreSecret::new);
    cfg.policy_path = args.config;
    if cfg.admin_token.is_none() {
        tracing::warn!(
            "no admin token: the admin API refuses every call (set TOLLGATE_ADMIN_TOKEN or --admin-token)"
        );
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cfg.workers {
        runtime.worker_threads(n);
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        let running = tollgate_server::start(cfg, policy).await?;
        eprintln!(
            "tollgate listening on http://{} (admin http://{}){}",
            running.addr,
            running.admin_addr,
            running
                .echo_addr
                .map(|a| format!(", built-in echo upstream on http://{a}"))
                .unwrap_or_default()
        );
        shutdown_signal().await;
        tracing::info!("shutting down");
        running.shutdown().await;
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

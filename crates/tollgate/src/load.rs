//! `tollgate load`: arguments and output; the work is `tollgate_client::load`.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tollgate_client::load::{self as engine, LoadOptions, Mode};

/// `tollgate load URL [--rate N [--connections N] | --concurrency N] [--duration 10s] …`
///
/// Exit codes: 0 the run completed (whatever the answers); 1 the options are
/// unusable (bad URL, header or body file); 2 bad command-line usage.
#[derive(Debug, clap::Args)]
pub struct Load {
    /// Target URL (http:// or https://).
    url: String,
    /// Start N calls per second (open loop).
    #[arg(long, value_name = "N", conflicts_with = "concurrency")]
    rate: Option<NonZeroU32>,
    /// Keep N callers busy (closed loop) [default: 10].
    #[arg(long, value_name = "N")]
    concurrency: Option<NonZeroU32>,
    /// Keep-alive connections of a --rate run to an http:// target without
    /// --retry/--pace (each carries one call at a time; latency then runs
    /// from when each call was due) [default: 32].
    #[arg(long, value_name = "N", requires = "rate")]
    connections: Option<NonZeroU32>,
    /// How long to run, e.g. 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// HTTP method.
    #[arg(long, short = 'X', default_value = "GET", value_name = "M")]
    method: String,
    /// A request header, `name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Request body, read from FILE.
    #[arg(long, value_name = "FILE")]
    body: Option<PathBuf>,
    /// Retry 429/502/503/504 as the SDK does (3 retries, back-off, Retry-After).
    #[arg(long)]
    retry: bool,
    /// Pace requests by the remaining count in the rate-limit headers.
    #[arg(long)]
    pace: bool,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// Runs `tollgate load`.
pub fn run(args: Load) -> ExitCode {
    match run_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: Load) -> anyhow::Result<()> {
    let mut opts = LoadOptions::new(args.url);
    opts.method = args
        .method
        .to_ascii_uppercase()
        .parse()
        .map_err(|_| anyhow::anyhow!("--method `{}` is not an HTTP method", args.method))?;
    for h in &args.headers {
        opts.headers.push(engine::parse_header(h)?);
    }
    if let Some(path) = &args.body {
        let body =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("--body {}: {e}", path.display()))?;
        opts.body = Some(body.into());
    }
    if let Some(r) = args.rate {
        opts.mode = Mode::Rate(r);
    } else if let Some(c) = args.concurrency {
        opts.mode = Mode::Concurrency(c);
    }
    if let Some(c) = args.connections {
        opts.connections = c;
    }
    opts.duration = args.duration;
    opts.retry = args.retry;
    opts.pace = args.pace;
    opts.progress = !args.json;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = runtime.block_on(engine::run(opts))?;
    if args.json {
        println!("{}", summary.to_json());
    } else {
        println!("{summary}");
    }
    Ok(())
}

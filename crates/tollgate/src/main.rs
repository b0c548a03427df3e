//! The `tollgate` binary: argument parsing and wiring only.
//!
//! Exit codes: 0 success; 1 the policy file is invalid (each problem printed
//! on stderr as `file:line:column: message`); 2 bad command-line usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Rate-limit, quota and credits gateway for metered HTTP APIs.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a policy file: exit 0 if valid, otherwise print every problem
    /// with file, line and column, and exit 1.
    CheckConfig {
        /// The policy file (TOML).
        file: PathBuf,
        /// Print nothing on success.
        #[arg(long, short)]
        quiet: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, quiet } => check_config(&file, quiet),
    }
}

fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn check_config(file: &std::path::Path, quiet: bool) -> ExitCode {
    match tollgate_core::policy::load(file) {
        Ok(policy) => {
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
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            let n = errors.0.len();
            eprintln!(
                "{}: {n} problem{} found",
                file.display(),
                if n == 1 { "" } else { "s" }
            );
            ExitCode::FAILURE
        }
    }
}

//! The `tenantsync` command-line tool.
//!
//! Module map:
//! - `cmd`: one module per subcommand; [`cmd::policy`] is `tenantsync policy
//!   check|explain|diff` (contract: docs/POLICY.md).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

/// Multi-tenant partial sync for cr-sqlite databases.
#[derive(Parser, Debug)]
#[command(name = "tenantsync", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Row-level-security policy files: check, explain, diff (docs/POLICY.md).
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Policy(c) => {
            let code = cmd::policy::run(
                c,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            );
            ExitCode::from(code)
        }
    }
}

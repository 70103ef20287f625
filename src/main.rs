//! The `tenantsync` command-line tool.

use clap::Parser;

/// Multi-tenant partial sync for cr-sqlite databases.
#[derive(Parser, Debug)]
#[command(name = "tenantsync", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}

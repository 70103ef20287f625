//! The `tenantsync` command-line tool.
//!
//! Module map:
//! - `cmd`: one module per subcommand: [`cmd::demo`] is `tenantsync demo`
//!   (the whole system, verified; docs/CLI.md); [`cmd::sql`] is `tenantsync sql
//!   <DB_PATH> <SQL>` (contract: docs/CLI.md); [`cmd::policy`] is
//!   `tenantsync policy check|explain|diff` (contract: docs/POLICY.md);
//!   [`cmd::replica`] is `tenantsync replica sync` (one round of sync over
//!   HTTP) and [`cmd::token`] is `tenantsync token` (an HS256 test token),
//!   both in docs/CLI.md;
//!   [`cmd::serve`] is `tenantsync serve` (contract: docs/CLI.md, the
//!   protocol docs/PROTOCOL.md); [`cmd::bench`] is `tenantsync bench`, the
//!   load benchmark (contract: docs/BENCH.md; the harness is
//!   `tenantsync_loadtest`); [`cmd::cluster`] is `tenantsync cluster up`, a
//!   local cluster (docs/CLUSTER.md).

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
    /// The whole system in one command: a server, tenants with live clients
    /// over WebSockets writing, moving rows, going offline; then every
    /// replica verified against its policies (docs/CLI.md).
    Demo(cmd::demo::DemoArgs),
    /// Run SQL against a database with the tenantsync core loaded; print the
    /// rows of the last query as JSON arrays, one per line (docs/CLI.md).
    Sql(cmd::sql::SqlArgs),
    /// Row-level-security policy files: check, explain, diff (docs/POLICY.md).
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
    /// A local partial replica of a server: `replica sync` runs one round of
    /// push and pull over HTTP (docs/CLI.md).
    #[command(subcommand)]
    Replica(cmd::replica::ReplicaCommand),
    /// Mint an HS256 test token (for trying a server from a shell; docs/CLI.md).
    Token(cmd::token::TokenArgs),
    /// Run the sync server: HTTP + WebSocket (docs/CLI.md, docs/PROTOCOL.md).
    Serve(Box<cmd::serve::ServeArgs>),
    /// The tenant-isolation load benchmark: a server, many tenants and
    /// WebSocket clients, throughput, latency, memory, leaks (docs/BENCH.md).
    Bench(Box<cmd::bench::BenchArgs>),
    /// A local cluster: NATS and N nodes on loopback (docs/CLUSTER.md).
    #[command(subcommand)]
    Cluster(cmd::cluster::ClusterCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Sql(args) => match cmd::sql::run(args, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Policy(c) => {
            let code = cmd::policy::run(
                c,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            );
            ExitCode::from(code)
        }
        Command::Replica(c) => ExitCode::from(cmd::replica::run(
            c,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )),
        Command::Token(args) => ExitCode::from(cmd::token::run(
            args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Cluster(c) => cmd::cluster::run(c),
        Command::Bench(args) => ExitCode::from(cmd::bench::run(
            args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )),
    }
}

//! `tenantsync replica sync`: one round of sync between a replica file and a
//! server, over HTTP (contract: docs/CLI.md, "tenantsync replica sync").

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;
use tenantsync_client::http::{RoundOptions, RoundReport};
use tenantsync_client::{HttpClient, Replica, ReplicaHandle, subid, sync_round};

/// `tenantsync replica ...`.
#[derive(clap::Subcommand, Debug)]
pub enum ReplicaCommand {
    /// One round: fetch the schema if the replica is new, push its local
    /// changes, pull every subscription up to date (docs/CLI.md).
    Sync(SyncArgs),
}

/// Arguments of `tenantsync replica sync`.
#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The bearer token (a JWT the server accepts).
    #[arg(
        long,
        value_name = "JWT",
        env = "TENANTSYNC_TOKEN",
        hide_env_values = true
    )]
    pub token: String,
    /// The replica database file (created if missing; its directory must
    /// exist).
    #[arg(long, value_name = "PATH")]
    pub db: PathBuf,
    /// A subscription query (repeatable). When given, these are the
    /// replica's subscriptions: stored ones not listed are removed. When
    /// none is given, the stored subscriptions are synced.
    #[arg(long = "subscribe", value_name = "QUERY")]
    pub subscribe: Vec<String>,
    /// The id of the subscription at the same position (repeatable; the
    /// first --id names the first --subscribe, ...). Without one, the id is
    /// derived from the query text: q + 16 hex digits.
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The largest push, in bytes (the server's message limit).
    #[arg(long, value_name = "BYTES", default_value_t = tenantsync_protocol::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_push_bytes: usize,
}

/// Exit code when a push was refused (the pull still ran).
pub const EXIT_REFUSED: u8 = 3;

#[derive(Serialize)]
struct JsonSummary<'a> {
    db: String,
    site_id: String,
    server: &'a str,
    exit_code: u8,
    #[serde(flatten)]
    round: &'a RoundReport,
}

/// Runs the command; returns the exit code. Errors print `error: ...` to
/// `err`.
pub fn run(cmd: &ReplicaCommand, out: &mut impl Write, err: &mut impl Write) -> u8 {
    match cmd {
        ReplicaCommand::Sync(args) => match sync(args, out, err) {
            Ok(code) => code,
            Err(e) => {
                let _ = writeln!(err, "error: {e:#}");
                1
            }
        },
    }
}

fn sync(args: &SyncArgs, out: &mut impl Write, err: &mut impl Write) -> anyhow::Result<u8> {
    if args.ids.len() > args.subscribe.len() {
        let _ = writeln!(
            err,
            "error: {} --id given for {} --subscribe: each --id names the --subscribe at its position",
            args.ids.len(),
            args.subscribe.len()
        );
        return Ok(2);
    }
    let mut subscriptions: Vec<(String, String)> = Vec::new();
    for (i, query) in args.subscribe.iter().enumerate() {
        let id = args
            .ids
            .get(i)
            .cloned()
            .unwrap_or_else(|| subid::derive(query));
        if let Some((_, q)) = subscriptions.iter().find(|(other, _)| *other == id) {
            anyhow::bail!("two subscriptions have the id {id:?}: {q:?} and {query:?}");
        }
        subscriptions.push((id, query.clone()));
    }
    let replica = Replica::open(&args.db).map_err(|e| {
        let mut msg = format!("cannot open the replica {}: {e}", args.db.display());
        if let Some(dir) = args.db.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            msg.push_str(&format!(" (directory {} does not exist)", dir.display()));
        }
        anyhow::anyhow!(msg)
    })?;
    let site = replica.site_id();
    let http = HttpClient::new(&args.server, &args.token)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = ReplicaHandle::spawn(replica);
    let opts = RoundOptions {
        subscriptions,
        max_push_bytes: args.max_push_bytes,
    };
    let result = runtime.block_on(async {
        let r = sync_round(&handle, &http, &opts).await;
        let _ = handle.close().await;
        r
    });
    let report = result?;
    let code = if report.refused.is_empty() {
        0
    } else {
        EXIT_REFUSED
    };
    for r in &report.refused {
        let _ = writeln!(
            err,
            "error: push of local versions ({}, {}] refused: {}: {}",
            r.from, r.to, r.code, r.message
        );
        for row in &r.rows {
            let _ = writeln!(err, "  {row}");
        }
    }
    if args.json {
        let summary = JsonSummary {
            db: args.db.display().to_string(),
            site_id: site.to_string(),
            server: http.base(),
            exit_code: code,
            round: &report,
        };
        serde_json::to_writer(&mut *out, &summary)?;
        writeln!(out)?;
    } else {
        print_summary(&report, out)?;
    }
    out.flush()?;
    Ok(code)
}

fn print_summary(report: &RoundReport, out: &mut impl Write) -> std::io::Result<()> {
    if let Some(from) = report.migrated_from {
        writeln!(
            out,
            "schema: migrated from version {from} to {} (rows, cursors and local changes kept)",
            report.schema_version
        )?;
    }
    if report.schema_applied {
        writeln!(out, "schema: fetched from the server (new replica)")?;
    }
    writeln!(
        out,
        "pushed {} change{} in {} push{} (pushed_version {})",
        report.pushed_changes,
        plural(report.pushed_changes),
        report.pushes,
        if report.pushes == 1 { "" } else { "es" },
        report.pushed_version
    )?;
    for r in &report.refused {
        writeln!(
            out,
            "push refused: {}: {}; quarantined {} local change{}, restored {} row{} to the server's state, removed {}",
            r.code,
            r.message,
            r.report.quarantined,
            plural(r.report.quarantined),
            r.report.restored,
            plural(r.report.restored),
            r.report.removed
        )?;
    }
    for s in &report.subscriptions {
        writeln!(
            out,
            "{} {}: {}, {} row{} received, {} deleted, {} evicted, cursor {}",
            s.id,
            s.query,
            s.mode.as_deref().unwrap_or("-"),
            s.rows_received,
            plural(s.rows_received),
            s.rows_deleted,
            s.rows_released,
            s.cursor.map_or("none".to_owned(), |c| c.to_string())
        )?;
    }
    for id in &report.unsubscribed {
        writeln!(out, "unsubscribed {id}")?;
    }
    if report.rows_removed > 0 {
        writeln!(
            out,
            "removed {} row{} that no subscription holds any more",
            report.rows_removed,
            plural(report.rows_removed)
        )?;
    }
    if report.quarantined > 0 {
        writeln!(
            out,
            "quarantined {} local change{} in this round (table tenantsync_replica_quarantine)",
            report.quarantined,
            plural(report.quarantined)
        )?;
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

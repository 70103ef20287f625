//! What a run found: [`Report`] (the `--json` contract of docs/BENCH.md),
//! the terminal table, and `--report dir` (report.md and SVG plots drawn
//! by hand: bars and a polyline are a few lines of SVG text).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::stats::Percentiles;
use super::verify::Isolation;

/// Everything a run measured. Field names are the JSON contract.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The configuration it ran.
    pub config: serde_json::Value,
    /// Per phase.
    pub phases: Phases,
    /// Server memory.
    pub memory: Memory,
    /// What each shard of the server held at the end (`GET
    /// /v1/admin/status`: db_version, connections, subscriptions, views,
    /// pull_states, peers_in_memory, long_polls, pull_reads, db).
    pub shards: Vec<serde_json::Value>,
    /// With `--cluster`: each node (id, url) and its CPU during the steady
    /// phase (cores, and microseconds per accepted write).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<serde_json::Value>,
    /// The isolation check at quiescence.
    pub isolation: Isolation,
    /// Error messages seen (the first few).
    pub errors: Vec<String>,
}

/// The phases.
#[derive(Debug, Clone, Serialize)]
pub struct Phases {
    /// Every client's initial sync.
    pub snapshot: SnapshotPhase,
    /// Every tenant at its share of the rate.
    pub steady: LoadPhase,
    /// The same plus the noisy tenant.
    pub noisy: NoisyPhase,
    /// A share of clients drop and resume under the steady load.
    pub reconnect: ReconnectPhase,
    /// A policy reload under the steady load.
    pub reload: ReloadPhase,
    /// A schema change once the writes stopped.
    pub schema: SchemaPhase,
}

/// The schema change after the settle phase: `ALTER TABLE todos ADD
/// COLUMN bench_note TEXT` posted with every client connected.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SchemaPhase {
    /// How long `POST /v1/admin/schema` took to answer.
    pub answer_ms: f64,
    /// The answer (`schema_version`, `changed`, ...), or the error.
    pub answer: serde_json::Value,
    /// Connections open.
    pub connections: usize,
    /// `schema` messages received (one per connection when all arrived).
    pub delivered: usize,
    /// From the post to each connection's `schema` message.
    pub delay_ms: Percentiles,
}

/// The reload phase: the policy file with one more SELECT policy on
/// `todos` (granting nothing) is posted halfway through, so every `todos`
/// view is rewritten and compared; what it cost the deliveries is the
/// phase's latency.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadPhase {
    /// The load figures.
    #[serde(flatten)]
    pub load: LoadPhase,
    /// How long `POST /v1/admin/policy` took to answer.
    pub reload_ms: f64,
    /// The answer (`changed_views`, `moved_subscriptions`), or the error.
    pub answer: serde_json::Value,
}

/// The snapshot phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotPhase {
    /// From the first connect to the last subscription live.
    pub seconds: f64,
    /// Rows delivered in initial syncs.
    pub rows: u64,
    /// Connections opened.
    pub connections: usize,
    /// Subscriptions live at the end.
    pub subscriptions: u64,
    /// Clients that could not connect.
    pub connect_errors: u64,
    /// Server CPU in cores (CPU seconds / wall seconds).
    pub server_cpu_cores: Option<f64>,
}

/// A phase under write load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadPhase {
    /// Its length.
    pub seconds: f64,
    /// Writes offered (pushes' inserts and service statements).
    pub writes_offered: u64,
    /// Writes the server accepted, per second.
    pub writes_per_s: f64,
    /// Deliveries of tagged writes to clients (one per client and write),
    /// per second.
    pub deliveries_per_s: f64,
    /// Write-to-delivery latency of writes sent in this phase, every tenant.
    pub latency_ms: Percentiles,
    /// The same for the quiet tenants (all but the noisy one).
    pub quiet_tenants_latency_ms: Percentiles,
    /// Writes refused for good.
    pub writes_refused: u64,
    /// `rate_limited` answers (retried).
    pub rate_limited: u64,
    /// Writes the load generator could not offer in time.
    pub writes_dropped: u64,
    /// Gaps the clients saw (each resynced).
    pub gaps: u64,
    /// Server CPU in cores.
    pub server_cpu_cores: Option<f64>,
    /// The bench process's CPU in cores.
    pub bench_cpu_cores: Option<f64>,
    /// Server RSS at the end of the phase.
    pub server_rss_mb: Option<f64>,
}

/// The noisy-neighbour phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NoisyPhase {
    /// The load figures (every tenant).
    #[serde(flatten)]
    pub load: LoadPhase,
    /// The noisy tenant's own figures.
    pub noisy_tenant: NoisyTenant,
    /// Quiet tenants' p99 here over their p99 in the steady phase.
    pub quiet_p99_ratio: Option<f64>,
}

/// The noisy tenant's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NoisyTenant {
    /// Its index.
    pub tenant: usize,
    /// Its accepted writes per second.
    pub writes_per_s: f64,
    /// Its write-to-delivery latency.
    pub latency_ms: Percentiles,
}

/// The reconnect storm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconnectPhase {
    /// The load figures.
    #[serde(flatten)]
    pub load: LoadPhase,
    /// Clients dropped.
    pub clients: usize,
    /// From the drop to every subscription of the client live again.
    pub resume_ms: Percentiles,
    /// `subscribed` answers by mode during the phase.
    pub modes: Modes,
    /// Rows the resumes delivered.
    pub rows_resent: u64,
}

/// `subscribed` answers by mode.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Modes {
    /// New subscriptions.
    pub snapshot: u64,
    /// Resumed from the cursor.
    pub resume: u64,
    /// Fetched again.
    pub refetch: u64,
}

/// Server memory.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// RSS after the snapshot phase (every client connected and live).
    pub rss_mb: Option<f64>,
    /// RSS after seeding, before any client.
    pub rss_before_clients_mb: Option<f64>,
    /// Highest RSS seen.
    pub rss_peak_mb: Option<f64>,
    /// (RSS after snapshot - RSS before clients) / subscriptions: every
    /// cost of holding them, connections included.
    pub bytes_per_subscription: Option<f64>,
    /// The same divided by views.
    pub bytes_per_view: Option<f64>,
    /// The same divided by connections.
    pub bytes_per_connection: Option<f64>,
    /// Subscriptions, views and connections the server reported.
    pub subscriptions: Option<f64>,
    /// Views (shared effective queries).
    pub views: Option<f64>,
    /// Open WebSocket connections.
    pub connections: Option<f64>,
    /// (live subscriptions, RSS MB) sampled while clients connected.
    pub samples: Vec<(u64, f64)>,
}

impl Report {
    /// The terminal table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = &self.phases;
        let _ = writeln!(
            s,
            "{:<10} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>6}",
            "phase", "writes/s", "deliv./s", "p50 ms", "p90 ms", "p99 ms", "max ms", "cpu"
        );
        let mut row = |name: &str, l: &LoadPhase| {
            let _ = writeln!(
                s,
                "{:<10} {:>9.0} {:>11.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6}",
                name,
                l.writes_per_s,
                l.deliveries_per_s,
                l.latency_ms.p50,
                l.latency_ms.p90,
                l.latency_ms.p99,
                l.latency_ms.max,
                l.server_cpu_cores.map_or("-".into(), |c| format!("{c:.2}")),
            );
        };
        row("steady", &p.steady);
        row("noisy", &p.noisy.load);
        row("reconnect", &p.reconnect.load);
        row("reload", &p.reload.load);
        let q = |x: &Percentiles| format!("p50 {:.1} / p99 {:.1} ms", x.p50, x.p99);
        let _ = writeln!(
            s,
            "quiet tenants: steady {}, noisy {} (ratio {})",
            q(&p.steady.quiet_tenants_latency_ms),
            q(&p.noisy.load.quiet_tenants_latency_ms),
            p.noisy
                .quiet_p99_ratio
                .map_or("-".into(), |r| format!("{r:.2}x"))
        );
        let _ = writeln!(
            s,
            "noisy tenant {}: {:.0} writes/s accepted, {} rate_limited, {}",
            p.noisy.noisy_tenant.tenant,
            p.noisy.noisy_tenant.writes_per_s,
            p.noisy.load.rate_limited,
            q(&p.noisy.noisy_tenant.latency_ms)
        );
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "node {} ({}): steady {} cores, {} us of CPU per write",
                n["id"].as_str().unwrap_or("?"),
                n["url"].as_str().unwrap_or("?"),
                n["steady_cpu_cores"]
                    .as_f64()
                    .map_or("-".into(), |c| format!("{c:.2}")),
                n["steady_cpu_us_per_write"]
                    .as_f64()
                    .map_or("-".into(), |c| format!("{c:.0}")),
            );
        }
        let _ = writeln!(
            s,
            "snapshot: {} connections, {} subscriptions live in {:.2} s, {} rows",
            p.snapshot.connections, p.snapshot.subscriptions, p.snapshot.seconds, p.snapshot.rows
        );
        let _ = writeln!(
            s,
            "reconnect: {} clients resumed, p50 {:.0} / p99 {:.0} / max {:.0} ms; modes resume {} refetch {} snapshot {}; {} rows resent",
            p.reconnect.clients,
            p.reconnect.resume_ms.p50,
            p.reconnect.resume_ms.p99,
            p.reconnect.resume_ms.max,
            p.reconnect.modes.resume,
            p.reconnect.modes.refetch,
            p.reconnect.modes.snapshot,
            p.reconnect.rows_resent
        );
        let _ = writeln!(
            s,
            "reload: POST /v1/admin/policy answered in {:.0} ms ({}); deliveries meanwhile p99 {:.1} / max {:.1} ms",
            p.reload.reload_ms,
            p.reload.answer,
            p.reload.load.latency_ms.p99,
            p.reload.load.latency_ms.max
        );
        if p.schema.connections == 0 {
            let why = p.schema.answer["skipped"]
                .as_str()
                .unwrap_or("an external server's schema is not changed");
            let _ = writeln!(s, "schema: not changed ({why})");
        } else {
            let _ = writeln!(
                s,
                "schema: POST /v1/admin/schema answered in {:.0} ms; the schema message reached {} of {} connections, p50 {:.0} / p99 {:.0} / max {:.0} ms after the post",
                p.schema.answer_ms,
                p.schema.delivered,
                p.schema.connections,
                p.schema.delay_ms.p50,
                p.schema.delay_ms.p99,
                p.schema.delay_ms.max
            );
        }
        let m = &self.memory;
        let f = |x: Option<f64>, d: usize| x.map_or("-".into(), |v| format!("{v:.d$}"));
        let _ = writeln!(
            s,
            "memory: RSS {} MB ({} MB before clients, peak {} MB); {} B per subscription, {} B per view, {} B per connection ({} subscriptions, {} views)",
            f(m.rss_mb, 1),
            f(m.rss_before_clients_mb, 1),
            f(m.rss_peak_mb, 1),
            f(m.bytes_per_subscription, 0),
            f(m.bytes_per_view, 0),
            f(m.bytes_per_connection, 0),
            f(m.subscriptions, 0),
            f(m.views, 0),
        );
        for sh in &self.shards {
            let n = |k: &str| sh[k].as_u64().unwrap_or(0);
            let _ = writeln!(
                s,
                "shard {}: {} commits (db_version), {} connections, {} subscriptions, {} views",
                n("shard"),
                n("db_version"),
                n("connections"),
                n("subscriptions"),
                n("views"),
            );
        }
        let i = &self.isolation;
        let _ = writeln!(
            s,
            "isolation: {} clients, {} subscriptions, {} rows checked: {} leaks, {} misses{}",
            i.clients_checked,
            i.subscriptions_checked,
            i.rows_checked,
            i.leaks,
            i.misses,
            if i.quiescent {
                ""
            } else {
                " (NOT quiescent: the settle timed out; these may be deliveries still queued)"
            }
        );
        s
    }

    /// Writes report.md, latency.svg, noisy.svg and memory.svg into `dir`.
    pub fn write_dir(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let p = &self.phases;
        let pct = |x: &Percentiles| vec![x.p50, x.p90, x.p99];
        std::fs::write(
            dir.join("latency.svg"),
            bars(
                "Write-to-delivery latency per phase (ms)",
                &["p50", "p90", "p99"],
                &[
                    ("steady", pct(&p.steady.latency_ms)),
                    ("noisy", pct(&p.noisy.load.latency_ms)),
                    ("reconnect", pct(&p.reconnect.load.latency_ms)),
                ],
            ),
        )?;
        std::fs::write(
            dir.join("noisy.svg"),
            bars(
                "Quiet tenants' latency without and with the noisy tenant (ms)",
                &["p50", "p90", "p99"],
                &[
                    ("without", pct(&p.steady.quiet_tenants_latency_ms)),
                    ("with noisy", pct(&p.noisy.load.quiet_tenants_latency_ms)),
                ],
            ),
        )?;
        std::fs::write(
            dir.join("memory.svg"),
            line(
                "Server RSS (MB) vs live subscriptions",
                &self
                    .memory
                    .samples
                    .iter()
                    .map(|&(s, m)| (s as f64, m))
                    .collect::<Vec<_>>(),
            ),
        )?;
        let mut md = String::new();
        let _ = writeln!(md, "# tenantsync bench report\n");
        let _ = writeln!(
            md,
            "Configuration:\n\n```json\n{}\n```\n",
            serde_json::to_string_pretty(&self.config).unwrap_or_default()
        );
        let _ = writeln!(md, "## Summary\n\n```\n{}```\n", self.table());
        let _ = writeln!(
            md,
            "## Latency per phase\n\n![latency](latency.svg)\n\n\
             ## Quiet tenants with and without the noisy one\n\n![noisy](noisy.svg)\n\n\
             ## Memory vs subscriptions\n\n![memory](memory.svg)\n"
        );
        if !self.errors.is_empty() || !self.isolation.samples.is_empty() {
            let _ = writeln!(md, "## Findings\n");
            for e in self.isolation.samples.iter().chain(&self.errors) {
                let _ = writeln!(md, "- {e}");
            }
            md.push('\n');
        }
        let _ = writeln!(
            md,
            "The figures in JSON: `report.json` (the contract of docs/BENCH.md)."
        );
        std::fs::write(dir.join("report.md"), md)?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(self).unwrap_or_default(),
        )
    }
}

const W: f64 = 640.0;
const H: f64 = 360.0;
const M: f64 = 50.0;
const COLORS: [&str; 4] = ["#4c78a8", "#f58518", "#e45756", "#72b7b2"];

fn frame(title: &str, body: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{x}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n\
         <line x1=\"{M}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{M}\" y1=\"{M}\" x2=\"{M}\" y2=\"{b}\" stroke=\"black\"/>\n{body}</svg>\n",
        x = W / 2.0,
        b = H - M,
        r = W - M / 2.0,
    )
}

fn y_axis(max: f64) -> String {
    let mut s = String::new();
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = H - M - (H - 2.0 * M) * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            M - 4.0,
            y + 4.0,
            short(v)
        );
    }
    s
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Grouped bars: one group per (label, values), one bar per series.
fn bars(title: &str, series: &[&str], groups: &[(&str, Vec<f64>)]) -> String {
    let max = groups
        .iter()
        .flat_map(|g| g.1.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let mut body = y_axis(max);
    let gw = (W - 1.5 * M) / groups.len().max(1) as f64;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    for (gi, (label, vals)) in groups.iter().enumerate() {
        let x0 = M + gw * gi as f64 + gw * 0.1;
        for (si, v) in vals.iter().enumerate() {
            let h = (H - 2.0 * M) * v / max;
            let x = x0 + bw * si as f64;
            let _ = writeln!(
                body,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
                H - M - h,
                bw * 0.9,
                COLORS[si % COLORS.len()],
                x + bw * 0.45,
                H - M - h - 3.0,
                short(*v)
            );
        }
        let _ = writeln!(
            body,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            x0 + gw * 0.4,
            H - M + 16.0
        );
    }
    for (si, name) in series.iter().enumerate() {
        let x = W - M - 60.0;
        let y = M + 16.0 * si as f64;
        let _ = writeln!(
            body,
            "<rect x=\"{x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{}\">{name}</text>",
            y - 9.0,
            COLORS[si % COLORS.len()],
            x + 14.0,
            y
        );
    }
    frame(title, &body)
}

/// One polyline through (x, y) points.
fn line(title: &str, points: &[(f64, f64)]) -> String {
    let xmax = points.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1.0);
    let ymax = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let mut body = y_axis(ymax);
    let pts: Vec<String> = points
        .iter()
        .map(|&(x, y)| {
            format!(
                "{:.1},{:.1}",
                M + (W - 1.5 * M) * x / xmax,
                H - M - (H - 2.0 * M) * y / ymax
            )
        })
        .collect();
    let _ = writeln!(
        body,
        "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
        COLORS[0],
        pts.join(" ")
    );
    for i in 0..=4 {
        let v = xmax * f64::from(i) / 4.0;
        let _ = writeln!(
            body,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            M + (W - 1.5 * M) * f64::from(i) / 4.0,
            H - M + 16.0,
            short(v)
        );
    }
    frame(title, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_one_bar_per_value() {
        let s = bars(
            "t",
            &["a", "b"],
            &[("x", vec![1.0, 2.0]), ("y", vec![3.0, 0.5])],
        );
        assert!(s.starts_with("<svg"));
        assert_eq!(s.matches("<rect ").count(), 1 + 4 + 2, "{s}");
        let l = line("t", &[(0.0, 1.0), (10.0, 2.0)]);
        assert!(l.contains("<polyline"));
    }
}

//! The server under test: `tenantsync serve` as a child process on a temp
//! database with the examples' schema and policy (or external servers),
//! and what /proc says about a process (RSS, CPU time), plus the file
//! descriptor limit the bench raises for itself (and its child).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// The example schema the bench's server runs.
pub const SCHEMA_SQL: &str = include_str!("../../examples/schema.sql");
/// The example policy the bench's server runs.
pub const POLICY_SQL: &str = include_str!("../../examples/policy.sql");

/// A `tenantsync serve` child process.
pub struct ChildServer {
    child: Child,
    /// Its base URL (`http://127.0.0.1:port`).
    pub url: String,
    /// Its database file.
    pub db: PathBuf,
    _dir: tempfile::TempDir,
}

/// How to start the child.
#[derive(Debug, Clone)]
pub struct ChildOptions {
    /// The `tenantsync` binary.
    pub exe: PathBuf,
    /// The HS256 secret.
    pub secret: String,
    /// `--synchronous`.
    pub synchronous: String,
    /// `--readers`.
    pub readers: usize,
    /// Extra `serve` arguments.
    pub extra: Vec<String>,
}

impl ChildServer {
    /// Starts the server and waits for its address.
    pub fn start(o: &ChildOptions) -> anyhow::Result<ChildServer> {
        let dir = tempfile::tempdir().context("cannot create a temp directory")?;
        let schema = dir.path().join("schema.sql");
        let policy = dir.path().join("policy.sql");
        std::fs::write(&schema, SCHEMA_SQL)?;
        std::fs::write(&policy, POLICY_SQL)?;
        let db = dir.path().join("bench.db");
        let mut cmd = Command::new(&o.exe);
        cmd.arg("serve")
            .arg("--db")
            .arg(&db)
            .arg("--schema")
            .arg(&schema)
            .arg("--policy")
            .arg(&policy)
            .args(["--listen", "127.0.0.1:0"])
            .args(["--synchronous", &o.synchronous])
            .args(["--readers", &o.readers.to_string()])
            .args(["--max-connections-per-tenant", "100000"])
            .args(["--max-connections", "1000000"])
            .args(o.extra.iter())
            .env("TENANTSYNC_JWT_SECRET", &o.secret)
            .env(
                "TENANTSYNC_LOG",
                std::env::var("TENANTSYNC_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} serve", o.exe.display()))?;
        let out = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .context("reading the server's address")?;
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("the server did not print its address (got {line:?})");
        };
        Ok(ChildServer {
            url: url.to_owned(),
            child,
            db,
            _dir: dir,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it (SIGTERM, then a kill after 10 s).
    pub fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        for _ in 0..100 {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A node of a local cluster.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub url: String,
    pub pid: u32,
}

/// `tenantsync cluster up` as a child: NATS and N nodes on loopback, with
/// the bench's schema and policy.
pub struct ClusterChild {
    child: Child,
    /// Its nodes, as it printed them.
    pub nodes: Vec<ClusterNode>,
    /// The first node's copy of each shard (the isolation check reads them).
    pub dbs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl ClusterChild {
    /// Starts the cluster and waits for `cluster ready`.
    pub fn start(
        exe: &Path,
        secret: &str,
        nodes: usize,
        shards: usize,
    ) -> anyhow::Result<ClusterChild> {
        let dir = tempfile::tempdir().context("cannot create a temp directory")?;
        let schema = dir.path().join("schema.sql");
        let policy = dir.path().join("policy.sql");
        std::fs::write(&schema, SCHEMA_SQL)?;
        std::fs::write(&policy, POLICY_SQL)?;
        let mut child = Command::new(exe)
            .args(["cluster", "up", "--nodes", &nodes.to_string()])
            .arg("--dir")
            .arg(dir.path().join("cluster"))
            .arg("--schema")
            .arg(&schema)
            .arg("--policy")
            .arg(&policy)
            .args(["--shards", &shards.to_string()])
            .env("TENANTSYNC_JWT_SECRET", secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {} cluster up", exe.display()))?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut found = Vec::new();
        loop {
            let mut line = String::new();
            if out.read_line(&mut line)? == 0 {
                let _ = child.kill();
                bail!("cluster up ended before `cluster ready`");
            }
            let line = line.trim();
            if line == "cluster ready" {
                break;
            }
            let f: Vec<&str> = line.split(' ').collect();
            if let ["node", id, url, "pid", pid] = f[..] {
                found.push(ClusterNode {
                    id: id.to_owned(),
                    url: url.to_owned(),
                    pid: pid.parse()?,
                });
            }
        }
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let first = dir.path().join("cluster").join(&found[0].id).join("shards");
        let dbs = (0..shards)
            .map(|k| first.join(format!("shard-{k}.db")))
            .collect();
        Ok(ClusterChild {
            child,
            nodes: found,
            dbs,
            _dir: dir,
        })
    }
}

impl Drop for ClusterChild {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid: it stops what it started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// What /proc says about a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// Resident set size, bytes.
    pub rss: u64,
    /// User + system CPU time, seconds.
    pub cpu: f64,
}

/// Reads `/proc/<pid>/status` (VmRSS) and `/proc/<pid>/stat` (utime,
/// stime); `None` off Linux or when the process is gone.
pub fn sample(pid: Option<u32>) -> Option<ProcSample> {
    let base = match pid {
        Some(p) => PathBuf::from(format!("/proc/{p}")),
        None => PathBuf::from("/proc/self"),
    };
    Some(ProcSample {
        rss: rss(&base)?,
        cpu: cpu(&base)?,
    })
}

fn rss(base: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(base.join("status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn cpu(base: &Path) -> Option<f64> {
    let s = std::fs::read_to_string(base.join("stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5): 12 and 13 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Raises the soft open-file limit to the hard one; returns the new soft
/// limit. Children inherit it.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    r.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_reads_this_process() {
        let s = sample(None).expect("Linux /proc");
        assert!(s.rss > 1024 * 1024, "{s:?}");
        assert!(s.cpu >= 0.0);
        assert!(raise_nofile() >= 1024);
    }
}

//! A real PostgreSQL server for the differential tests of write decisions
//! (tests/tests/pg_differential.rs): Debian's `postgresql-15` binaries
//! (not on PATH: found under /usr/lib/postgresql, or in
//! `TENANTSYNC_PG_BIN`), a cluster in a temporary directory, on a free
//! loopback port. PostgreSQL refuses to run as root, so as root the
//! cluster belongs to `nobody` and its commands run through `runuser`.
//! `.ci/run` installs the package when it is missing; a test that needs
//! PostgreSQL fails (it never skips) when it cannot start one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A running PostgreSQL cluster; stopped and removed on drop.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    as_nobody: bool,
}

/// The directory of PostgreSQL's server binaries (`initdb`, `pg_ctl`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("TENANTSYNC_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (no /usr/lib/postgresql): apt-get install postgresql-15, or set TENANTSYNC_PG_BIN")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .context("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
}

impl PgServer {
    /// Initializes and starts a cluster (trust authentication, superuser
    /// `postgres`, no fsync: a test's data is thrown away).
    pub fn start() -> anyhow::Result<PgServer> {
        let bin = bin_dir()?;
        let dir = tempfile::tempdir().context("temporary directory")?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_nobody = unsafe { libc::geteuid() } == 0;
        if as_nobody {
            let status = Command::new("chown")
                .args(["-R", "nobody"])
                .arg(dir.path())
                .status()
                .context("chown the cluster directory to nobody")?;
            if !status.success() {
                bail!("chown nobody {} failed", dir.path().display());
            }
        }
        let port = free_port()?;
        let server = PgServer {
            bin,
            dir,
            port,
            as_nobody,
        };
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ],
        )?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            path_str(server.dir.path())?
        );
        let log = server.dir.path().join("log");
        server.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-o",
                &opts,
                "-l",
                path_str(&log)?,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        Ok(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .with_context(|| format!("run {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A connection as the superuser `postgres`.
    pub fn connect(&self) -> anyhow::Result<postgres::Client> {
        postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                self.port
            ),
            postgres::NoTls,
        )
        .context("connect to the test PostgreSQL")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Ok(data) = path_str(&self.data()).map(str::to_owned) {
            let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        }
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a non-UTF-8 temporary path")
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(l.local_addr()?.port())
}

//! A schema change on the engine thread, in two phases so that a node's
//! shards all take it or none does (`crate::SyncService::change_schema`):
//! the change runs in an open transaction and is checked (what replicas
//! hold stays valid, the policies still hold), the verdict goes back, and
//! the engine commits or rolls back on the service's decision.
//!
//! Connections get the new version's migration in a `schema` message
//! queued before the commit, so it precedes every later change they get;
//! the pull answers carry the version their snapshot read (docs/PROTOCOL.md
//! §5.4).

use std::sync::Arc;
use std::time::Duration;

use tenantsync_policy::PolicySet;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::SchemaChangeResponse;
use tenantsync_protocol::ws::ServerMsg;
use tokio::sync::oneshot;

use super::migrate::{self, Applied, Mode};
use super::schema::ServerSchema;
use super::write::{self, internal};
use super::{Engine, commit, longpoll};
use crate::contract::{ApiError, OutFrame};

/// How long a shard holds its prepared change waiting for the others.
const DECISION_WAIT: Duration = Duration::from_secs(30);

/// `Cmd::Schema`: a change to prepare, then commit or roll back.
pub(crate) struct SchemaCmd {
    pub sql: String,
    /// The verdict of the first phase.
    pub prepared: oneshot::Sender<Result<SchemaChangeResponse, ApiError>>,
    /// The service's decision (true: commit).
    pub decide: std::sync::mpsc::Receiver<bool>,
    /// The second phase's outcome.
    pub done: oneshot::Sender<Result<(), ApiError>>,
}

/// A change applied in the open transaction, not yet committed.
struct Staged {
    applied: Applied,
    /// The schema and policies after it (`None`: nothing changed).
    after: Option<(Arc<ServerSchema>, PolicySet)>,
}

fn refused(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::SchemaRefused, message)
}

impl Engine {
    pub(super) fn change_schema(&mut self, cmd: SchemaCmd) {
        let SchemaCmd {
            sql,
            prepared,
            decide,
            done,
        } = cmd;
        if self.journal.is_some() {
            // A changeset carries rows, not schema: the log has no entry
            // for a schema change yet (docs/CLUSTER.md, "Not yet").
            let _ = prepared.send(Err(refused(
                "schema changes are not supported in a cluster yet: change the schema file and start the cluster on a new directory, or run one node",
            )));
            return;
        }
        if let Err(e) = self.db.conn().execute_batch("BEGIN IMMEDIATE") {
            let _ = prepared.send(Err(internal(e)));
            return;
        }
        let staged = self.stage(&sql);
        if let Err(e) = write::install_authorizer(&mut self.db, self.guard.clone()) {
            tracing::error!(error = %e, "cannot reinstall the service SQL authorizer");
        }
        let staged = match staged {
            Ok(s) => s,
            Err(e) => {
                self.rollback();
                let _ = prepared.send(Err(e));
                return;
            }
        };
        let answer = SchemaChangeResponse {
            schema_version: staged
                .after
                .as_ref()
                .map_or(self.schema.version(), |(s, _)| s.version()),
            changed: staged.after.is_some(),
            applied: staged.applied.applied,
            skipped: staged.applied.skipped,
        };
        let version = answer.schema_version;
        if prepared.send(Ok(answer)).is_err() {
            self.rollback();
            return;
        }
        let go = matches!(decide.recv_timeout(DECISION_WAIT), Ok(true));
        let Some((schema, policies)) = staged.after.filter(|_| go) else {
            self.rollback();
            let _ = done.send(if go {
                Ok(())
            } else {
                Err(internal("the schema change was abandoned"))
            });
            return;
        };
        // Queued before the commit: the message precedes anything read after
        // it on every connection. (Should the commit fail, clients took a
        // change the server lacks; it is idempotent, so posting the change
        // again brings the server level.)
        let frame = serde_json::to_string(&ServerMsg::Schema {
            schema_version: version,
            migrations: schema
                .response
                .migrations
                .iter()
                .filter(|m| m.version > self.schema.version())
                .cloned()
                .collect(),
        })
        .expect("schema message serialises");
        for c in self.subs.conns.values() {
            c.outbox.push_frame(OutFrame::Text(frame.clone()));
        }
        if let Err(e) = self.db.conn().execute_batch("COMMIT") {
            tracing::error!(error = %e, schema_version = version, "committing a schema change failed");
            self.rollback();
            let _ = done.send(Err(internal(e)));
            return;
        }
        self.install_schema(schema, policies);
        self.after_schema_commit();
        tracing::info!(schema_version = version, "schema changed");
        let _ = done.send(Ok(()));
    }

    fn rollback(&mut self) {
        if let Err(e) = self.db.conn().execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "rolling back a schema change failed");
        }
    }

    /// Runs and checks the change in the open transaction.
    fn stage(&mut self, sql: &str) -> Result<Staged, ApiError> {
        let before = self.db.schema().map_err(internal)?;
        let applied = migrate::run_script(&mut self.db, sql, Mode::Change).map_err(refused)?;
        if applied.applied.is_empty() {
            return Ok(Staged {
                applied,
                after: None,
            });
        }
        let now = self.db.schema().map_err(internal)?;
        migrate::check_kept(&before, &now).map_err(refused)?;
        migrate::check_crrs(&self.db, &now).map_err(refused)?;
        migrate::record(self.db.conn(), &applied.script).map_err(internal)?;
        let log = migrate::read_log(self.db.conn()).map_err(internal)?;
        let schema = Arc::new(self.schema.evolve(&self.db, log).map_err(internal)?);
        let current = self.policy.policies();
        let policies = PolicySet::parse(current.file_name(), current.source(), &schema.policy)
            .map_err(|d| {
                let mut e = refused(format!(
                    "the policies in force ({}) do not hold against the changed schema; change them first",
                    current.file_name()
                ));
                e.diagnostics = d.to_string().lines().map(str::to_owned).collect();
                e
            })?;
        Ok(Staged {
            applied,
            after: Some((schema, policies)),
        })
    }

    /// The committed schema in force everywhere: this engine, its write
    /// plans, the sessions' policies, the readers and the service.
    fn install_schema(&mut self, schema: Arc<ServerSchema>, policies: PolicySet) {
        self.schema = schema;
        self.policy.replace_policies(policies);
        self.publish_policy();
        self.plans.clear(&mut self.filters);
        self.read_scope =
            longpoll::read_scope(&self.schema, self.policy.policies(), &self.tenant_claim);
        if self.hook_all
            && let Some(h) = &mut self.hooked
        {
            h.extend(self.schema.tables.iter().map(|t| t.id));
        }
        self.cell.set(self.schema.clone());
    }

    /// What the change committed (the clocks `crsql_as_crr` gave existing
    /// rows) goes out like any commit; long polls answer with the version.
    fn after_schema_commit(&mut self) {
        let prev = self.version;
        let version = match self.db.db_version() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the db_version after a schema change");
                prev
            }
        };
        self.version = version;
        self.stats
            .version
            .store(version, std::sync::atomic::Ordering::Release);
        if version > prev {
            match commit::read_batch(&self.db, &self.schema, prev, version) {
                Ok(rows) => self.fan_out(rows, version),
                Err(e) => {
                    tracing::error!(error = %e, version, "reading the schema change's commit failed")
                }
            }
        }
        self.longpolls.wake_all(version);
    }
}

//! The backend's write hook (docs/SAAS.md, "Backend write validation").
//!
//! A push that changes rows of a hooked table is judged by the policies,
//! then the engine rolls it back and answers [`PushAnswer::Ask`] with the
//! rows as the merge made them ([`HookRow`]: before and after, column by
//! column). The async side ([`HookClient::judge`]) asks the backend, with a
//! timeout per call, retries, and the configured answer when it never
//! answers; the push then runs again with the verdicts ([`HookRound`]). If
//! the rows the merge makes are still the ones the backend saw, refused
//! rows refuse the push whole (the backend's reason in the refusal) and
//! accepted ones commit; if a concurrent write changed them, the backend is
//! asked again. The engine thread never waits for the backend.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenantsync_protocol::http::PushResponse;
use tenantsync_types::{PackedPk, SiteId, Value};

use crate::contract::{Principal, PushError, WriteHook};

/// One row a push changes, as the backend sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct HookRow {
    pub table: String,
    /// The packed primary key (hex), as refusals name rows.
    pub pk: PackedPk,
    /// Its columns before the push (`None`: it did not exist).
    pub before: Option<BTreeMap<String, Value>>,
    /// Its columns after the merge (`None`: deleted).
    pub after: Option<BTreeMap<String, Value>>,
}

/// The backend's answer for one row.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct Verdict {
    pub accept: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// What the backend saw and said, carried by the push's next run.
#[derive(Debug)]
pub(crate) struct HookRound {
    pub seen: Vec<HookRow>,
    pub verdicts: Vec<Verdict>,
}

/// The engine's answer to a push on the HTTP path.
pub(crate) enum PushAnswer {
    Done(Result<PushResponse, PushError>),
    /// Ask the backend about these rows, then push again.
    Ask(Vec<HookRow>),
}

#[derive(Serialize)]
struct Request<'a> {
    tenant: Option<&'a str>,
    subject: &'a str,
    role: Option<&'a str>,
    claims: &'a serde_json::Map<String, serde_json::Value>,
    site_id: SiteId,
    rows: &'a [HookRow],
}

#[derive(Deserialize)]
struct Answer {
    rows: Vec<Verdict>,
}

/// Calls the backend.
#[derive(Debug)]
pub(crate) struct HookClient {
    cfg: WriteHook,
}

impl HookClient {
    pub fn new(cfg: WriteHook) -> HookClient {
        HookClient { cfg }
    }

    /// The backend's verdict on each row; when no call succeeds, every row
    /// gets the configured answer.
    pub async fn judge(&self, who: &Principal, site: SiteId, rows: &[HookRow]) -> Vec<Verdict> {
        let body = serde_json::to_vec(&Request {
            tenant: who.tenant.as_deref(),
            subject: &who.subject,
            role: who.identity.claims().get("role").and_then(|r| r.as_str()),
            claims: who.identity.claims(),
            site_id: site,
            rows,
        })
        .expect("hook requests serialise");
        let mut last = String::new();
        for attempt in 0..=self.cfg.retries {
            match self.call(&body, rows.len()).await {
                Ok(v) => return v,
                Err(e) => {
                    tracing::warn!(attempt, error = %e, url = %self.cfg.url, "the write hook failed");
                    last = e;
                }
            }
        }
        metrics::counter!("tenantsync_write_hook_failures_total").increment(1);
        let verdict = Verdict {
            accept: self.cfg.accept_on_failure,
            reason: Some(format!("the backend did not answer: {last}")),
        };
        vec![verdict; rows.len()]
    }

    async fn call(&self, body: &[u8], n: usize) -> Result<Vec<Verdict>, String> {
        let answer =
            crate::outbound::call(&self.cfg.url, Some(body.to_vec()), self.cfg.timeout).await?;
        let a: Answer = serde_json::from_slice(&answer)
            .map_err(|e| format!("the answer is not {{\"rows\": [verdict, ...]}}: {e}"))?;
        if a.rows.len() != n {
            return Err(format!(
                "the answer has {} verdicts for {n} rows",
                a.rows.len()
            ));
        }
        Ok(a.rows)
    }
}

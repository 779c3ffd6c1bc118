//! Ground truth and counters, as served by `GET /_sim/truth` and `GET /_sim/stats`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::content;
use crate::state::{BlobKind, State, TenantState};

/// What a correct collector must end up with, per tenant.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Truth {
    /// Per tenant id.
    pub tenants: BTreeMap<String, TenantTruth>,
}

/// Ground truth for one tenant, computed at the time of the request.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TenantTruth {
    /// Every record Id found in a deliverable blob (listable now, well-formed, not oversized, not
    /// expired), with the lowercase hex SHA-256 of each distinct byte variant of the record object as it
    /// appears in such blobs (sorted).
    pub expected: BTreeMap<String, Vec<String>>,
    /// Record Ids that appear only in expired, malformed or oversized listable blobs.
    pub undeliverable_ids: Vec<String>,
    /// contentIds of listable blobs whose contentExpiration is past.
    pub expired_content_ids: Vec<String>,
    /// contentIds of listable blobs served malformed.
    pub malformed_content_ids: Vec<String>,
    /// contentIds of listable blobs served larger than `oversized_bytes`.
    pub oversized_content_ids: Vec<String>,
}

/// Counters of one tenant.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TenantStats {
    /// Tokens issued.
    pub token_ok: u64,
    /// Token requests refused, by AADSTS code (e.g. `"7000215"`).
    pub token_failed: BTreeMap<String, u64>,
    /// API requests by operation (`start`, `list`, `content`, `fetch`, `other`), including refused ones.
    pub api_requests: BTreeMap<String, u64>,
    /// API requests refused with 401 (bad, expired or other-tenant token).
    pub unauthorized: u64,
    /// Blob fetches per contentId (every `GET audit/{id}` that passed authentication).
    pub blob_fetches: BTreeMap<String, u64>,
    /// API requests (blob fetches included) without a `PublisherIdentifier` query parameter.
    pub missing_publisher_identifier: u64,
    /// Listing requests answered AF20030 or AF20055.
    pub window_errors: u64,
    /// Every `subscriptions/start` call, per content type, with its time (RFC 3339, tenant clock).
    pub start_calls: BTreeMap<String, Vec<String>>,
    /// Start calls less than 15 minutes after the previous start of the same content type.
    pub start_too_soon: u64,
    /// Requests answered AF429.
    pub throttled: u64,
    /// Requests answered AF50000.
    pub af50000: u64,
    /// Requests that were never answered (hang fault).
    pub hung: u64,
    /// Listing pages answered with an endless `NextPageUri` (`endless_listing` fault).
    #[serde(default)]
    pub endless_pages: u64,
}

/// All counters: totals plus per tenant.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Tokens issued, all tenants.
    pub token_ok: u64,
    /// Token requests refused by AADSTS code, all tenants (unknown tenants included).
    pub token_failed: BTreeMap<String, u64>,
    /// API requests by operation, all tenants.
    pub api_requests: BTreeMap<String, u64>,
    /// Blob fetches, all tenants.
    pub blob_fetches_total: u64,
    /// Requests without `PublisherIdentifier`, all tenants.
    pub missing_publisher_identifier: u64,
    /// AF20030/AF20055 answers, all tenants.
    pub window_errors: u64,
    /// Start calls less than 15 minutes after the previous one of the same type, all tenants.
    pub start_too_soon: u64,
    /// AF429 answers, all tenants.
    pub throttled: u64,
    /// Hung requests, all tenants.
    pub hung: u64,
    /// Per tenant id.
    pub tenants: BTreeMap<String, TenantStats>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Computes one tenant's ground truth now.
pub(crate) fn tenant_truth(t: &TenantState) -> TenantTruth {
    let now = t.now();
    let tid = &t.spec.tenant_id;
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut undeliverable = BTreeSet::new();
    let mut out = TenantTruth::default();
    for b in &t.blobs {
        if b.available_at > now {
            continue;
        }
        if b.deliverable(now) {
            for r in &b.records {
                let text = content::render(&b.content_type, tid, r);
                expected
                    .entry(r.id.clone())
                    .or_default()
                    .insert(sha256_hex(&text));
            }
            continue;
        }
        if b.expiration <= now {
            out.expired_content_ids.push(b.content_id.clone());
        } else {
            match b.kind {
                BlobKind::Malformed(_) => out.malformed_content_ids.push(b.content_id.clone()),
                BlobKind::Oversized => out.oversized_content_ids.push(b.content_id.clone()),
                BlobKind::Normal => {}
            }
        }
        for r in &b.records {
            undeliverable.insert(r.id.clone());
        }
    }
    out.undeliverable_ids = undeliverable
        .into_iter()
        .filter(|id| !expected.contains_key(id))
        .collect();
    out.expected = expected
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().collect()))
        .collect();
    out
}

/// Computes the whole truth now.
pub(crate) fn truth(state: &State) -> Truth {
    Truth {
        tenants: state
            .tenants
            .iter()
            .map(|(k, t)| (k.clone(), tenant_truth(t)))
            .collect(),
    }
}

/// Snapshots all counters.
pub(crate) fn stats(state: &State) -> Stats {
    let mut s = Stats::default();
    if state.token_unknown_tenant > 0 {
        s.token_failed
            .insert("90002".into(), state.token_unknown_tenant);
    }
    for (id, t) in &state.tenants {
        let ts = &t.stats;
        s.token_ok += ts.token_ok;
        for (k, v) in &ts.token_failed {
            *s.token_failed.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &ts.api_requests {
            *s.api_requests.entry(k.clone()).or_default() += v;
        }
        s.blob_fetches_total += ts.blob_fetches.values().sum::<u64>();
        s.missing_publisher_identifier += ts.missing_publisher_identifier;
        s.window_errors += ts.window_errors;
        s.start_too_soon += ts.start_too_soon;
        s.throttled += ts.throttled;
        s.hung += ts.hung;
        s.tenants.insert(id.clone(), ts.clone());
    }
    s
}

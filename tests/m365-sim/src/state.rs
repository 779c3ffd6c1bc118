//! The simulator's shared state: tenants, their blobs, subscriptions and counters, plus blob generation.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use time::{Duration, OffsetDateTime};

use crate::content::{self, Record};
use crate::entra::CertInfo;
use crate::scenario::{Faults, TenantSpec};
use crate::truth::TenantStats;

/// How a blob is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlobKind {
    /// A well-formed JSON array.
    Normal,
    /// Malformed; the number selects the flavour (mod 4).
    Malformed(u32),
    /// Larger than the tenant's `oversized_bytes`.
    Oversized,
}

/// One content blob.
#[derive(Clone, Debug)]
pub(crate) struct Blob {
    pub content_type: String,
    pub content_id: String,
    pub created: OffsetDateTime,
    pub expiration: OffsetDateTime,
    pub available_at: OffsetDateTime,
    pub seq: u64,
    pub kind: BlobKind,
    pub records: Vec<Record>,
}

impl Blob {
    /// Whether a collector can get this blob's records now.
    pub fn deliverable(&self, now: OffsetDateTime) -> bool {
        self.available_at <= now && self.kind == BlobKind::Normal && self.expiration > now
    }
}

/// Subscription state of one content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sub {
    Enabled,
    Disabled,
}

/// Runtime state of one tenant.
pub(crate) struct TenantState {
    pub spec: TenantSpec,
    pub cert: Option<CertInfo>,
    pub rng: StdRng,
    pub subs: BTreeMap<String, Sub>,
    pub blobs: Vec<Blob>,
    pub by_id: HashMap<String, usize>,
    pub seq: u64,
    pub live_count: BTreeMap<String, u32>,
    pub next_live: Option<OffsetDateTime>,
    pub used_jti: HashSet<String>,
    pub api_counter: u64,
    pub throttle_counter: u64,
    pub loop_url: Option<String>,
    pub made_malformed: u32,
    pub made_expired: u32,
    pub made_oversized: u32,
    pub stats: TenantStats,
}

/// Everything behind the mutex.
pub(crate) struct State {
    pub generation: bool,
    pub tenants: BTreeMap<String, TenantState>,
    pub token_unknown_tenant: u64,
}

/// The host clock.
pub(crate) fn host_now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl TenantState {
    /// Builds a tenant, pre-generating its history and fault blobs.
    pub fn new(spec: TenantSpec, cert: Option<CertInfo>) -> Self {
        let rng = StdRng::seed_from_u64(spec.seed);
        let mut subs = BTreeMap::new();
        for ct in &spec.subscriptions_enabled {
            subs.insert(ct.clone(), Sub::Enabled);
        }
        let mut t = Self {
            spec,
            cert,
            rng,
            subs,
            blobs: Vec::new(),
            by_id: HashMap::new(),
            seq: 0,
            live_count: BTreeMap::new(),
            next_live: None,
            used_jti: HashSet::new(),
            api_counter: 0,
            throttle_counter: 0,
            loop_url: None,
            made_malformed: 0,
            made_expired: 0,
            made_oversized: 0,
            stats: TenantStats::default(),
        };
        t.generate_history();
        t.apply_faults();
        t
    }

    /// The tenant's clock (host clock plus `clock_offset_secs`).
    pub fn now(&self) -> OffsetDateTime {
        host_now() + Duration::seconds(self.spec.faults.clock_offset_secs)
    }

    fn generate_history(&mut self) {
        let now = self.now();
        let per_hour = self.spec.history_blobs_per_hour;
        let hours = self.spec.history_hours;
        if per_hour == 0 || hours == 0 {
            return;
        }
        let total = hours * per_hour;
        let step_ms = 3_600_000i64 / i64::from(per_hour);
        let cts = self.spec.content_types.clone();
        for i in (1..=total).rev() {
            for ct in &cts {
                let jitter = self.rng.gen_range(0..step_ms.max(1));
                let t = now - Duration::milliseconds(i64::from(i) * step_ms - jitter);
                self.generate_blob(ct, t);
            }
        }
    }

    /// Makes the fault blobs (`expired_blobs`, `malformed_blobs`, `oversized_blobs`) the faults ask for
    /// and that do not exist yet, and marks `subscription_disabled` subscriptions disabled.
    pub fn apply_faults(&mut self) {
        let now = self.now();
        let cts = self.spec.content_types.clone();
        if cts.is_empty() {
            return;
        }
        let mut i = 0usize;
        let f = self.spec.faults.clone();
        while self.made_expired < f.expired_blobs {
            let ct = &cts[i % cts.len()];
            i += 1;
            let created = now - Duration::minutes(self.rng.gen_range(10..120));
            let idx = self.push_blob(ct, created, created, BlobKind::Normal, None);
            self.blobs[idx].expiration = now - Duration::minutes(1);
            self.made_expired += 1;
        }
        while self.made_malformed < f.malformed_blobs {
            let ct = &cts[i % cts.len()];
            i += 1;
            let created = now - Duration::minutes(self.rng.gen_range(10..120));
            let kind = BlobKind::Malformed(self.made_malformed);
            self.push_blob(ct, created, created, kind, None);
            self.made_malformed += 1;
        }
        while self.made_oversized < f.oversized_blobs {
            let ct = &cts[i % cts.len()];
            i += 1;
            let created = now - Duration::minutes(self.rng.gen_range(10..120));
            self.push_blob(ct, created, created, BlobKind::Oversized, None);
            self.made_oversized += 1;
        }
        for ct in &f.subscription_disabled {
            self.subs.insert(ct.clone(), Sub::Disabled);
        }
    }

    /// Replaces the faults and applies them.
    pub fn set_faults(&mut self, faults: Faults) {
        self.spec.faults = faults;
        self.loop_url = None;
        self.apply_faults();
    }

    /// Generates one blob of `ct` that becomes listable at `t`, applying late/duplicate/replay faults.
    pub fn generate_blob(&mut self, ct: &str, t: OffsetDateTime) {
        let f = self.spec.faults.clone();
        let late = f.late_fraction > 0.0 && self.rng.gen_bool(f.late_fraction.min(1.0));
        let created = if late {
            t - Duration::hours(i64::from(f.late_hours))
        } else {
            t
        };
        let mut replayed = None;
        if f.replay_fraction > 0.0 && self.rng.gen_bool(f.replay_fraction.min(1.0)) {
            let lo = t - Duration::days(8);
            let hi = t - Duration::days(5);
            let old: Vec<usize> = self
                .blobs
                .iter()
                .enumerate()
                .filter(|(_, b)| {
                    b.content_type == ct
                        && b.created >= lo
                        && b.created <= hi
                        && b.kind == BlobKind::Normal
                })
                .map(|(i, _)| i)
                .collect();
            if !old.is_empty() {
                let pick = old[self.rng.gen_range(0..old.len())];
                let reorder = self.rng.gen_bool(0.5);
                let recs: Vec<Record> = self.blobs[pick]
                    .records
                    .iter()
                    .map(|r| {
                        let mut r = r.clone();
                        if reorder {
                            r.variant += 1;
                        }
                        r
                    })
                    .collect();
                replayed = Some(recs);
            }
        }
        self.push_blob(ct, created, t, BlobKind::Normal, replayed);
    }

    fn push_blob(
        &mut self,
        ct: &str,
        created: OffsetDateTime,
        available_at: OffsetDateTime,
        kind: BlobKind,
        records: Option<Vec<Record>>,
    ) -> usize {
        let records = match records {
            Some(r) => r,
            None => self.new_records(ct, created),
        };
        self.seq += 1;
        let content_id = content::content_id(ct, created, self.seq, &self.spec.tenant_id);
        let blob = Blob {
            content_type: ct.to_string(),
            content_id: content_id.clone(),
            created,
            expiration: created + Duration::days(7),
            available_at,
            seq: self.seq,
            kind,
            records,
        };
        self.blobs.push(blob);
        let idx = self.blobs.len() - 1;
        self.by_id.insert(content_id, idx);
        idx
    }

    fn new_records(&mut self, ct: &str, created: OffsetDateTime) -> Vec<Record> {
        let base = self.spec.records_per_blob.max(1);
        let spread = (base / 5).max(if base > 1 { 1 } else { 0 });
        let n = self
            .rng
            .gen_range(base.saturating_sub(spread).max(1)..=base + spread);
        let dup = self.spec.faults.duplicate_fraction;
        // Candidates for duplicates: records of the last few blobs of this content type.
        let recent: Vec<usize> = self
            .blobs
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| b.content_type == ct && b.kind == BlobKind::Normal)
            .take(8)
            .map(|(i, _)| i)
            .collect();
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            if dup > 0.0 && !recent.is_empty() && self.rng.gen_bool(dup.min(1.0)) {
                let b = recent[self.rng.gen_range(0..recent.len())];
                let recs = &self.blobs[b].records;
                if !recs.is_empty() {
                    let mut r = recs[self.rng.gen_range(0..recs.len())].clone();
                    r.variant += 1 + self.rng.gen_range(0..3);
                    out.push(r);
                    continue;
                }
            }
            let id = content::guid(&mut self.rng);
            let back = self.rng.gen_range(1..=600);
            out.push(Record {
                id,
                creation: created - Duration::seconds(back),
                rseed: self.rng.gen(),
                variant: 0,
            });
        }
        out
    }

    /// Live generation tick: one blob per content type when the interval has passed.
    pub fn live_tick(&mut self) {
        let interval = self.spec.live_blob_interval_ms;
        if interval == 0 {
            return;
        }
        let now = self.now();
        let due = match self.next_live {
            None => {
                self.next_live = Some(now + Duration::milliseconds(interval as i64));
                return;
            }
            Some(d) => d,
        };
        if now < due {
            return;
        }
        self.next_live = Some(now + Duration::milliseconds(interval as i64));
        let cts = self.spec.content_types.clone();
        for ct in cts {
            let made = self.live_count.get(&ct).copied().unwrap_or(0);
            if made >= self.spec.live_blobs_max {
                continue;
            }
            self.live_count.insert(ct.clone(), made + 1);
            self.generate_blob(&ct, now);
        }
    }
}

/// The exact body of a blob, as bytes (`oversized_bytes` is the tenant's current setting).
pub(crate) fn blob_body(tid: &str, oversized_bytes: usize, blob: &Blob) -> Vec<u8> {
    {
        let rendered: Vec<String> = blob
            .records
            .iter()
            .map(|r| content::render(&blob.content_type, tid, r))
            .collect();
        let array = format!("[{}]", rendered.join(","));
        match blob.kind {
            BlobKind::Normal => array.into_bytes(),
            BlobKind::Malformed(n) => match n % 4 {
                0 => {
                    let cut = array.len() / 2;
                    array.as_bytes()[..cut].to_vec()
                }
                1 => {
                    let mut b = array.into_bytes();
                    let at = b.len() / 2;
                    b.splice(at..at, [0xFFu8, 0xFE, 0xC3]);
                    b
                }
                2 => format!("{{\"value\":{array}}}").into_bytes(),
                _ => {
                    let first = rendered.first().cloned().unwrap_or_default();
                    let id = blob
                        .records
                        .first()
                        .map(|r| r.id.clone())
                        .unwrap_or_default();
                    let bad = first.replace(&format!("\"Id\":\"{id}\""), "\"Id\":12345");
                    let mut parts = rendered.clone();
                    if let Some(p) = parts.first_mut() {
                        *p = if bad == first {
                            "{\"Id\":12345}".to_string()
                        } else {
                            bad
                        };
                    }
                    format!("[{}]", parts.join(",")).into_bytes()
                }
            },
            BlobKind::Oversized => {
                let want = oversized_bytes.max(1) + 1;
                let mut body = String::with_capacity(want + array.len() + 64);
                body.push_str(&array[..array.len() - 1]);
                if !blob.records.is_empty() {
                    body.push(',');
                }
                body.push_str("{\"Padding\":\"");
                while body.len() < want {
                    body.push_str(
                        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                    );
                }
                body.push_str("\"}]");
                body.into_bytes()
            }
        }
    }
}

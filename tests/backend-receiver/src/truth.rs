//! Ground truth: what the receiver stored, counted and refused. Kept in hash maps internally (cheap at a
//! million records) and turned into the serializable [`Summary`] and [`Truth`] on demand.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Largest number of header-violation messages kept in [`Truth::header_violation_samples`].
const MAX_VIOLATION_SAMPLES: usize = 100;

/// Counters of the receiver, as `GET /_rx/summary` returns them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// `POST /v1/ingest` requests received (every answer counted, injected faults included).
    pub ingest_requests: u64,
    /// Ingest answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Batches stored (answered 200).
    pub batches_stored: u64,
    /// Records in stored batches, duplicates included.
    pub records_accepted: u64,
    /// Distinct `(tenant_id, Id)` records stored.
    pub unique_records: u64,
    /// Deliveries of a `(tenant_id, Id)` already delivered before (earlier batch or earlier line).
    pub duplicate_records: u64,
    /// Ingest requests answered 409 because their Idempotency-Key had been stored before.
    pub repeated_keys: u64,
    /// Repeated keys whose records differed from the stored batch's.
    pub key_conflicts: usize,
    /// Compressed body bytes of stored batches.
    pub bytes_compressed: u64,
    /// Decompressed body bytes of stored batches.
    pub bytes_decompressed: u64,
    /// Stored batches by `Content-Encoding` (`zstd`, `gzip`).
    pub encodings: BTreeMap<String, u64>,
    /// Protocol header violations seen (bad `User-Agent`, missing or mismatched `X-Sensor-Id`); counted,
    /// never rejected.
    pub header_violations: u64,
    /// Heartbeats stored.
    pub heartbeats: u64,
    /// `POST /v1/heartbeat` requests received (injected faults and refusals included).
    pub heartbeat_requests: u64,
    /// `GET /v1/config` requests answered 200 (garbage answers included).
    pub config_fetches: u64,
    /// Certificates issued at enrolment.
    pub enrollments: u64,
    /// Certificates issued by renewal.
    pub renewals: u64,
    /// Enrolments and renewals refused, or answered with an injected fault.
    pub refused_enrollments: u64,
    /// Command results posted (for known commands; repeats included).
    pub command_results: u64,
    /// Diagnostics bundles stored.
    pub diagnostics: u64,
    /// Whether the main port is serving.
    pub up: bool,
}

/// What the receiver knows about one `(tenant_id, Id)` record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordTruth {
    /// How many times it arrived in stored batches.
    pub deliveries: u64,
    /// SHA-256 (lower-case hex) of each distinct byte variant of the `record` object, in arrival order.
    pub sha256: Vec<String>,
    /// The envelope's `content_type` of its first delivery.
    pub content_type: String,
}

/// One stored batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchTruth {
    /// Its `Idempotency-Key`.
    pub key: String,
    /// Number of records.
    pub records: usize,
    /// Its `Content-Encoding`.
    pub encoding: String,
    /// The `Id` of its first record (`None` for an empty batch).
    pub first_record_id: Option<String>,
}

/// A repeated Idempotency-Key whose records differ from those stored under it (a protocol violation:
/// a retried batch must carry the same records in the same order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyConflict {
    /// The key.
    pub key: String,
    /// Records of the stored batch.
    pub stored_records: usize,
    /// Records of the repeated request.
    pub new_records: usize,
}

/// The full ground truth, as `GET /_rx/truth` returns it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truth {
    /// Every stored record, keyed `"<tenant_id>/<Id>"`.
    pub records: BTreeMap<String, RecordTruth>,
    /// Stored batches in the order they were stored.
    pub batches: Vec<BatchTruth>,
    /// Repeated keys that carried different records.
    pub key_conflicts: Vec<KeyConflict>,
    /// Keys answered 409, once per repeat, in order.
    pub keys_seen_repeated: Vec<String>,
    /// The last heartbeat document.
    pub last_heartbeat: Option<serde_json::Value>,
    /// The first header violations (at most 100), as messages.
    pub header_violation_samples: Vec<String>,
}

/// One parsed record of a batch: its identity and the hash of its exact bytes.
#[derive(Clone, Debug)]
pub(crate) struct ParsedRecord {
    pub tenant_id: String,
    pub id: String,
    pub content_type: String,
    pub sha256: [u8; 32],
}

/// A parsed batch body.
#[derive(Debug)]
pub(crate) struct ParsedBatch {
    pub records: Vec<ParsedRecord>,
    pub decompressed_bytes: u64,
}

impl ParsedBatch {
    /// A digest of the record list: the sequence of (tenant_id, Id, sha256 of the record bytes).
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for r in &self.records {
            for part in [r.tenant_id.as_bytes(), r.id.as_bytes()] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
            h.update(r.sha256);
        }
        h.finalize().into()
    }
}

#[derive(Debug)]
struct RecordState {
    deliveries: u64,
    variants: Vec<[u8; 32]>,
    content_type: String,
}

#[derive(Debug)]
struct StoredKey {
    fingerprint: [u8; 32],
    records: usize,
}

/// The outcome of trying to store a batch.
pub(crate) enum StoreOutcome {
    /// Stored: accepted and duplicate counts.
    Stored { accepted: usize, duplicates: usize },
    /// The key had been stored before; `conflict` when the records differ.
    Repeated { conflict: bool },
}

/// The mutable ground truth. Lives behind a `std::sync::Mutex`; never held across `.await`.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub summary: Summary,
    records: HashMap<(String, String), RecordState>,
    keys: HashMap<String, StoredKey>,
    batches: Vec<BatchTruth>,
    key_conflicts: Vec<KeyConflict>,
    keys_seen_repeated: Vec<String>,
    last_heartbeat: Option<serde_json::Value>,
    violation_samples: Vec<String>,
}

impl State {
    /// Counts an ingest answer.
    pub fn count_status(&mut self, status: u16) {
        *self.summary.statuses.entry(status).or_insert(0) += 1;
    }

    /// Records a header violation.
    pub fn violation(&mut self, message: String) {
        self.summary.header_violations += 1;
        if self.violation_samples.len() < MAX_VIOLATION_SAMPLES {
            self.violation_samples.push(message);
        }
    }

    /// Stores a heartbeat document.
    pub fn heartbeat(&mut self, doc: serde_json::Value) {
        self.summary.heartbeats += 1;
        self.last_heartbeat = Some(doc);
    }

    /// Stores `batch` under `key` unless the key was stored before (atomically: check and insert under
    /// the same lock).
    pub fn store(
        &mut self,
        key: &str,
        encoding: &str,
        compressed_bytes: u64,
        batch: &ParsedBatch,
    ) -> StoreOutcome {
        let fingerprint = batch.fingerprint();
        if let Some(stored) = self.keys.get(key) {
            let conflict = stored.fingerprint != fingerprint;
            let stored_records = stored.records;
            self.summary.repeated_keys += 1;
            self.keys_seen_repeated.push(key.to_string());
            if conflict {
                self.summary.key_conflicts += 1;
                self.key_conflicts.push(KeyConflict {
                    key: key.to_string(),
                    stored_records,
                    new_records: batch.records.len(),
                });
            }
            return StoreOutcome::Repeated { conflict };
        }
        self.keys.insert(
            key.to_string(),
            StoredKey {
                fingerprint,
                records: batch.records.len(),
            },
        );
        let mut duplicates = 0;
        for r in &batch.records {
            let entry = self
                .records
                .entry((r.tenant_id.clone(), r.id.clone()))
                .or_insert_with(|| RecordState {
                    deliveries: 0,
                    variants: Vec::new(),
                    content_type: r.content_type.clone(),
                });
            if entry.deliveries > 0 {
                duplicates += 1;
            }
            entry.deliveries += 1;
            if !entry.variants.contains(&r.sha256) {
                entry.variants.push(r.sha256);
            }
        }
        let s = &mut self.summary;
        s.batches_stored += 1;
        s.records_accepted += batch.records.len() as u64;
        s.duplicate_records += duplicates as u64;
        s.unique_records = self.records.len() as u64;
        s.bytes_compressed += compressed_bytes;
        s.bytes_decompressed += batch.decompressed_bytes;
        *s.encodings.entry(encoding.to_string()).or_insert(0) += 1;
        self.batches.push(BatchTruth {
            key: key.to_string(),
            records: batch.records.len(),
            encoding: encoding.to_string(),
            first_record_id: batch.records.first().map(|r| r.id.clone()),
        });
        StoreOutcome::Stored {
            accepted: batch.records.len(),
            duplicates,
        }
    }

    /// The serializable ground truth (built on demand).
    pub fn truth(&self) -> Truth {
        Truth {
            records: self
                .records
                .iter()
                .map(|((tenant, id), r)| {
                    (
                        format!("{tenant}/{id}"),
                        RecordTruth {
                            deliveries: r.deliveries,
                            sha256: r.variants.iter().map(hex::encode).collect(),
                            content_type: r.content_type.clone(),
                        },
                    )
                })
                .collect(),
            batches: self.batches.clone(),
            key_conflicts: self.key_conflicts.clone(),
            keys_seen_repeated: self.keys_seen_repeated.clone(),
            last_heartbeat: self.last_heartbeat.clone(),
            header_violation_samples: self.violation_samples.clone(),
        }
    }
}

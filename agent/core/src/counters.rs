//! Process-wide counters. Invariant: every loss, drop or quarantine path increments a counter here, so a
//! silent loss shows up as a number in the status document.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Monotonic counters shared by the stages.
#[derive(Debug, Default)]
pub struct Counters {
    /// Records parsed from fetched blobs.
    pub records_fetched: AtomicU64,
    /// Records durably spooled (after dedup).
    pub records_spooled: AtomicU64,
    /// Records dropped because their `Id` was already spooled within the dedup window.
    pub duplicates_dropped: AtomicU64,
    /// Blobs committed to the spool.
    pub blobs_committed: AtomicU64,
    /// Blobs skipped because their contentId was already done.
    pub blobs_skipped_done: AtomicU64,
    /// Blobs past their `contentExpiration` (lost windows), reported.
    pub blobs_expired: AtomicU64,
    /// Blobs held in quarantine (malformed, oversized).
    pub blobs_quarantined: AtomicU64,
    /// Records acknowledged by the backend.
    pub records_delivered: AtomicU64,
    /// Batches acknowledged by the backend (200/202/409).
    pub batches_acked: AtomicU64,
    /// Batches the backend answered 409 for (delivered before).
    pub batches_already_stored: AtomicU64,
    /// Batches or records moved to quarantine by the relay.
    pub batches_quarantined: AtomicU64,
    /// Uncompressed NDJSON bytes acknowledged by the backend.
    pub bytes_raw_delivered: AtomicU64,
    /// Compressed bytes acknowledged by the backend.
    pub bytes_wire_delivered: AtomicU64,
    /// Management API requests sent.
    pub api_requests: AtomicU64,
    /// Throttling answers (AF429) received.
    pub api_throttled: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct CountersSnapshot {
    pub records_fetched: u64,
    pub records_spooled: u64,
    pub duplicates_dropped: u64,
    pub blobs_committed: u64,
    pub blobs_skipped_done: u64,
    pub blobs_expired: u64,
    pub blobs_quarantined: u64,
    pub records_delivered: u64,
    pub batches_acked: u64,
    pub batches_already_stored: u64,
    pub batches_quarantined: u64,
    pub bytes_raw_delivered: u64,
    pub bytes_wire_delivered: u64,
    pub api_requests: u64,
    pub api_throttled: u64,
}

impl Counters {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            records_fetched: g(&self.records_fetched),
            records_spooled: g(&self.records_spooled),
            duplicates_dropped: g(&self.duplicates_dropped),
            blobs_committed: g(&self.blobs_committed),
            blobs_skipped_done: g(&self.blobs_skipped_done),
            blobs_expired: g(&self.blobs_expired),
            blobs_quarantined: g(&self.blobs_quarantined),
            records_delivered: g(&self.records_delivered),
            batches_acked: g(&self.batches_acked),
            batches_already_stored: g(&self.batches_already_stored),
            batches_quarantined: g(&self.batches_quarantined),
            bytes_raw_delivered: g(&self.bytes_raw_delivered),
            bytes_wire_delivered: g(&self.bytes_wire_delivered),
            api_requests: g(&self.api_requests),
            api_throttled: g(&self.api_throttled),
        }
    }
}

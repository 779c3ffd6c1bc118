//! Realistic audit records outside a running simulator, for benchmarks: the same generator the
//! simulator serves from, so sizes, field mix and compressibility match what a collector receives.
//! Invariant: deterministic for a given `(count, seed)`; every record has a unique `Id`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use time::{Duration, OffsetDateTime};

use crate::content::{self, Record};
use crate::scenario::ALL_CONTENT_TYPES;

/// One generated record: its `Id`, its `CreationTime` (as the API formats it) and its exact bytes.
#[derive(Clone, Debug)]
pub struct SampleRecord {
    /// The record's `Id` (a GUID).
    pub id: String,
    /// Its `CreationTime` (`YYYY-MM-DDTHH:MM:SS`, no zone, as the API serves it).
    pub creation_time: String,
    /// Its compact JSON, as the simulator serves it.
    pub json: String,
}

/// `count` records of one tenant, the five content types in turn (so the mix matches a tenant that
/// audits every workload), created over the hour before `2026-11-25T12:00:00Z`.
pub fn sample_records(count: usize, seed: u64) -> Vec<SampleRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    let tenant_id = content::guid(&mut rng);
    let base =
        OffsetDateTime::from_unix_timestamp(1_764_072_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    (0..count)
        .map(|i| {
            let ct = ALL_CONTENT_TYPES[i % ALL_CONTENT_TYPES.len()];
            let r = Record {
                id: content::guid(&mut rng),
                creation: base - Duration::seconds(rng.gen_range(1..=3600)),
                rseed: rng.gen(),
                variant: 0,
            };
            SampleRecord {
                creation_time: content::fmt_creation(r.creation),
                json: content::render(ct, &tenant_id, &r),
                id: r.id,
            }
        })
        .collect()
}

/// The records as one blob: a JSON array, as `GET <contentUri>` answers.
pub fn as_blob(records: &[SampleRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.iter().map(|r| r.json.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(r.json.as_bytes());
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_unique_and_valid_json() {
        let a = sample_records(200, 7);
        let b = sample_records(200, 7);
        assert_eq!(
            a.iter().map(|r| &r.json).collect::<Vec<_>>(),
            b.iter().map(|r| &r.json).collect::<Vec<_>>()
        );
        let ids: std::collections::HashSet<&str> = a.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), a.len());
        let v: serde_json::Value = serde_json::from_slice(&as_blob(&a)).expect("a JSON array");
        let arr = v.as_array().expect("array");
        assert_eq!(arr.len(), 200);
        assert_eq!(arr[3]["Id"], a[3].id.as_str());
        assert_eq!(arr[3]["CreationTime"], a[3].creation_time.as_str());
    }
}

//! Unit tests and the model-based property test of the spool: random sequences of commit / cut / ack /
//! split / quarantine / crash-and-reopen checked against an in-memory model.

use std::collections::{BTreeMap, HashSet, VecDeque};

use proptest::prelude::*;

use super::*;

const TENANT: &str = "11111111-1111-1111-1111-111111111111";

fn opts() -> SpoolOptions {
    SpoolOptions {
        max_bytes: 1 << 30,
        cache_bytes: 4 << 20,
        dedup_days: 9,
    }
}

fn record(id: u32) -> Vec<u8> {
    format!(r#"{{"Id":"id-{id}","CreationTime":"2026-11-25T10:00:00","n":{id}}}"#).into_bytes()
}

fn commit(spool: &Spool, blob: &str, ids: &[u32]) -> CommitOutcome {
    let bytes: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|i| (format!("id-{i}"), record(*i)))
        .collect();
    commit_records(spool, blob, &bytes)
}

/// Commits blob `blob` of (Id, record JSON) pairs.
fn commit_records(spool: &Spool, blob: &str, bytes: &[(String, Vec<u8>)]) -> CommitOutcome {
    try_commit_records(spool, blob, bytes).expect("commit")
}

fn try_commit_records(
    spool: &Spool,
    blob: &str,
    bytes: &[(String, Vec<u8>)],
) -> Result<CommitOutcome, SpoolError> {
    let recs: Vec<RawRecord<'_>> = bytes
        .iter()
        .map(|(id, b)| RawRecord { id, bytes: b })
        .collect();
    spool.commit_blob(&BlobCommit {
        tenant_id: TENANT,
        content_type: "Audit.General",
        content_id: blob,
        expires_unix: now_unix() + 86_400,
        collected_at: "2026-11-25T10:00:00Z",
        records: &recs,
        cursor: None,
    })
}

fn ids_of(ndjson: &[u8]) -> Vec<String> {
    chunk::records(ndjson)
        .map(|line| {
            let v: serde_json::Value = serde_json::from_slice(line).expect("envelope is JSON");
            v["record"]["Id"].as_str().expect("Id").to_string()
        })
        .collect()
}

/// Cuts the next batch of at most `max_records` now; there must be one.
fn cut(spool: &Spool, max_records: u64) -> BatchDesc {
    spool
        .cut_batch(&limits(max_records), true)
        .expect("cut")
        .expect("a batch")
}

/// Cuts, reads and acknowledges every batch of at most `max_records`; returns the records' Ids in order.
fn drain_ids(spool: &Spool, max_records: u64) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(desc) = spool.cut_batch(&limits(max_records), true).expect("cut") {
        ids.extend(ids_of(&body_of(spool, &desc)));
        spool.ack_batch(desc.seq).expect("ack");
    }
    ids
}

fn limits(max_records: u64) -> BatchLimits {
    BatchLimits {
        max_records,
        max_raw_bytes: 1 << 20,
        linger: Duration::ZERO,
    }
}

#[test]
fn a_second_spool_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Spool::open(dir.path(), opts()).expect("open");
    match Spool::open(dir.path(), opts()) {
        Err(SpoolError::Locked(_)) => {}
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("second open succeeded"),
    }
}

#[test]
fn commit_dedups_within_and_across_blobs_and_marks_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    assert_eq!(
        commit(&spool, "b1", &[1, 2, 2, 3]),
        CommitOutcome {
            spooled: 3,
            duplicates: 1
        }
    );
    assert_eq!(
        commit(&spool, "b2", &[3, 4]),
        CommitOutcome {
            spooled: 1,
            duplicates: 1
        }
    );
    assert!(spool.is_done(TENANT, "Audit.General", "b1").expect("done"));
    assert!(!spool.is_done(TENANT, "Audit.General", "b3").expect("done"));
    drop(spool);
    let spool = reopen(dir.path());
    assert_eq!(
        commit(&spool, "b3", &[1, 5]),
        CommitOutcome {
            spooled: 1,
            duplicates: 1
        }
    );
    assert_eq!(spool.figures().pending_records, 5);
}

#[test]
fn concurrent_commits_of_the_same_ids_spool_each_once() {
    // Four writers commit overlapping blobs at once: blob k of writer w holds Ids [k*50, k*50+100), so
    // every Id arrives in up to eight blobs, most of them in flight together. Each Id must be spooled
    // exactly once, in a chunk order that every batch reads back whole.
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    let outcomes: Vec<CommitOutcome> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let spool = &spool;
                s.spawn(move || {
                    (0..40u32)
                        .map(|k| {
                            let ids: Vec<u32> = (k * 50..k * 50 + 100).collect();
                            commit(spool, &format!("w{w}-b{k}"), &ids)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        writers
            .into_iter()
            .flat_map(|h| h.join().expect("writer"))
            .collect()
    });
    let distinct = 39 * 50 + 100;
    let spooled: u64 = outcomes.iter().map(|o| o.spooled).sum();
    let dropped: u64 = outcomes.iter().map(|o| o.duplicates).sum();
    assert_eq!((spooled, dropped), (distinct, 4 * 40 * 100 - distinct));
    let delivered = drain_ids(&spool, 300);
    let unique: HashSet<&String> = delivered.iter().collect();
    assert_eq!(
        (delivered.len(), unique.len()),
        (distinct as usize, distinct as usize)
    );
}

#[test]
fn queued_commits_are_written_as_one_group_and_share_its_outcome() {
    // While the test holds the spool's lock, three commits queue up in a known order: g1 (Ids 0..100),
    // g2 (50..150, overlapping g1) and g3 (200..300). Whoever gets the lock next writes g1 and g3 as one
    // group, whose segment sync fails: both get the error and neither is applied. g2 waits for the next
    // round, finds none of g1's Ids in the window and spools all of 50..150. After a reopen the failed
    // group, whole on disk, is not replayed (its collectors fetch g1 and g3 again).
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    let blob = |ids: std::ops::Range<u32>| -> Vec<(String, Vec<u8>)> {
        ids.map(|i| (format!("id-{i}"), record(i))).collect()
    };
    let (g1, g2, g3) = (blob(0..100), blob(50..150), blob(200..300));
    let held = spool.lock();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = [("g1", &g1), ("g2", &g2), ("g3", &g3)]
            .into_iter()
            .enumerate()
            .map(|(n, (name, recs))| {
                let spool = &spool;
                let h = s.spawn(move || try_commit_records(spool, name, recs));
                while commit::queued(spool) < n + 1 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                h
            })
            .collect();
        spool
            .fail_syncs
            .store(1, std::sync::atomic::Ordering::SeqCst);
        drop(held);
        handles
            .into_iter()
            .map(|h| h.join().expect("committer"))
            .collect::<Vec<_>>()
    });
    assert!(results[0].is_err(), "g1: {:?}", results[0]);
    assert!(results[2].is_err(), "g3: {:?}", results[2]);
    assert_eq!(
        results[1].as_ref().ok(),
        Some(&CommitOutcome {
            spooled: 100,
            duplicates: 0
        })
    );
    drop(spool);
    let spool = reopen(dir.path());
    assert_eq!(spool.replayed_at_open, 0, "the failed group is fenced off");
    let mut delivered = drain_ids(&spool, 1000);
    delivered.sort();
    let mut want: Vec<String> = (50..150).map(|i| format!("id-{i}")).collect();
    want.sort();
    assert_eq!(delivered, want);
    // The collectors fetch the failed blobs again: their records are new to the window.
    assert_eq!(
        commit(&spool, "g1", &(0..100).collect::<Vec<_>>()).spooled,
        50
    );
}

#[test]
fn large_blobs_span_chunks_and_batches_respect_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    let ids: Vec<u32> = (0..1500).collect();
    commit(&spool, "big", &ids);
    let mut seen = Vec::new();
    while let Some(desc) = spool.cut_batch(&limits(400), false).expect("cut") {
        assert!(desc.records <= 400);
        let body = body_of(&spool, &desc);
        seen.extend(ids_of(&body));
        spool.ack_batch(desc.seq).expect("ack");
    }
    let want: Vec<String> = ids.iter().map(|i| format!("id-{i}")).collect();
    assert_eq!(seen, want);
    let f = spool.figures();
    assert_eq!((f.pending_records, f.stored_bytes), (0, 0), "{f:?}");
}

#[test]
fn cursor_never_moves_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    let c = Cursor {
        listed_until: 100,
        ..Cursor::default()
    };
    spool.set_cursor(TENANT, "DLP.All", &c).expect("set");
    spool
        .set_cursor(
            TENANT,
            "DLP.All",
            &Cursor {
                listed_until: 50,
                ..Cursor::default()
            },
        )
        .expect("set");
    assert_eq!(
        spool
            .cursor(TENANT, "DLP.All")
            .expect("get")
            .map(|c| c.listed_until),
        Some(100)
    );
}

#[derive(Clone, Debug)]
enum Op {
    Commit(Vec<u32>),
    Cut(u64),
    Ack(usize),
    Split(usize),
    Quarantine(usize),
    Reopen,
    /// Reclaim (a no-op unless drained), or a crash at one of its points followed by a reopen.
    Reclaim(Option<ReclaimStop>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(0u32..60, 0..12).prop_map(Op::Commit),
        3 => (1u64..6).prop_map(Op::Cut),
        3 => (0usize..4).prop_map(Op::Ack),
        1 => (0usize..4).prop_map(Op::Split),
        1 => (0usize..4).prop_map(Op::Quarantine),
        1 => Just(Op::Reopen),
        1 => prop_oneof![
            Just(None),
            Just(Some(ReclaimStop::AfterCopy)),
            Just(Some(ReclaimStop::AfterSwitch)),
        ]
        .prop_map(Op::Reclaim),
    ]
}

/// A batch's NDJSON, after checking that its zstd body (stored frames, partial chunks compressed again)
/// decodes to exactly the same bytes.
fn body_of(spool: &Spool, desc: &BatchDesc) -> Vec<u8> {
    let body = spool.read_batch(desc).expect("read");
    let wire = spool.read_batch_zstd(desc).expect("read zstd");
    let decoded = zstd::stream::decode_all(&wire[..]).expect("the zstd body decodes");
    assert_eq!(
        decoded, body,
        "batch {}: the zstd body is the NDJSON",
        desc.seq
    );
    assert_eq!(
        body.len() as u64,
        desc.raw_bytes,
        "batch {}: raw bytes",
        desc.seq
    );
    body
}

/// Chunks of at least `PASS_THROUGH_MIN_RAW` bytes go out as their stored frames when a batch covers
/// them whole; the records of a chunk covered in part are compressed again; either way the body decodes to
/// exactly the batch's NDJSON.
#[test]
fn large_chunks_are_sent_as_their_stored_frames() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    let pad = "x".repeat(1500);
    let bytes: Vec<(String, Vec<u8>)> = (0..700u32)
        .map(|i| {
            let json =
                format!(r#"{{"Id":"id-{i}","CreationTime":"2026-11-25T10:00:00","pad":"{pad}"}}"#);
            (format!("id-{i}"), json.into_bytes())
        })
        .collect();
    commit_records(&spool, "big", &bytes);
    let frames: Vec<Vec<u8>> = spool
        .g()
        .main
        .scan_prefix([keys::CHUNK])
        .map(|kv| {
            let v = kv.expect("chunk").1;
            let (h, frame) = spool.frame(&v).expect("frame");
            assert!(h.raw_len as usize >= PASS_THROUGH_MIN_RAW);
            frame.into_owned()
        })
        .collect();
    assert!(frames.len() >= 4, "{} chunks", frames.len());
    // 100 records: inside the first chunk, compressed again.
    let a = cut(&spool, 100);
    let mut ids = ids_of(&body_of(&spool, &a));
    // The rest: the first chunk's remainder compressed again, then the other chunks as stored.
    let b = cut(&spool, 1_000);
    let wire = spool.read_batch_zstd(&b).expect("zstd");
    let has = |frame: &[u8]| wire.windows(frame.len()).any(|w| w == frame);
    assert!(!has(&frames[0]) && has(&frames[1]) && has(&frames[2]));
    ids.extend(ids_of(&body_of(&spool, &b)));
    // Halves that start and end inside chunks are still exact.
    let (b1, b2) = spool.split_batch(b.seq).expect("split").expect("halves");
    let (b21, b22) = spool.split_batch(b2.seq).expect("split").expect("halves");
    let mut again = Vec::new();
    for d in [&b1, &b21, &b22] {
        again.extend(ids_of(&body_of(&spool, d)));
    }
    assert_eq!(again, ids[100..].to_vec());
    let want: Vec<String> = (0..700).map(|i| format!("id-{i}")).collect();
    assert_eq!(ids, want);
}

#[derive(Default)]
struct Model {
    seen: HashSet<u32>,
    unbatched: VecDeque<String>,
    batches: BTreeMap<u64, Vec<String>>,
    delivered: Vec<String>,
    quarantined: Vec<String>,
    max_seq: u64,
}

/// Opens the spool again right after dropping it in the same process.
fn reopen(dir: &std::path::Path) -> Spool {
    Spool::open(dir, opts()).expect("reopen")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn spool_matches_its_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = Spool::open(dir.path(), opts()).expect("open");
        let mut m = Model::default();
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Commit(ids) => {
                    let mut want = CommitOutcome::default();
                    for id in &ids {
                        if m.seen.insert(*id) {
                            want.spooled += 1;
                            m.unbatched.push_back(format!("id-{id}"));
                        } else {
                            want.duplicates += 1;
                        }
                    }
                    prop_assert_eq!(commit(&spool, &format!("blob-{n}"), &ids), want);
                }
                Op::Cut(max) => {
                    match spool.cut_batch(&limits(max), false).expect("cut") {
                        None => prop_assert!(m.unbatched.is_empty()),
                        Some(desc) => {
                            // At most `max`, at least one; fewer only where a whole chunk did not fit.
                            let take = desc.records as usize;
                            prop_assert!(take >= 1 && take <= (max as usize).min(m.unbatched.len()));
                            let want: Vec<String> = m.unbatched.drain(..take).collect();
                            prop_assert_eq!(ids_of(&body_of(&spool, &desc)), want.clone());
                            prop_assert!(desc.seq > m.max_seq, "batch numbers increase");
                            m.max_seq = desc.seq;
                            m.batches.insert(desc.seq, want);
                        }
                    }
                }
                Op::Ack(i) => {
                    if let Some(seq) = m.batches.keys().nth(i).copied() {
                        spool.ack_batch(seq).expect("ack");
                        let recs = m.batches.remove(&seq).unwrap_or_default();
                        m.delivered.extend(recs);
                    }
                }
                Op::Split(i) => {
                    if let Some(seq) = m.batches.keys().nth(i).copied() {
                        let recs = m.batches[&seq].clone();
                        match spool.split_batch(seq).expect("split") {
                            None => prop_assert!(recs.len() < 2),
                            Some((a, b)) => {
                                prop_assert!(a.seq > m.max_seq && b.seq > a.seq);
                                m.max_seq = b.seq;
                                // At most half, at least one (whole chunks where they fit).
                                let half = a.records as usize;
                                prop_assert!(half >= 1 && half <= recs.len() / 2);
                                prop_assert_eq!(half + b.records as usize, recs.len());
                                prop_assert_eq!(ids_of(&body_of(&spool, &a)), recs[..half].to_vec());
                                prop_assert_eq!(ids_of(&body_of(&spool, &b)), recs[half..].to_vec());
                                m.batches.remove(&seq);
                                m.batches.insert(a.seq, recs[..half].to_vec());
                                m.batches.insert(b.seq, recs[half..].to_vec());
                            }
                        }
                    }
                }
                Op::Quarantine(i) => {
                    if let Some(seq) = m.batches.keys().nth(i).copied() {
                        spool.quarantine_batch(seq, "test").expect("quarantine");
                        let recs = m.batches.remove(&seq).unwrap_or_default();
                        m.quarantined.extend(recs);
                    }
                }
                Op::Reopen => {
                    drop(spool);
                    spool = reopen(dir.path());
                }
                Op::Reclaim(None) => {
                    let drained = m.unbatched.is_empty() && m.batches.is_empty();
                    prop_assert_eq!(spool.reclaim().expect("reclaim").is_some(), drained);
                }
                Op::Reclaim(Some(stop)) => {
                    spool.reclaim_stopping_at(stop).expect("reclaim");
                    drop(spool);
                    spool = reopen(dir.path());
                }
            }
            // Every outstanding batch reads back exactly as cut, in order.
            let pending = spool.pending_batches().expect("pending");
            let seqs: Vec<u64> = pending.iter().map(|d| d.seq).collect();
            let model_seqs: Vec<u64> = m.batches.keys().copied().collect();
            prop_assert_eq!(seqs, model_seqs);
            for d in &pending {
                prop_assert_eq!(&ids_of(&body_of(&spool, d)), &m.batches[&d.seq]);
            }
            let f = spool.figures();
            let outstanding = m.unbatched.len() + m.batches.values().map(Vec::len).sum::<usize>();
            prop_assert_eq!(f.pending_records as usize, outstanding);
            prop_assert_eq!(f.unbatched_records as usize, m.unbatched.len());
            prop_assert_eq!(f.quarantined_items as usize, spool.quarantine().expect("q").len());
        }
        // Conservation: everything committed is delivered, quarantined or still pending, exactly once.
        while let Some(d) = spool.cut_batch(&limits(1000), true).expect("cut") {
            m.batches.insert(d.seq, m.unbatched.drain(..d.records as usize).collect());
        }
        for seq in m.batches.keys().copied().collect::<Vec<_>>() {
            spool.ack_batch(seq).expect("ack");
            m.delivered.extend(m.batches.remove(&seq).unwrap_or_default());
        }
        let mut all: Vec<String> = m.delivered.iter().chain(&m.quarantined).cloned().collect();
        let n = all.len();
        all.sort();
        all.dedup();
        prop_assert_eq!(all.len(), n, "no record twice");
        prop_assert_eq!(n, m.seen.len(), "no record lost");
        let f = spool.figures();
        prop_assert_eq!((f.pending_records, f.stored_bytes), (0, 0));
    }
}

#[test]
fn ids_seen_in_the_older_key_formats_still_count_as_seen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let guid = "80c7a0f5-77b1-4f0e-9a43-0c2b2f1e6d3a";
    {
        // What a version with format-1 keys left: today's `seen-<day>` tree.
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let t = db
            .open_tree(keys::seen_tree_name(day_of(now_unix())))
            .expect("tree");
        t.insert(keys::seen_key(TENANT, "id-1"), &[])
            .expect("insert");
        t.insert(keys::seen_key(TENANT, guid), &[]).expect("insert");
        // And what a version with format-2 keys left: yesterday's `seen2-<day>` tree.
        db.open_tree(keys::seen2_tree_name(day_of(now_unix()) - 1))
            .expect("tree")
            .insert(keys::seen_key_v2(TENANT, "id-7"), &[])
            .expect("insert");
        // Days older than the window, in both formats: dropped whole on open.
        let old = day_of(now_unix()) - 20;
        for name in [keys::seen_tree_name(old), keys::seen2_tree_name(old)] {
            db.open_tree(name)
                .expect("tree")
                .insert(b"k", &[])
                .expect("insert");
        }
        db.flush().expect("flush");
    }
    let spool = reopen(dir.path());
    assert_eq!(
        commit(&spool, "b1", &[1, 2]),
        CommitOutcome {
            spooled: 1,
            duplicates: 1
        }
    );
    let bytes = record(9);
    let recs = [RawRecord {
        id: guid,
        bytes: &bytes,
    }];
    let out = spool
        .commit_blob(&BlobCommit {
            tenant_id: TENANT,
            content_type: "Audit.General",
            content_id: "b2",
            expires_unix: now_unix() + 86_400,
            collected_at: "2026-11-25T10:00:00Z",
            records: &recs,
            cursor: None,
        })
        .expect("commit");
    assert_eq!(
        out.duplicates, 1,
        "a GUID Id seen in format 1 is a duplicate"
    );
    assert_eq!(
        commit(&spool, "b3", &[7]).duplicates,
        1,
        "an Id seen in format 2 is a duplicate"
    );
    // New Ids go to format 3 (the log, then runs), not into sled trees; old formats expire by day.
    drop(spool);
    let spool = reopen(dir.path());
    assert_eq!(commit(&spool, "b4", &[2]).duplicates, 1);
    let names: Vec<String> = spool
        .g()
        .db
        .tree_names()
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("seen2-")).count(),
        1,
        "{names:?}"
    );
    let old = day_of(now_unix()) - 20;
    assert!(!names.contains(&keys::seen_tree_name(old)), "{names:?}");
    assert!(!names.contains(&keys::seen2_tree_name(old)), "{names:?}");
}

/// What must survive a reclaim: cursor, done-marks, figures, pending batches, quarantine, the next
/// batch number (seen through the next cut) and the dedup window (seen through the next commit).
fn durable_state(spool: &Spool) -> (Option<Cursor>, bool, Figures, Vec<BatchDesc>, usize) {
    (
        spool.cursor(TENANT, "Audit.General").expect("cursor"),
        spool.is_done(TENANT, "Audit.General", "b1").expect("done"),
        spool.figures(),
        spool.pending_batches().expect("batches"),
        spool.quarantine().expect("quarantine").len(),
    )
}

/// A spool with a cursor, a quarantined blob, dedup Ids (ids 0..512 in run files, the rest in the dedup
/// log) and a drained FIFO whose last batch was 2.
fn drained_spool(dir: &std::path::Path) -> Spool {
    let spool = Spool::open(dir, opts()).expect("open");
    spool.lock().seen.set_mem_max_keys(256);
    assert_eq!(
        commit(&spool, "b1", &(0..512).collect::<Vec<_>>()).spooled,
        512
    );
    assert_eq!(
        commit(&spool, "b1x", &(512..600).collect::<Vec<_>>()).spooled,
        88
    );
    assert_eq!(
        spool.lock().seen.figures().keys_in_memory,
        88,
        "88 Ids in the log"
    );
    spool
        .set_cursor(
            TENANT,
            "Audit.General",
            &Cursor {
                listed_until: 1_764_000_000,
                first_content_seen: true,
                ..Cursor::default()
            },
        )
        .expect("cursor");
    spool
        .mark_done(
            TENANT,
            "Audit.General",
            "bad",
            now_unix() + 86_400,
            DoneKind::Quarantined,
            Some(QuarantineItem {
                reason: "test".into(),
                origin: "bad".into(),
                at: now_unix(),
                records: 0,
                payload: "x".into(),
            }),
        )
        .expect("quarantine");
    assert_eq!(
        spool.reclaim().expect("reclaim"),
        None,
        "records are pending"
    );
    while let Some(d) = spool.cut_batch(&limits(500), true).expect("cut") {
        assert_eq!(
            spool.reclaim().expect("reclaim"),
            None,
            "a batch is pending"
        );
        spool.ack_batch(d.seq).expect("ack");
    }
    spool
}

fn check_after_reclaim(
    spool: &Spool,
    before: &(Option<Cursor>, bool, Figures, Vec<BatchDesc>, usize),
) {
    assert_eq!(&durable_state(spool), before);
    assert_eq!(
        commit(spool, "b2", &[5, 599, 700]).duplicates,
        2,
        "dedup survived (an Id in a run file and one in the log)"
    );
    let d = cut(spool, 500);
    assert_eq!(d.seq, 3, "batch numbers are never reused");
    assert_eq!(ids_of(&body_of(spool, &d)), vec!["id-700".to_string()]);
    spool.ack_batch(d.seq).expect("ack");
}

fn generations_on_disk(dir: &std::path::Path) -> (bool, Vec<String>) {
    let root_db = dir.join("db").exists();
    let mut gens: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    gens.sort();
    (root_db, gens)
}

#[test]
fn reclaim_switches_to_a_fresh_generation_and_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = drained_spool(dir.path());
    let before = durable_state(&spool);
    let r = spool.reclaim().expect("reclaim").expect("drained");
    assert_eq!(r.generation, 1);
    assert!(r.keys > 0);
    assert_eq!(
        generations_on_disk(dir.path()),
        (false, vec!["gen-1".to_string()])
    );
    check_after_reclaim(&spool, &before);
    // And again, from generation 1 to 2, across a reopen.
    drop(spool);
    let spool = reopen(dir.path());
    let before = durable_state(&spool);
    assert_eq!(
        spool.reclaim().expect("reclaim").map(|r| r.generation),
        Some(2)
    );
    drop(spool);
    let spool = reopen(dir.path());
    assert_eq!(
        generations_on_disk(dir.path()),
        (false, vec!["gen-2".to_string()])
    );
    assert_eq!(durable_state(&spool), before);
    assert_eq!(commit(&spool, "b3", &[1, 700, 701]).spooled, 1);
}

#[test]
fn a_crash_in_the_middle_of_a_reclaim_loses_nothing() {
    for (stop, root_db, gens) in [
        (ReclaimStop::AfterCopy, true, Vec::<String>::new()),
        (ReclaimStop::AfterSwitch, false, vec!["gen-1".to_string()]),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = drained_spool(dir.path());
        let before = durable_state(&spool);
        assert_eq!(spool.reclaim_stopping_at(stop).expect("reclaim"), None);
        drop(spool); // the crash: nothing after the stop point ran
        let spool = reopen(dir.path());
        assert_eq!(
            generations_on_disk(dir.path()),
            (root_db, gens.clone()),
            "{stop:?}: exactly one generation is left"
        );
        check_after_reclaim(&spool, &before);
        // The next reclaim works from there.
        assert!(spool.reclaim().expect("reclaim").is_some(), "{stop:?}");
    }
}

/// `max_bytes` caps the spool's real disk use; a drain gives the room back (the reclaim runs at the cap
/// even below RECLAIM_MIN_BYTES), and with nothing pending the spool is never full.
#[test]
fn the_cap_counts_disk_use_and_a_drain_gives_the_room_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cap = 2 << 20;
    let spool = Spool::open(
        dir.path(),
        SpoolOptions {
            max_bytes: cap,
            ..opts()
        },
    )
    .expect("open");
    assert!(!spool.is_full(), "empty");
    let mut n = 0u32;
    while !spool.is_full() {
        commit(
            &spool,
            &format!("b{n}"),
            &(n * 200..n * 200 + 200).collect::<Vec<_>>(),
        );
        n += 1;
        assert!(n < 10_000, "never full at {} bytes", spool.used_bytes());
    }
    assert!(spool.used_bytes() >= cap);
    assert!(spool.fill_ratio() >= 1.0);
    assert!(
        spool.figures().stored_bytes < cap,
        "full by disk use, before the compressed bytes reach the cap"
    );
    while let Some(d) = spool.cut_batch(&limits(5_000), true).expect("cut") {
        spool.ack_batch(d.seq).expect("ack");
    }
    assert!(!spool.is_full(), "nothing pending: never full");
    assert!(
        spool.used_bytes() < cap,
        "the drain at the cap reclaimed: {} bytes",
        spool.used_bytes()
    );
}

/// A durability point that fails (an fdatasync error) must not make the next step reuse a chunk, batch or
/// quarantine number: nothing committed is overwritten. A commit's (its segment's sync) is not applied
/// and its record, whole on disk, is never replayed; any other step's was applied and is durable with
/// the next sync.
#[test]
fn a_failed_fdatasync_never_lets_the_next_step_overwrite_what_was_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    let fail_next = || {
        spool
            .fail_syncs
            .store(1, std::sync::atomic::Ordering::SeqCst)
    };
    fail_next();
    let bytes: Vec<(String, Vec<u8>)> = (0..3).map(|i| (format!("id-{i}"), record(i))).collect();
    let recs: Vec<RawRecord<'_>> = bytes
        .iter()
        .map(|(id, b)| RawRecord { id, bytes: b })
        .collect();
    let first = spool.commit_blob(&BlobCommit {
        tenant_id: TENANT,
        content_type: "Audit.General",
        content_id: "b1",
        expires_unix: now_unix() + 86_400,
        collected_at: "2026-11-25T10:00:00Z",
        records: &recs,
        cursor: None,
    });
    assert!(first.is_err(), "the injected failure is reported");
    // A crash now: the failed record is whole in its segment, and fenced off in sled.
    let image = tempfile::tempdir().expect("tempdir");
    copy_tree(dir.path(), image.path());
    {
        let s = reopen(image.path());
        assert_eq!(
            (s.replayed_at_open, s.figures().pending_records),
            (0, 0),
            "the failed commit is never replayed"
        );
    }
    // Not applied: the collector's retry spools the whole blob.
    assert_eq!(commit(&spool, "b1", &[0, 1, 2]).spooled, 3);
    assert_eq!(commit(&spool, "b2", &[10, 11]).spooled, 2);
    fail_next();
    assert!(spool.cut_batch(&limits(2), true).is_err());
    let second = cut(&spool, 100);
    assert_eq!(
        second.seq, 2,
        "batch 1 was applied; its number is not reused"
    );
    let mut ids = Vec::new();
    for desc in spool.pending_batches().expect("batches") {
        ids.extend(ids_of(&spool.read_batch(&desc).expect("read")));
    }
    let want: Vec<String> = [0, 1, 2, 10, 11]
        .iter()
        .map(|i| format!("id-{i}"))
        .collect();
    assert_eq!(ids, want, "b1's records survived b2's commit");
    drop(spool);
    // After a restart, everything is there once: the failed record, whole on disk, is not replayed.
    let spool = reopen(dir.path());
    assert_eq!(spool.figures().pending_records, 5);
}

/// The segment files in `dir`, by number.
fn segment_files(dir: &std::path::Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir.join(SEGMENTS_DIR))
        .expect("segments dir")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            segments::parse_name(&name)
        })
        .collect();
    v.sort_unstable();
    v
}

/// Records live in segment files, sled holds only small references; a segment file is deleted once no
/// pending record is in it, and a reopened spool still reads the rest.
#[test]
fn records_live_in_segment_files_deleted_once_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    let mut n = 0u32;
    let mut x = 1u64;
    for blob in 0..40 {
        let bytes: Vec<(String, Vec<u8>)> = (0..100)
            .map(|_| {
                n += 1;
                // Pseudo-random pads hardly compress, so the frames fill several segments.
                let pad: String = (0..40)
                    .map(|_| {
                        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        format!("{:02x}", (x >> 56) as u8)
                    })
                    .collect();
                let json = format!(r#"{{"Id":"id-{n}","pad":"{pad}"}}"#);
                (format!("id-{n}"), json.into_bytes())
            })
            .collect();
        commit_records(&spool, &format!("b{blob}"), &bytes);
    }
    let files = segment_files(dir.path());
    assert!(files.len() >= 3, "{files:?}");
    for kv in spool.g().main.scan_prefix([keys::CHUNK]) {
        let v = kv.expect("chunk").1;
        assert!(
            v.len() <= 64,
            "a chunk's sled value is a reference: {} bytes",
            v.len()
        );
    }
    // Deliver half: the files before the oldest pending record go.
    let first = cut(&spool, 2_000);
    spool.ack_batch(first.seq).expect("ack");
    let left = segment_files(dir.path());
    assert!(
        !left.is_empty() && left[0] > files[0],
        "{files:?} -> {left:?}"
    );
    drop(spool);
    let spool = reopen(dir.path());
    let ids = drain_ids(&spool, 1_000);
    let want: Vec<String> = (2_001..=n).map(|i| format!("id-{i}")).collect();
    assert_eq!(ids, want);
    assert_eq!(
        segment_files(dir.path()),
        Vec::<u64>::new(),
        "all delivered"
    );
    assert_eq!(spool.figures().stored_bytes, 0);
}

/// A spool written before segments keeps its chunks inline in sled (version 1): they are still read, in
/// order with the new ones, and no segment file is deleted while they are the oldest.
#[test]
fn inline_chunks_of_a_spool_from_before_segments_are_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    commit(&spool, "old", &(0..300).collect::<Vec<_>>());
    let main = spool.g().main.clone();
    for kv in main.scan_prefix([keys::CHUNK]) {
        let (k, v) = kv.expect("chunk");
        let (h, lines) = spool.decode(&v).expect("decode");
        let inline = chunk::encode_inline(&lines, h.records, h.appended_ms).expect("encode");
        main.insert(k, inline).expect("rewrite");
    }
    drop(main);
    drop(spool);
    let spool = reopen(dir.path());
    commit(&spool, "new", &(300..600).collect::<Vec<_>>());
    let before = segment_files(dir.path());
    let a = cut(&spool, 300);
    let mut ids = ids_of(&body_of(&spool, &a));
    let b = cut(&spool, 1_000);
    ids.extend(ids_of(&body_of(&spool, &b)));
    let want: Vec<String> = (0..600).map(|i| format!("id-{i}")).collect();
    assert_eq!(ids, want);
    assert_eq!(
        segment_files(dir.path()),
        before,
        "the inline chunks are pending"
    );
}

/// A frame damaged on disk is refused with the file and offset, not sent.
#[test]
fn a_damaged_segment_is_reported_with_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    commit(&spool, "b", &(0..50).collect::<Vec<_>>());
    let seg = segment_files(dir.path())[0];
    let path = segments::segment_path(&dir.path().join(SEGMENTS_DIR), seg);
    let mut bytes = std::fs::read(&path).expect("read");
    // Inside the group's one frame (after the WAL record's header).
    bytes[crate::wal::HEADER_LEN as usize + 20] ^= 0x40;
    std::fs::write(&path, bytes).expect("write");
    let d = cut(&spool, 100);
    let err = spool.read_batch_zstd(&d).expect_err("damaged");
    assert!(
        err.to_string().contains(&path.display().to_string()) && err.to_string().contains("CRC"),
        "{err}"
    );
}

/// Files sled keeps beside its log (`blobs/`) under `dir`, at any depth.
fn sled_blob_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let path = e.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.parent().is_some_and(|p| p.ends_with("blobs")) {
                out.push(path);
            }
        }
    }
    out
}

/// sled writes a page larger than a quarter of its segment to a file of its own, which it never syncs
/// and whose loss its recovery skips (tests/sled_crash_prefix.rs): the spool's values stay small enough
/// that it never does, for large blobs and large quarantine items alike, and the items read back whole.
#[test]
fn no_value_the_spool_writes_makes_sled_write_a_blob_file() {
    let d = tempfile::tempdir().expect("dir");
    let spool = Spool::open(d.path(), opts()).expect("open");
    for b in 0..8u32 {
        let bytes: Vec<(String, Vec<u8>)> = (0..5_000u32)
            .map(|i| {
                let id = format!("{b:08x}-1111-2222-3333-{i:012x}");
                let json = format!(r#"{{"Id":"{id}","CreationTime":"2026-11-25T10:00:00"}}"#);
                (id, json.into_bytes())
            })
            .collect();
        assert_eq!(
            commit_records(&spool, &format!("blob-{b}"), &bytes).spooled,
            5_000
        );
    }
    let payload: String = (0..1_000_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let item = QuarantineItem {
        reason: "unreadable".into(),
        origin: "t/Audit.General big".into(),
        at: 1,
        records: 0,
        payload: payload.clone(),
    };
    spool
        .mark_done(
            TENANT,
            "Audit.General",
            "big",
            now_unix() + 86_400,
            DoneKind::Quarantined,
            Some(item.clone()),
        )
        .expect("quarantine a blob");
    let limits = BatchLimits {
        max_records: 10_000,
        max_raw_bytes: 64 << 20,
        linger: std::time::Duration::ZERO,
    };
    let desc = spool
        .cut_batch(&limits, true)
        .expect("cut")
        .expect("a batch");
    spool
        .quarantine_batch(desc.seq, "refused")
        .expect("quarantine a batch");
    spool.close().expect("close");
    assert_eq!(sled_blob_files(d.path()), Vec::<std::path::PathBuf>::new());
    let q = spool.quarantine().expect("quarantine");
    assert_eq!(q.len(), 2);
    assert_eq!(q[0], item);
    assert_eq!(q[1].records, desc.records);
    assert!(
        q[1].payload.len() as u64 >= desc.raw_bytes,
        "the batch's NDJSON, whole"
    );
}

/// A quarantine item of a spool from before parts (the whole JSON under `'Q' seq`) still reads, next to
/// the items written in parts after it.
#[test]
fn quarantine_items_written_whole_by_older_spools_still_read() {
    let d = tempfile::tempdir().expect("dir");
    let item = |origin: &str, payload: String| QuarantineItem {
        reason: "unreadable".into(),
        origin: origin.into(),
        at: 1,
        records: 0,
        payload,
    };
    let old = item("old", "x".repeat(10_000));
    {
        let spool = Spool::open(d.path(), opts()).expect("open");
        let main = &spool.g().main;
        main.insert(keys::seq_key(keys::QUARANTINE, 0), json(&old))
            .expect("legacy item");
        main.insert(
            keys::meta_key(keys::meta::NEXT_QUARANTINE),
            &1u64.to_be_bytes()[..],
        )
        .expect("next number");
        spool.close().expect("close");
    }
    let spool = reopen(d.path());
    let new = item("new", "y".repeat(10_000));
    spool
        .mark_done(
            TENANT,
            "Audit.General",
            "b",
            now_unix() + 86_400,
            DoneKind::Quarantined,
            Some(new.clone()),
        )
        .expect("quarantine");
    assert_eq!(spool.quarantine().expect("read"), vec![old, new]);
}

/// A failed commit whose record cannot be fenced off either (a second fdatasync error) makes the spool
/// refuse commits until it is opened again (no later record can then follow the failed one). Whether
/// the fence became durable after all decides whether the open replays the group; either way the
/// collector's retry of the blob leaves each record spooled once.
#[test]
fn a_commit_that_cannot_be_fenced_off_stops_commits_until_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    spool
        .fail_syncs
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let bytes: Vec<(String, Vec<u8>)> = (0..3).map(|i| (format!("id-{i}"), record(i))).collect();
    assert!(try_commit_records(&spool, "b1", &bytes).is_err());
    let refused = try_commit_records(&spool, "b2", &bytes).expect_err("refused");
    assert!(refused.to_string().contains("opened again"), "{refused}");
    drop(spool);
    let spool = reopen(dir.path());
    let replayed = spool.figures().pending_records;
    assert_eq!(replayed, 3 * spool.replayed_at_open);
    assert_eq!(commit_records(&spool, "b1", &bytes).spooled, 3 - replayed);
    assert_eq!(drain_ids(&spool, 100), ["id-0", "id-1", "id-2"]);
}

/// Copies the directory `from` to `to`, files as they are right now.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// A crash after a commit's segment sync loses nothing: the groups whose batches sled had not made
/// durable are replayed from their WAL records at the next open (records, figures, done-marks, cursors,
/// dedup Ids); a torn or damaged record and every record after it are not, and their blobs, never
/// acknowledged to a collector, are fetched and spooled again; nothing is replayed onto a state that
/// moved on without the records (another version opened the spool). The crash images take sled's files
/// as they were at its last sync (sled lost every write since) and the segments as they are.
#[test]
fn a_crash_after_the_segment_sync_is_replayed_from_the_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), opts()).expect("open");
    let synced = tempfile::tempdir().expect("tempdir");
    copy_tree(dir.path(), synced.path());
    let c = Cursor {
        listed_until: 777,
        ..Cursor::default()
    };
    let bytes: Vec<(String, Vec<u8>)> = (0..40).map(|i| (format!("id-{i}"), record(i))).collect();
    let recs: Vec<RawRecord<'_>> = bytes
        .iter()
        .map(|(id, b)| RawRecord { id, bytes: b })
        .collect();
    spool
        .commit_blob(&BlobCommit {
            tenant_id: TENANT,
            content_type: "Audit.General",
            content_id: "b0",
            expires_unix: now_unix() + 86_400,
            collected_at: "2026-11-25T10:00:00Z",
            records: &recs,
            cursor: Some(&c),
        })
        .expect("commit");
    commit(&spool, "b1", &(40..80).collect::<Vec<_>>());
    commit(&spool, "b2", &(80..120).collect::<Vec<_>>());
    const {
        assert!(
            crate::wal::SLED_SYNC_EVERY > 3,
            "no sync of sled since the open"
        )
    };
    let want_figures = spool.figures();
    let seg = *segment_files(dir.path()).last().expect("a segment");
    let seg_rel = std::path::Path::new(SEGMENTS_DIR).join(format!("{seg}.seg"));
    let images = tempfile::tempdir().expect("tempdir");
    let image = |name: &str| {
        let to = images.path().join(name);
        copy_tree(synced.path(), &to);
        copy_tree(&dir.path().join(SEGMENTS_DIR), &to.join(SEGMENTS_DIR));
        to
    };
    let ids =
        |range: std::ops::Range<u32>| -> Vec<String> { range.map(|i| format!("id-{i}")).collect() };

    // Whole: every group comes back.
    let whole = image("whole");
    let s = reopen(&whole);
    assert_eq!(s.replayed_at_open, 3);
    assert_eq!(s.figures(), want_figures);
    assert!(s.is_done(TENANT, "Audit.General", "b2").expect("done"));
    assert_eq!(
        s.cursor(TENANT, "Audit.General")
            .expect("cursor")
            .map(|c| c.listed_until),
        Some(777)
    );
    assert_eq!(
        commit(&s, "b1", &(40..80).collect::<Vec<_>>()).spooled,
        0,
        "the Ids are in the window again"
    );
    assert_eq!(drain_ids(&s, 1000), ids(0..120));
    drop(s);
    // Reopened after that: nothing is replayed twice.
    let s = reopen(&whole);
    assert_eq!((s.replayed_at_open, s.figures().pending_records), (0, 0));
    drop(s);

    // The last record torn: the groups before it come back, its blob is fetched again.
    let torn = image("torn");
    let path = torn.join(&seg_rel);
    let len = std::fs::metadata(&path).expect("len").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(len - 3))
        .expect("truncate");
    let s = reopen(&torn);
    assert_eq!(s.replayed_at_open, 2);
    assert!(!s.is_done(TENANT, "Audit.General", "b2").expect("done"));
    assert_eq!(commit(&s, "b2", &(80..120).collect::<Vec<_>>()).spooled, 40);
    assert_eq!(drain_ids(&s, 1000), ids(0..120));
    drop(s);

    // The second record damaged (a byte of its frame): neither it nor the third is replayed.
    let damaged = image("damaged");
    let path = damaged.join(&seg_rel);
    let mut b = std::fs::read(&path).expect("read");
    let first_len = {
        let frames: [u8; 8] = b[12..20].try_into().expect("frames length");
        let ops: [u8; 4] = b[20..24].try_into().expect("ops length");
        crate::wal::HEADER_LEN + u64::from_be_bytes(frames) + u64::from(u32::from_be_bytes(ops))
    };
    b[(first_len + crate::wal::HEADER_LEN) as usize + 5] ^= 1;
    std::fs::write(&path, b).expect("write");
    let s = reopen(&damaged);
    assert_eq!((s.replayed_at_open, s.figures().pending_records), (1, 40));
    for (blob, range) in [("b1", 40..80), ("b2", 80..120)] {
        assert!(!s.is_done(TENANT, "Audit.General", blob).expect("done"));
        assert_eq!(commit(&s, blob, &range.collect::<Vec<_>>()).spooled, 40);
    }
    assert_eq!(drain_ids(&s, 1000), ids(0..120));
    drop(s);

    // Another version, which does not replay, opened the image and moved on (here: a commit of its own
    // took chunk numbers): nothing is replayed onto that.
    let moved = image("moved-on");
    {
        let n = crate::gen::current(&moved).expect("generation");
        let g = crate::gen::open(&moved, n, 4 << 20).expect("sled");
        g.main
            .insert(
                keys::meta_key(keys::meta::NEXT_CHUNK),
                &500u64.to_be_bytes()[..],
            )
            .expect("insert");
        g.make_durable().expect("sync");
    }
    let s = reopen(&moved);
    assert_eq!(s.replayed_at_open, 0);
}

//! The record-Id dedup window: one sled tree per UTC day (`seen2-<day>`) holding the keys of the record
//! Ids first spooled that day, so that a whole day expires with one `drop_tree` instead of one delete
//! per Id. Trees of the older key format 1 (`seen-<day>`) are still consulted until they expire.
//!
//! Invariants: a key is exact (the tenant and the full record Id, see [`crate::keys::seen_key_v2`]): a
//! lookup never answers "seen" for an Id that was not inserted, so dedup never drops a record it was not
//! given before (a false positive would be silent data loss). A day is dropped only when it is wholly
//! older than the window.

use std::collections::BTreeMap;

use crate::{keys, SpoolError};

/// The day trees of one sled database. Not synchronised: the spool holds it under its lock.
pub struct DedupWindow {
    db: sled::Db,
    /// Format-2 day trees: written and read.
    days: BTreeMap<u32, sled::Tree>,
    /// Format-1 day trees left by an older version: read until they expire.
    days_v1: BTreeMap<u32, sled::Tree>,
}

impl DedupWindow {
    /// Finds the existing day trees of `db`.
    pub fn open(db: &sled::Db) -> Result<DedupWindow, SpoolError> {
        let (mut days, mut days_v1) = (BTreeMap::new(), BTreeMap::new());
        for name in db.tree_names() {
            if let Some(day) = keys::seen2_tree_day(&name) {
                days.insert(day, db.open_tree(&name)?);
            } else if let Some(day) = keys::seen_tree_day(&name) {
                days_v1.insert(day, db.open_tree(&name)?);
            }
        }
        Ok(DedupWindow {
            db: db.clone(),
            days,
            days_v1,
        })
    }

    /// Whether the record Id of the tenant was inserted on any day still in the window (newest day
    /// first: recent duplicates are the common case). `key` is [`keys::seen_key_v2`] of the pair. A miss
    /// costs one lookup per day kept.
    pub fn contains(
        &self,
        key: &[u8],
        tenant_id: &str,
        record_id: &str,
    ) -> Result<bool, SpoolError> {
        for tree in self.days.values().rev() {
            if tree.contains_key(key)? {
                return Ok(true);
            }
        }
        if !self.days_v1.is_empty() {
            let old = keys::seen_key(tenant_id, record_id);
            for tree in self.days_v1.values().rev() {
                if tree.contains_key(&old)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The tree of `day` (days since the Unix epoch, UTC), created when missing. Inserts go through it
    /// inside the caller's transaction.
    pub fn day_tree(&mut self, day: u32) -> Result<sled::Tree, SpoolError> {
        if let Some(t) = self.days.get(&day) {
            return Ok(t.clone());
        }
        let t = self.db.open_tree(keys::seen2_tree_name(day))?;
        self.days.insert(day, t.clone());
        Ok(t)
    }

    /// Inserts keys ([`keys::seen_key_v2`]) into `day` in one sled batch (bulk loading: benches and tools; the spool inserts in
    /// its blob transaction). Not durable until the database is flushed.
    pub fn insert_batch<'k>(
        &mut self,
        day: u32,
        keys: impl IntoIterator<Item = &'k [u8]>,
    ) -> Result<(), SpoolError> {
        let tree = self.day_tree(day)?;
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.insert(k, &[]);
        }
        tree.apply_batch(batch)?;
        Ok(())
    }

    /// Drops every day before `oldest_kept`, one `drop_tree` each. Returns how many days it dropped.
    pub fn expire_before(&mut self, oldest_kept: u32) -> Result<usize, SpoolError> {
        let old: Vec<u32> = self.days.range(..oldest_kept).map(|(d, _)| *d).collect();
        for day in &old {
            self.days.remove(day);
            self.db.drop_tree(keys::seen2_tree_name(*day))?;
        }
        let old_v1: Vec<u32> = self.days_v1.range(..oldest_kept).map(|(d, _)| *d).collect();
        for day in &old_v1 {
            self.days_v1.remove(day);
            self.db.drop_tree(keys::seen_tree_name(*day))?;
        }
        Ok(old.len() + old_v1.len())
    }

    /// The days held (either format), oldest first, each once.
    pub fn days(&self) -> Vec<u32> {
        let mut d: Vec<u32> = self
            .days
            .keys()
            .chain(self.days_v1.keys())
            .copied()
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }
}

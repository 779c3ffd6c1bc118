//! A page of a content listing (`subscriptions/content`), as Microsoft or anything between serves it:
//! `m365_collector::api::parse_listing`, then what the collector reads from each item
//! (`ContentItem::expires_at`, which parses `contentExpiration` / `contentCreated`, and the
//! `timefmt::rfc3339` it is logged with).
//!
//! Invariants: nothing panics; a body that does not parse is a `BadResponse` naming
//! `subscriptions/content` with a non-empty text; a page holds no more items than its bytes allow, and
//! no `contentId` longer than `MAX_CONTENT_ID_BYTES`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use m365_collector::api::{parse_listing, ApiError, MAX_CONTENT_ID_BYTES};
use time::macros::datetime;

/// The shortest item: the two required fields, empty.
const MIN_ITEM_BYTES: usize = r#"{"contentId":"","contentUri":""}"#.len();

fuzz_target!(|body: &[u8]| {
    match parse_listing(body) {
        Ok(items) => {
            assert!(
                items.len() * MIN_ITEM_BYTES <= body.len(),
                "{} items out of {} bytes",
                items.len(),
                body.len()
            );
            // A fixed clock keeps a crash reproducible.
            let now = datetime!(2026-06-01 12:00 UTC);
            for item in &items {
                assert!(item.content_id.len() <= MAX_CONTENT_ID_BYTES);
                // The collector logs the expiry of content it reports lost (past its expiry, or
                // refused as expired by the API whatever the listing said).
                let _ = sensor_core::timefmt::rfc3339(item.expires_at(now));
            }
        }
        Err(ApiError::BadResponse { what, text }) => {
            assert_eq!(what, "subscriptions/content");
            assert!(!text.is_empty(), "an unreadable listing must say why");
        }
        Err(e) => panic!("an unreadable listing must be a BadResponse, not {e:?}"),
    }
});

//! Remote management of the sensor (`shared/design/backend-protocol.md`): the device identity and
//! enrolment ([`identity`], [`client::enroll`]), the managed configuration laid over the local file
//! ([`managed`]), the journal that makes each command run at most once ([`journal`]), and the client of
//! the backend's management endpoints ([`client`]), and the hand-off of update bundles to the host's
//! updater ([`update`]).
//!
//! Invariant: everything this crate persists goes through [`store`] (atomic replace, 0600 for keys and
//! secrets), and nothing it persists or sends holds a secret but the device key and the credential
//! files it is asked to store.

pub mod client;
pub mod identity;
pub mod journal;
pub mod managed;
pub mod protocol;
pub mod store;
pub mod update;

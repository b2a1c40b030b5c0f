//! How ranks find each other and learn that one is gone: the rendezvous store hosted by global rank 0, the
//! job-token handshake that opens every connection, and the liveness watch every rank keeps on the store.
//!
//! - `wire`: the byte encoding shared by every protocol of the crate (integers, length-prefixed bytes).
//! - `auth`: the job token and the challenge-response handshake, used by the store and the ring's links alike.
//! - `store`: the store's protocol, its server (inside rank 0's process) and the client every rank holds.
//! - `liveness`: the watch connection, both its store end and its rank end, and [`Liveness`](crate::Liveness).

pub(crate) mod auth;
pub(crate) mod liveness;
pub(crate) mod store;
pub(crate) mod wire;

//! How ranks find each other and learn that one is gone: the rendezvous store (hosted by global rank 0, or on its
//! own), the job-token handshake that opens every connection, and the liveness watch every rank keeps on the store.
//!
//! - `wire`: the byte encoding shared by every protocol of the crate (integers, length-prefixed bytes).
//! - `auth`: the job token and the challenge-response handshake, used by the store and the ring's links alike.
//! - `admission`: which nodes a round of a standalone store admits when the node count is a range.
//! - `protocol`: the store's requests and answers as bytes.
//! - `liveness`: the watch connection, both its store end and its rank end, and [`Liveness`](crate::Liveness).
//! - `server`: the store itself, hosted by rank 0 or by a process of its own; it knows no client.
//! - `standalone`: [`StandaloneStore`](crate::StandaloneStore), the server on its own (`hytrain rendezvous`).
//! - `client`: [`Store`](crate::Store), every rank's connection to the store, and the rendezvous.
//!
//! Each file uses only those listed above it, so there is no cycle; `tests` holds the store's tests.

pub(crate) mod admission;
pub(crate) mod auth;
pub(crate) mod client;
pub(crate) mod liveness;
pub(crate) mod protocol;
pub(crate) mod server;
pub(crate) mod standalone;
pub(crate) mod wire;

#[cfg(test)]
mod tests;

//! Connection set-up: which backend a job that is not run by `mpirun` uses ([`Transport`]), and how its ranks
//! connect over a rendezvous [`Store`] they have all joined ([`connect`]): the whole-job TCP ring always, and on top
//! of it shared memory between the ranks of each node when the transport and the topology allow.

use crate::backend::shm;
use crate::{Collective, CommError, CommOptions, Membership, Ring, Store};

/// How the ranks of a job exchange data; see [`CommOptions::transport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Shared memory between the ranks of each node (hierarchical across nodes) when the topology allows it,
    /// otherwise the TCP ring.
    #[default]
    Auto,
    /// The TCP ring between all ranks, whatever the topology.
    Ring,
    /// Shared memory between the ranks of each node; fails at start-up when it cannot be set up.
    Shm,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Ring => "ring",
            Transport::Shm => "shm",
        })
    }
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Transport::Auto),
            "ring" => Ok(Transport::Ring),
            "shm" => Ok(Transport::Shm),
            other => Err(format!("unknown transport '{other}'; use auto, ring or shm")),
        }
    }
}

/// The collective over a store every rank has already joined: the TCP ring, with shared memory between the ranks
/// of one node when [`CommOptions::transport`] allows. For callers that keep the store for more (a GPU job passes
/// NCCL's unique id through it); [`init`](crate::init) does both steps.
pub fn connect(store: &Store, m: &Membership, opts: &CommOptions) -> Result<Box<dyn Collective>, CommError> {
    m.validate()?;
    connect_with(store, m, opts, None)
}

/// [`connect`] with a fixed slot size (tests use tiny slots to cross many rounds).
pub(crate) fn connect_with(
    store: &Store,
    m: &Membership,
    opts: &CommOptions,
    slot_bytes: Option<usize>,
) -> Result<Box<dyn Collective>, CommError> {
    let flat = Ring::connect(store, m, opts)?;
    if opts.transport == Transport::Ring || m.world_size == 1 {
        return Ok(Box::new(flat));
    }
    shm::over_ring(flat, store, m, opts, slot_bytes)
}

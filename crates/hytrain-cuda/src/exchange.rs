//! Handing NCCL's unique id from rank 0 to every rank through the job's rendezvous store.
//!
//! The exchange names only what it needs of a store, [`IdStore`]; hytrain-comm's rendezvous `Store` implements it
//! here, and tests can use any map.

use crate::nccl::{Nccl, UniqueId};
use crate::CudaError;

/// The two operations of a rendezvous store the id exchange uses.
pub trait IdStore {
    /// The store's own error, carried inside [`CudaError::IdExchange`].
    type Error: std::error::Error + Send + Sync + 'static;

    /// Stores `value` under `key` for every rank to read.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), Self::Error>;

    /// The value under `key`, waiting until some rank sets it; gives up with an error after the store's own
    /// timeout, so a rank 0 that never publishes does not hang the others.
    fn get(&self, key: &str) -> Result<Vec<u8>, Self::Error>;
}

/// Every rank calls this with the same `key`: rank `root` creates the unique id and publishes it, the others wait
/// for it. All return the same id.
pub fn exchange_unique_id<S: IdStore>(
    nccl: &Nccl,
    store: &S,
    rank: usize,
    root: usize,
    key: &str,
) -> Result<UniqueId, CudaError> {
    if rank == root {
        let id = nccl.unique_id()?;
        store.set(key, id.as_bytes()).map_err(|e| CudaError::IdExchange {
            rank,
            action: "publish",
            key: key.into(),
            source: Box::new(e),
        })?;
        return Ok(id);
    }
    let bytes = store.get(key).map_err(|e| CudaError::IdExchange {
        rank,
        action: "fetch",
        key: key.into(),
        source: Box::new(e),
    })?;
    UniqueId::from_bytes(&bytes, key)
}

impl IdStore for hytrain_comm::Store {
    type Error = hytrain_comm::CommError;

    fn set(&self, key: &str, value: &[u8]) -> Result<(), Self::Error> {
        hytrain_comm::Store::set(self, key, value)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, Self::Error> {
        hytrain_comm::Store::get(self, key)
    }
}

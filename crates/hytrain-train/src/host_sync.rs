//! Counting the points where a training step would make the host wait for the GPU, so tests can require none.
//!
//! On a GPU the host only enqueues work; a step stays asynchronous unless something needs a value the device
//! computes: reading a tensor's value (`item()`, `double_value`, which run libtorch's `_local_scalar_dense`), an
//! operation whose output size depends on the data (`nonzero`, `masked_select`), `equal`, a copy from the device
//! to the host, or a copy to the device from pageable memory (or without `non_blocking`). Every such libtorch
//! operation the calling thread runs is counted through libtorch's `RecordFunction` observers
//! (`csrc/step_sync.cpp`), so the count sees them on the CPU too, where they cost nothing, whoever issues them:
//! the engine, a model or libtorch itself. Collectives that go through the host are counted by wrapping the
//! [`crate::Collective`] (see `tests/host_sync.rs`).
//!
//! ```
//! hytrain_train::host_sync::watch_this_thread();
//! let before = hytrain_train::host_sync::on_this_thread();
//! let _ = tch::Tensor::from(2.0).double_value(&[]);
//! assert_eq!(hytrain_train::host_sync::on_this_thread(), before + 1);
//! ```

extern "C" {
    fn hyt_watch_host_syncs();
    fn hyt_host_syncs_on_this_thread() -> u64;
}

/// Starts counting on the calling thread (each thread counts its own); calling it again changes nothing. It
/// installs a libtorch observer on this thread, which costs a little on every operation: for tests and checks,
/// not for training.
pub fn watch_this_thread() {
    // SAFETY: no arguments; the shim registers a thread-local callback once per thread.
    unsafe { hyt_watch_host_syncs() }
}

/// Host synchronisation points the calling thread has run since [`watch_this_thread`] (0 before it).
pub fn on_this_thread() -> u64 {
    // SAFETY: reads a thread-local counter.
    unsafe { hyt_host_syncs_on_this_thread() }
}

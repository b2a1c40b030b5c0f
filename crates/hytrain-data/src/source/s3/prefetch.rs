//! Reading ahead from S3: several objects in flight ahead of the consumer, within the loader's budget.

use std::collections::VecDeque;
use std::sync::{mpsc, Arc};

use super::S3;
use crate::source::ReadBudget;
use crate::Error;

/// One object being read ahead: its name, where its bytes will arrive, and the task to cancel.
type InFlight = (String, mpsc::Receiver<Result<Vec<u8>, Error>>, tokio::task::AbortHandle);

/// [`Source::read_many`] and [`Source::read_ahead`] for S3: keeps up to [`S3Options::prefetch`] objects in
/// flight, and within a budget only as many as it holds.
pub(super) struct Prefetch<'a> {
    s3: &'a S3,
    /// Objects not started yet, with the bytes to reserve for each.
    pending: VecDeque<(String, u64)>,
    in_flight: VecDeque<InFlight>,
    budget: Option<Arc<ReadBudget>>,
}

impl<'a> Prefetch<'a> {
    /// Reads `objects` (name, bytes to reserve in `budget`) from `s3`, in order.
    pub(super) fn new(s3: &'a S3, objects: Vec<(String, u64)>, budget: Option<Arc<ReadBudget>>) -> Self {
        Prefetch { s3, pending: objects.into(), in_flight: VecDeque::new(), budget }
    }
}

impl Iterator for Prefetch<'_> {
    type Item = Result<(String, Vec<u8>), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.in_flight.len() < self.s3.inner.opts.prefetch {
            let Some(&(_, bytes)) = self.pending.front() else {
                break;
            };
            if let Some(budget) = &self.budget {
                // With reads in flight, start only what fits now and wait on the oldest read, whose release by
                // the consumer makes room; with none, wait for room (the consumer is releasing what it holds).
                let reserved =
                    if self.in_flight.is_empty() { budget.reserve(bytes) } else { budget.try_reserve(bytes) };
                if !reserved {
                    break;
                }
            }
            let Some((name, _)) = self.pending.pop_front() else {
                break;
            };
            let (tx, rx) = mpsc::sync_channel(1);
            let inner = self.s3.inner.clone();
            let task_name = name.clone();
            let task = self.s3.handle.spawn(async move {
                let _ = tx.send(inner.read(task_name, None, true).await);
            });
            self.in_flight.push_back((name, rx, task.abort_handle()));
        }
        let (name, rx, _) = self.in_flight.pop_front()?;
        let result = rx.recv().unwrap_or_else(|_| Err(self.s3.inner.bug("a prefetch task ended without an answer")));
        Some(result.map(|bytes| (name, bytes)))
    }
}

impl Drop for Prefetch<'_> {
    fn drop(&mut self) {
        for (_, _, task) in &self.in_flight {
            task.abort();
        }
    }
}

//! Test doubles for the crates above this one (feature `testing`): a [`FailingSource`] that wraps a real source
//! and fails one chosen read the way a lost mount or an S3 outage fails it, for tests of what the data pipeline
//! and the training loop do when a read fails mid-epoch. Everything else goes to the real source.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::source::{Object, Source};
use crate::Error;

/// How a [`FailingSource`] fails its chosen read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFault {
    /// An I/O error on the object, as a folder on a lost EFS mount gives (`Error::Read`, EIO).
    Io,
    /// An S3 request that failed for good (`Error::S3`, GetObject).
    S3,
}

/// A real source whose read number `fail_at` (counting every object read, whole or ranged, from 0) fails with
/// `fault`, as do all reads after it (a lost mount stays lost). Listing always works, so a dataset opens and the
/// failure comes mid-epoch. Reads go one after another through [`Source::read`], never through the inner
/// source's own prefetching, so the count is exact.
#[derive(Debug)]
pub struct FailingSource {
    inner: Arc<dyn Source>,
    fail_at: usize,
    fault: ReadFault,
    reads: Arc<AtomicUsize>,
}

impl FailingSource {
    /// Wraps `inner`; `fail_at == usize::MAX` never fails (to count the reads a run makes).
    pub fn new(inner: Arc<dyn Source>, fail_at: usize, fault: ReadFault) -> Self {
        FailingSource { inner, fail_at, fault, reads: Arc::default() }
    }

    /// The count of reads made so far (failed ones included), readable after the source has been handed to the
    /// code under test.
    pub fn reads(&self) -> Arc<AtomicUsize> {
        self.reads.clone()
    }

    fn next(&self, name: &str) -> Result<(), Error> {
        let read = self.reads.fetch_add(1, Ordering::SeqCst);
        if read < self.fail_at {
            return Ok(());
        }
        Err(match self.fault {
            ReadFault::Io => Error::Read {
                source_desc: self.describe(),
                name: name.to_string(),
                io: std::io::Error::other(format!("injected by FailingSource at read {read}: input/output error")),
            },
            ReadFault::S3 => Error::S3 {
                location: format!("{}/{name}", self.describe()),
                op: "GetObject".into(),
                detail: format!("injected by FailingSource at read {read}: service unavailable"),
            },
        })
    }
}

impl Source for FailingSource {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn list(&self) -> Result<Vec<Object>, Error> {
        self.inner.list()
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, Error> {
        self.next(name)?;
        self.inner.read(name)
    }

    fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        self.next(name)?;
        self.inner.read_range(name, offset, len)
    }

    fn begin_epoch(&self, epoch: u64) -> Result<(), Error> {
        self.inner.begin_epoch(epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemorySource;

    fn memory() -> Arc<dyn Source> {
        let mut m = MemorySource::new("mem://test");
        m.insert("a", b"alpha".to_vec());
        m.insert("b", b"beta".to_vec());
        Arc::new(m)
    }

    #[test]
    fn reads_before_the_chosen_one_pass_through_and_every_later_one_fails() {
        let source = FailingSource::new(memory(), 2, ReadFault::Io);
        assert_eq!(source.read("a").unwrap(), b"alpha");
        assert_eq!(source.read_range("b", 1, 2).unwrap(), b"et");
        let err = source.read("a").unwrap_err().to_string();
        assert!(err.contains("cannot read a") && err.contains("injected by FailingSource at read 2"), "{err}");
        assert!(source.read("b").is_err(), "a lost mount stays lost");
        assert_eq!(source.list().unwrap().len(), 2, "listing still works");
        assert_eq!(source.reads().load(Ordering::SeqCst), 4);
    }

    #[test]
    fn an_s3_fault_names_the_object_and_the_request() {
        let source = FailingSource::new(memory(), 0, ReadFault::S3);
        let names = vec!["b".to_string()];
        let got: Vec<_> = source.read_many(names).collect();
        let err = got[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("mem://test/b") && err.contains("GetObject failed"), "{err}");
    }
}

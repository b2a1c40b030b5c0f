//! A source over objects held in memory: for a dataset embedded in the binary (the demo's), for data a program
//! makes itself, and for tests. It is a real [`Source`]: listing, sorting and reading behave as for a directory.

use std::collections::BTreeMap;

use crate::source::{Object, Source};
use crate::Error;

/// Named objects in memory, listed sorted by name like every source.
#[derive(Debug, Default, Clone)]
pub struct MemorySource {
    name: String,
    objects: BTreeMap<String, Vec<u8>>,
}

impl MemorySource {
    /// An empty source; `name` is what [`Source::describe`] returns (e.g. `embedded:cifar10-sample`).
    pub fn new(name: impl Into<String>) -> MemorySource {
        MemorySource { name: name.into(), objects: BTreeMap::new() }
    }

    /// Adds (or replaces) an object; `name` is `/`-separated, relative to the source root.
    pub fn insert(&mut self, name: impl Into<String>, bytes: Vec<u8>) -> &mut MemorySource {
        self.objects.insert(name.into(), bytes);
        self
    }

    /// Builder form of [`MemorySource::insert`].
    pub fn with(mut self, name: impl Into<String>, bytes: Vec<u8>) -> MemorySource {
        self.insert(name, bytes);
        self
    }
}

impl Source for MemorySource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn list(&self) -> Result<Vec<Object>, Error> {
        Ok(self.objects.iter().map(|(k, v)| Object { name: k.clone(), size: v.len() as u64 }).collect())
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, Error> {
        self.objects.get(name).cloned().ok_or_else(|| Error::Read {
            source_desc: self.name.clone(),
            name: name.to_string(),
            io: std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"),
        })
    }
}

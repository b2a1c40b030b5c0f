//! Helpers shared by hytrain-data's tests: fixture folders loaded into a [`MemorySource`] and small tar builders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hytrain_data::format::{decode, Image};
use hytrain_data::source::SharedSource;
use hytrain_data::MemorySource;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every file under `dir`, named relative to it with `/`.
pub fn load_dir(dir: &Path) -> MemorySource {
    fn walk(root: &Path, dir: &Path, into: &mut MemorySource) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(root, &p, into);
            } else {
                let name = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                into.insert(name, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut m = MemorySource::new(format!("mem:{}", dir.display()));
    walk(dir, dir, &mut m);
    m
}

pub fn fixture(name: &str) -> SharedSource {
    Arc::new(load_dir(&fixtures().join(name)))
}

/// A tar with the given members, written like any tar tool (ustar headers, end marker). Paths are copied into the
/// header as they are, so tests can make the bad ones (`..`, absolute) that careful writers refuse.
pub fn tar(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A small png whose pixels encode `seed`.
pub fn png(seed: u8, side: usize) -> Vec<u8> {
    let pixels = (0..side * side * 3).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect();
    decode::png(&Image { height: side, width: side, channels: 3, pixels }).unwrap()
}

/// A source of tar shards: `shards[i]` holds `(key, label)` samples with 8x8 png inputs.
pub fn tar_dataset(shards: &[Vec<(String, i64)>]) -> MemorySource {
    let mut m = MemorySource::new("mem:synthetic");
    for (i, samples) in shards.iter().enumerate() {
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        for (key, label) in samples {
            members.push((format!("{key}.png"), png(*label as u8, 8)));
            members.push((format!("{key}.cls"), label.to_string().into_bytes()));
        }
        let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        m.insert(format!("shard-{i:06}.tar"), tar(&refs));
    }
    m
}

/// `shards` shards of `per_shard` samples; labels are the global sample numbers, so they identify samples.
pub fn numbered_dataset(shards: usize, per_shard: usize) -> MemorySource {
    let spec: Vec<Vec<(String, i64)>> = (0..shards)
        .map(|s| (0..per_shard).map(|i| (format!("s{s}-{i:04}"), (s * per_shard + i) as i64)).collect())
        .collect();
    tar_dataset(&spec)
}

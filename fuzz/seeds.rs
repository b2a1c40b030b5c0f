//! The committed seed corpora (fuzz/corpus/<target>) for the crates' `tests/fuzz_corpus.rs`, which replay them
//! without cargo-fuzz. Each of those tests pulls this file in with `#[path = "../../../fuzz/seeds.rs"] mod seeds;`.

use std::path::PathBuf;

use proptest::sample::Index;

/// Every seed of `target`'s corpus as (path, bytes), sorted by path so a failure names the same file each run.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, b)
        })
        .collect()
}

/// One seed picked by `pick`, cut at `at` (`cut`) or with the byte at `at` flipped by `x`: what cargo-fuzz's
/// simplest mutations do, for proptest.
pub fn mutate(seeds: &[(PathBuf, Vec<u8>)], pick: Index, at: Index, x: u8, cut: bool) -> Vec<u8> {
    let mut bytes = seeds[pick.index(seeds.len())].1.clone();
    if bytes.is_empty() {
        return bytes;
    }
    let i = at.index(bytes.len());
    if cut {
        bytes.truncate(i)
    } else {
        bytes[i] ^= x.max(1)
    }
    bytes
}

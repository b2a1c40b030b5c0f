//! Counting a dataset's samples when it has no index (`data pack`'s index.json): one process per host reads the
//! shards, the others take its counts through the rendezvous store, and a writable folder keeps the counts in an
//! index.json for the next job (issue 15 item 2). The S3 side, counted in GETs, is in
//! crates/hytrain-data/tests/shared_counts.rs.

use crate::common;
use crate::jobs;

use std::path::Path;
use std::time::Duration;

use common::wait;
use jobs::{digits, launch_train};

const SKIPPED: &str = "skipped bad samples while indexing";

/// A copy of the digits shards and class names without the index `data pack` wrote.
fn digits_without_index() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let from = digits();
    std::fs::copy(from.join("classes.json"), dir.path().join("classes.json")).unwrap();
    for split in ["train", "test"] {
        std::fs::create_dir(dir.path().join(split)).unwrap();
        for entry in std::fs::read_dir(from.join(split)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(split).join(entry.file_name())).unwrap();
        }
    }
    dir
}

/// Adds a shard whose one sample has no label, which `--skip-bad-samples` leaves out while counting.
fn add_bad_shard(data: &Path) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, "orphan.png", &b"png"[..]).unwrap();
    std::fs::write(data.join("train/shard-bad.tar"), builder.into_inner().unwrap()).unwrap();
}

/// `hytrain launch --nproc-per-node N -- hytrain train` for one step on `data`, run in `dir`; its stderr.
fn train(dir: &Path, data: &Path, nproc: usize, extra: &[&str]) -> String {
    let data = data.display().to_string();
    let mut args = vec!["--model", "mlp", "--batch-size", "16", "--max-steps", "1", "--data", &data];
    args.extend(["--checkpoint-dir", "none", "--model-dir", "none", "--output-dir", "none"]);
    args.extend(extra);
    let out = wait(launch_train(dir, nproc, &args).spawn().unwrap(), Duration::from_secs(240), "hytrain train");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "training failed:\n{stderr}");
    stderr
}

/// The index's entries by name: (bytes, samples).
fn entries(index: &Path) -> Vec<(String, u64, u64)> {
    let text = std::fs::read_to_string(index).unwrap_or_else(|e| panic!("{}: {e}", index.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut e: Vec<(String, u64, u64)> = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (s["name"].as_str().unwrap().to_string(), s["bytes"].as_u64().unwrap(), s["samples"].as_u64().unwrap())
        })
        .collect();
    e.sort();
    e
}

#[test]
fn four_ranks_on_one_host_count_the_shards_once_like_one_rank() {
    for nproc in [1, 4] {
        let data = digits_without_index();
        add_bad_shard(data.path());
        let dir = tempfile::tempdir().unwrap();
        let stderr = train(dir.path(), data.path(), nproc, &["--skip-bad-samples"]);
        // Each process that reads the training shards to count them meets the bad sample once and says so.
        assert_eq!(
            stderr.matches(SKIPPED).count(),
            1,
            "{nproc} rank(s): the training shards were counted by more than one process:\n{stderr}"
        );
        // Counts that leave bad samples out are not an index of the shards.
        assert!(!data.path().join("index.json").exists(), "{nproc} rank(s) wrote an index with --skip-bad-samples");
    }
}

#[test]
fn a_writable_folder_without_an_index_gets_one_holding_every_splits_counts() {
    let data = digits_without_index();
    let dir = tempfile::tempdir().unwrap();
    let stderr = train(dir.path(), data.path(), 2, &[]);
    assert_eq!(stderr.matches("kept the sample counts").count(), 1, "{stderr}");
    // The counts are the ones `data pack` wrote: every training and test shard at its size.
    assert_eq!(entries(&data.path().join("index.json")), entries(&digits().join("index.json")));
    let leftovers: Vec<String> = std::fs::read_dir(data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left beside the data: {leftovers:?}");
    // The next job takes the counts from it.
    let stderr = train(dir.path(), data.path(), 1, &[]);
    assert!(!stderr.contains("counted the samples"), "{stderr}");
}

#[test]
fn a_folder_the_index_cannot_be_written_to_trains_without_one() {
    let data = digits_without_index();
    // What another writer of the same folder (or one that stopped half way) leaves: this job must not write over
    // it, nor fail.
    std::fs::write(data.path().join(".index.json.partial"), b"").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stderr = train(dir.path(), data.path(), 1, &[]);
    assert!(!data.path().join("index.json").exists());
    assert!(stderr.contains("not keeping the sample counts"), "{stderr}");
}

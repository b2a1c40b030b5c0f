//! Retries of the S3 source: faults injected in front of a real S3 server (s3s-fs) for the first requests, then
//! the real answers. Reads must come out byte-exact; a fault that never stops must end in a clear error.

use crate::common;
use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hytrain_data::format::{Dataset, OpenOptions};
use hytrain_data::source::{S3Options, SharedSource, Source, S3};
use hytrain_data::{Error, Loader, LoaderConfig, SamplerConfig};
use support::{pseudo_random, Fault, LocalS3};

const PART: u64 = 32 * 1024;

fn setup() -> (tempfile::TempDir, LocalS3, Vec<u8>, S3) {
    let root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(root.path());
    let data = pseudo_random(4 * PART as usize + 777, 9);
    server.put("bkt", "ds/shard-000.tar", &data);
    server.put("bkt", "ds/shard-001.tar", b"small");
    let opts = S3Options { part_size: PART, max_in_flight: 2, ..server.options() };
    let source = S3::new("s3://bkt/ds", &opts).unwrap();
    (root, server, data, source)
}

#[test]
fn transient_faults_on_ranged_gets_are_retried_and_bytes_stay_exact() {
    let (_root, server, data, source) = setup();
    source.list().unwrap();
    for fault in [Fault::SlowDown, Fault::Internal, Fault::Reset, Fault::Truncate, Fault::Short] {
        server.faults.reset();
        server.faults.inject("GetObject", fault, 3);
        assert_eq!(source.read("shard-000.tar").unwrap(), data, "{fault:?}");
        // Five parts plus one repeat for each of the three faulted requests.
        assert_eq!(server.faults.count("GetObject"), 5 + 3, "{fault:?}");
    }
}

#[test]
fn transient_faults_on_a_single_get_are_retried() {
    let (_root, server, _data, source) = setup();
    source.list().unwrap();
    for fault in [Fault::SlowDown, Fault::Reset, Fault::Truncate, Fault::Short] {
        server.faults.reset();
        server.faults.inject("GetObject", fault, 2);
        assert_eq!(source.read("shard-001.tar").unwrap(), b"small", "{fault:?}");
        assert_eq!(server.faults.count("GetObject"), 3, "{fault:?}");
    }
}

#[test]
fn throttled_and_failing_listings_are_retried() {
    let (_root, server, _data, source) = setup();
    server.faults.inject("ListObjectsV2", Fault::SlowDown, 2);
    server.faults.inject("ListObjectsV2", Fault::Reset, 1);
    server.faults.inject("ListObjectsV2", Fault::Internal, 1);
    let names: Vec<String> = source.list().unwrap().into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["shard-000.tar", "shard-001.tar"]);
    assert_eq!(server.faults.count("ListObjectsV2"), 5);
}

#[test]
fn permanent_throttling_ends_in_a_clear_error_within_the_budget() {
    let (_root, server, _data, source) = setup();
    source.list().unwrap();
    server.faults.inject("GetObject", Fault::SlowDown, usize::MAX);
    let started = Instant::now();
    let err = source.read("shard-000.tar").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30));
    let Error::RetriesExhausted { attempts, ref last, ref op, .. } = err else { panic!("{err:?}") };
    assert_eq!((attempts, op.as_str()), (6, "GetObject"));
    assert!(last.contains("503") && last.contains("SlowDown"), "{last}");
    let text = err.to_string();
    assert!(text.contains("s3://bkt/ds/shard-000.tar") && text.contains("6 attempts"), "{text}");
}

#[test]
fn permanent_truncation_ends_in_a_clear_error() {
    let (_root, server, _data, source) = setup();
    source.list().unwrap();
    server.faults.inject("GetObject", Fault::Short, usize::MAX);
    let err = source.read("shard-000.tar").unwrap_err();
    let Error::RetriesExhausted { ref last, .. } = err else { panic!("{err:?}") };
    assert!(last.contains("short body"), "{last}");
}

#[test]
fn an_endless_body_is_cut_off_at_the_expected_size_not_collected() {
    let (_root, server, _data, source) = setup();
    source.list().unwrap();
    // A server (or proxy) that never ends a chunked body must not grow the worker's memory without bound.
    server.faults.inject("GetObject", Fault::Endless, usize::MAX);
    let err = source.read("shard-001.tar").unwrap_err();
    let Error::RetriesExhausted { ref last, .. } = err else { panic!("{err:?}") };
    assert!(last.contains("ran past the 5 bytes expected"), "{last}");
    let err = source.read("shard-000.tar").unwrap_err();
    let Error::RetriesExhausted { ref last, .. } = err else { panic!("{err:?}") };
    // Ranged parts: a whole part, or the 777-byte tail, whichever failed first.
    assert!(
        last.contains(&format!("ran past the {PART} bytes expected"))
            || last.contains("ran past the 777 bytes expected"),
        "{last}"
    );
}

#[test]
fn the_elapsed_budget_stops_retries_before_the_attempt_limit() {
    let root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(root.path());
    server.put("bkt", "ds/a.tar", b"a");
    let mut opts = server.options();
    opts.retry.max_attempts = 1000;
    opts.retry.initial_backoff = Duration::from_millis(50);
    opts.retry.max_backoff = Duration::from_millis(100);
    opts.retry.max_elapsed = Duration::from_millis(600);
    server.faults.inject("ListObjectsV2", Fault::Internal, usize::MAX);
    let started = Instant::now();
    let err = S3::new("s3://bkt/ds", &opts).unwrap().list().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30));
    let Error::RetriesExhausted { attempts, seconds, .. } = err else { panic!("{err:?}") };
    assert!(attempts < 1000 && seconds <= 0.6 + 5.0, "{attempts} attempts, {seconds} s");
}

#[test]
fn a_stalled_body_times_out_and_the_retry_reads_exact_bytes() {
    let root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(root.path());
    let data = pseudo_random(3 * PART as usize, 4);
    server.put("bkt", "ds/a.tar", &data);
    let opts = S3Options { part_size: PART, request_timeout: Duration::from_millis(500), ..server.options() };
    let source = S3::new("s3://bkt/ds", &opts).unwrap();
    source.list().unwrap();
    server.faults.inject("GetObject", Fault::Stall, 2);
    let started = Instant::now();
    assert_eq!(source.read("a.tar").unwrap(), data);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(server.faults.count("GetObject"), 3 + 2);
    server.faults.inject("GetObject", Fault::Stall, usize::MAX);
    let err = source.read("a.tar").unwrap_err();
    let Error::RetriesExhausted { ref last, .. } = err else { panic!("{err:?}") };
    assert!(last.contains("no complete answer within 0.5 s"), "{last}");
}

#[test]
fn shards_being_fetched_count_in_the_loaders_read_ahead_budget() {
    let root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(root.path());
    let shards = common::numbered_dataset(12, 4);
    let mut sizes = Vec::new();
    for object in shards.list().unwrap() {
        server.put("bkt", &format!("ds/{}", object.name), &shards.read(&object.name).unwrap());
        sizes.push(object.size);
    }
    let shard = sizes[0];
    assert!(sizes.iter().all(|&s| s == shard), "{sizes:?}");
    let source: SharedSource = Arc::new(S3::new("s3://bkt/ds", &server.options()).unwrap());
    let dataset = Arc::new(Dataset::open(source, &OpenOptions::default()).unwrap());
    let config = LoaderConfig {
        batch_size: 4,
        workers: 1,
        prefetch_bytes: 2 * shard,
        sampler: SamplerConfig { seed: 5, ..SamplerConfig::default() },
        ..LoaderConfig::default()
    };
    let loader = Loader::new(dataset, config).unwrap();
    server.faults.reset();
    server.faults.inject("GetObject", Fault::Hold, usize::MAX);
    let epoch = loader.epoch(0).unwrap();
    // Nothing is answered yet: the loader starts the reads its budget allows, two shards, and waits for them.
    let started = server.faults.wait_for("GetObject", 2, Duration::from_secs(60));
    assert!(started >= 2, "the loader started {started} reads");
    // A loader that ignored the budget would start more now; one that keeps to it starts none before an answer,
    // however long this waits.
    server.faults.wait_for("GetObject", 3, Duration::from_secs(2));
    server.faults.open_held();
    let labels: Vec<i64> = epoch.flat_map(|b| b.unwrap().targets).collect();
    assert_eq!(labels.len(), 48);
    let most = server.faults.most_outstanding("GetObject");
    assert!(
        most <= 2,
        "{most} shards of {shard} bytes were being fetched at once with a read-ahead budget of {} bytes",
        2 * shard
    );
}

#[test]
fn an_object_whose_size_changed_since_the_listing_fails_at_once_naming_both_sizes() {
    let large = 4 * PART as usize + 777;
    // (object, size listed, size now, GETs at most: one per part, none repeated)
    for (name, listed, now, gets) in [
        ("shard-001.tar", 5, 3, 1),
        ("shard-001.tar", 5, 9, 1),
        ("shard-000.tar", large, large + 100, 5),
        ("shard-000.tar", large, large - 100, 5),
        ("shard-000.tar", large, PART as usize, 5),
    ] {
        let (_root, server, _data, source) = setup();
        source.list().unwrap();
        server.put("bkt", &format!("ds/{name}"), &pseudo_random(now, 3));
        server.faults.reset();
        let err = source.read(name).unwrap_err();
        let text = err.to_string();
        assert!(!matches!(err, Error::RetriesExhausted { .. }), "retried: {text}");
        assert!(
            text.contains(&format!("s3://bkt/ds/{name}"))
                && text.contains(&format!("{listed} bytes"))
                && text.contains(&format!("{now} bytes")),
            "{text}"
        );
        let seen = server.faults.count("GetObject");
        assert!(seen <= gets, "{seen} GETs of {name} ({listed} -> {now} bytes)");
    }
}

#[test]
fn a_range_past_the_end_of_a_shrunk_object_fails_at_once_naming_both_sizes() {
    let (_root, server, _data, source) = setup();
    let listed = source.list().unwrap()[0].size;
    server.put("bkt", "ds/shard-000.tar", &pseudo_random(PART as usize, 3));
    server.faults.reset();
    // S3 refuses a range that starts past the object's end (416) without the object's size: a HEAD finds it.
    let err = source.read_range("shard-000.tar", 3 * PART, 100).unwrap_err();
    let Error::ObjectChanged { ref location, listed: said, now } = err else { panic!("{err:?}") };
    assert_eq!((location.as_str(), said, now), ("s3://bkt/ds/shard-000.tar", listed, Some(PART)));
    assert_eq!(server.faults.count("GetObject"), 1, "{err}");
}

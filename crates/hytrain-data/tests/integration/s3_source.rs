//! The S3 source against a real S3 protocol server (s3s-fs) on a loopback port, with SigV4 signing checked.

use crate::support;

use std::time::{Duration, Instant};

use hytrain_data::source::{Dir, S3Credentials, S3Options, Source, S3};
use hytrain_data::Error;
use support::{pseudo_random, LocalS3};

fn server() -> (tempfile::TempDir, LocalS3) {
    let root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(root.path());
    (root, server)
}

#[test]
fn listing_pages_through_every_key_in_sorted_order() {
    let (_root, server) = server();
    let mut expected = Vec::new();
    for i in (0..230).rev() {
        let key = format!("shards/part-{:02}/shard-{i:05}.tar", i % 7);
        server.put("data", &key, &pseudo_random(i % 50, i as u64));
        expected.push((key.trim_start_matches("shards/").to_owned(), (i % 50) as u64));
    }
    server.put("data", "other/not-listed.tar", b"x");
    expected.sort();
    let opts = S3Options { list_page_size: Some(40), ..server.options() };
    let source = S3::new("s3://data/shards", &opts).unwrap();
    let objects = source.list().unwrap();
    let got: Vec<(String, u64)> = objects.into_iter().map(|o| (o.name, o.size)).collect();
    assert_eq!(got, expected);
    // 230 keys at 40 per page: 6 pages, each one request.
    assert_eq!(server.faults.count("ListObjectsV2"), 6);
}

#[test]
fn small_empty_and_multi_part_objects_read_byte_identical() {
    let (_root, server) = server();
    let large = pseudo_random(5 * 65536 + 123, 1);
    let small = pseudo_random(1000, 2);
    server.put("bkt", "ds/large.bin", &large);
    server.put("bkt", "ds/small.bin", &small);
    server.put("bkt", "ds/empty.bin", b"");
    let opts = S3Options { part_size: 65536, max_in_flight: 3, ..server.options() };
    let source = S3::new("s3://bkt/ds/", &opts).unwrap();
    let names: Vec<String> = source.list().unwrap().into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["empty.bin", "large.bin", "small.bin"]);
    let before = server.faults.count("GetObject");
    assert_eq!(source.read("large.bin").unwrap(), large);
    // Six parts of 64 KiB (the last one short), each a ranged GET.
    assert_eq!(server.faults.count("GetObject") - before, 6);
    assert_eq!(source.read("small.bin").unwrap(), small);
    assert_eq!(source.read("empty.bin").unwrap(), b"");
    assert_eq!(source.read_range("large.bin", 65530, 70000).unwrap(), &large[65530..135530]);
    assert_eq!(source.read_range("large.bin", large.len() as u64 - 3, 100).unwrap(), &large[large.len() - 3..]);
}

#[test]
fn read_without_listing_first_finds_the_size_itself() {
    let (_root, server) = server();
    let large = pseudo_random(200_000, 3);
    server.put("bkt", "x/y/large.bin", &large);
    let opts = S3Options { part_size: 65536, ..server.options() };
    let source = S3::new("s3://bkt/x", &opts).unwrap();
    assert_eq!(source.read("y/large.bin").unwrap(), large);
    let err = source.read("y/missing.bin").unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("s3://bkt/x") && text.contains("y/missing.bin") && text.contains("no such object"), "{text}");
}

#[test]
fn read_many_yields_every_object_in_the_order_asked() {
    let (_root, server) = server();
    let mut names = Vec::new();
    for i in 0..25 {
        let name = format!("s-{i:03}.tar");
        server.put("bkt", &format!("p/{name}"), &pseudo_random(10_000 + i * 997, i as u64));
        names.push(name);
    }
    names.reverse();
    let opts = S3Options { prefetch: 4, part_size: 8192, ..server.options() };
    let source = S3::new("s3://bkt/p/", &opts).unwrap();
    let got: Vec<(String, Vec<u8>)> = source.read_many(names.clone()).collect::<Result<_, _>>().unwrap();
    assert_eq!(got.len(), names.len());
    for ((name, bytes), asked) in got.iter().zip(&names) {
        assert_eq!(name, asked);
        let i: u64 = name[2..5].parse().unwrap();
        assert_eq!(bytes, &pseudo_random(10_000 + i as usize * 997, i));
    }
    // Dropping a half-consumed prefetch leaves the source usable.
    let mut partial = source.read_many(names.clone());
    assert!(partial.next().unwrap().is_ok());
    drop(partial);
    assert_eq!(source.read("s-000.tar").unwrap(), pseudo_random(10_000, 0));
}

#[test]
fn the_same_tree_lists_and_reads_the_same_from_s3_and_a_folder() {
    let (root, server) = server();
    for (i, key) in
        ["cifar/train/shard-000.tar", "cifar/train/shard-001.tar", "cifar/test/shard-000.tar", "cifar/a-b.tar"]
            .iter()
            .enumerate()
    {
        server.put("dsets", key, &pseudo_random(3000 * (i + 1), i as u64));
    }
    let dir = Dir::new(root.path().join("dsets/cifar")).unwrap();
    let s3 = S3::new("s3://dsets/cifar", &server.options()).unwrap();
    let (from_dir, from_s3) = (dir.list().unwrap(), s3.list().unwrap());
    assert_eq!(from_dir, from_s3);
    for object in &from_dir {
        assert_eq!(dir.read(&object.name).unwrap(), s3.read(&object.name).unwrap(), "{}", object.name);
    }
}

#[test]
fn a_prefix_naming_one_object_is_a_source_of_that_object() {
    let (_root, server) = server();
    server.put("bkt", "data/train.tar", b"tar bytes");
    let source = S3::new("s3://bkt/data/train.tar", &server.options()).unwrap();
    let objects = source.list().unwrap();
    assert_eq!(objects.len(), 1);
    assert_eq!((objects[0].name.as_str(), objects[0].size), ("train.tar", 9));
    assert_eq!(source.read("train.tar").unwrap(), b"tar bytes");
}

#[test]
fn missing_bucket_is_a_clear_error_naming_the_bucket() {
    let (_root, server) = server();
    let err = S3::new("s3://no-such-bucket/cifar", &server.options()).unwrap().list().unwrap_err();
    assert!(matches!(err, Error::NoSuchBucket { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("s3://no-such-bucket") && text.contains("does not exist"), "{text}");
}

#[test]
fn empty_or_missing_prefix_is_an_empty_source_naming_the_prefix() {
    let (_root, server) = server();
    server.put("bkt", "data/x.tar", b"x");
    for url in ["s3://bkt/nothing-here/", "s3://bkt/dat"] {
        let err = S3::new(url, &server.options()).unwrap().list().unwrap_err();
        assert!(matches!(err, Error::Empty(_)), "{url}: {err:?}");
        let text = err.to_string();
        assert!(text.contains(url) && text.contains("the source is empty"), "{text}");
    }
}

#[test]
fn wrong_secret_key_is_access_denied_naming_the_prefix_and_the_iam_role() {
    let (_root, server) = server();
    server.put("bkt", "data/x.tar", b"x");
    let mut opts = server.options();
    opts.credentials = Some(S3Credentials {
        access_key_id: support::ACCESS_KEY.into(),
        secret_access_key: "not-the-secret".into(),
        session_token: None,
    });
    let source = S3::new("s3://bkt/data", &opts).unwrap();
    let started = Instant::now();
    let err = source.list().unwrap_err();
    assert!(matches!(err, Error::AccessDenied { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("s3://bkt/data") && text.contains("IAM role") && text.contains("SignatureDoesNotMatch"),
        "{text}"
    );
    assert!(!text.contains("not-the-secret"), "{text}");
    // Access denied is final: no retries.
    assert_eq!(server.faults.count("ListObjectsV2"), 1);
    assert!(started.elapsed() < Duration::from_secs(30));
    let err = source.read("x.tar").unwrap_err();
    assert!(matches!(err, Error::AccessDenied { .. }), "{err:?}");
}

#[test]
fn unknown_access_key_is_access_denied() {
    let (_root, server) = server();
    server.put("bkt", "data/x.tar", b"x");
    let mut opts = server.options();
    opts.credentials =
        Some(S3Credentials { access_key_id: "AKIDUNKNOWN".into(), secret_access_key: "s".into(), session_token: None });
    let err = S3::new("s3://bkt/data", &opts).unwrap().list().unwrap_err();
    assert!(matches!(err, Error::AccessDenied { .. }), "{err:?}");
}

#[test]
fn unreachable_endpoint_ends_in_a_clear_error_within_the_retry_budget() {
    // A port nothing listens on: bind, note the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (_root, server) = server();
    let mut opts = server.options();
    opts.endpoint = Some(format!("http://127.0.0.1:{port}"));
    opts.retry.max_attempts = 3;
    let started = Instant::now();
    let err = S3::new("s3://bkt/data", &opts).unwrap().list().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30));
    let Error::RetriesExhausted { attempts, ref last, .. } = err else { panic!("{err:?}") };
    assert_eq!(attempts, 3);
    assert!(last.contains(&format!("127.0.0.1:{port}")), "{last}");
    assert!(err.to_string().contains("s3://bkt/data"), "{err}");
}

#[test]
fn called_from_inside_another_tokio_runtime_it_does_not_panic() {
    let (_root, server) = server();
    server.put("bkt", "d/x.tar", b"abc");
    let source = S3::new("s3://bkt/d", &server.options()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let bytes = runtime.block_on(async move {
        let bytes = source.read("x.tar").unwrap();
        drop(source);
        bytes
    });
    assert_eq!(bytes, b"abc");
}

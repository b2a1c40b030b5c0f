//! Uploads, deletes and listings below an S3 prefix (what checkpoints and models sent to S3 use), against a real
//! S3 server (s3s-fs) with faults injected in front of it: objects must arrive byte-exact or not at all, failed
//! multipart uploads must be aborted, and an object being replaced must stay whole until its successor is.

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use hytrain_data::source::{S3Options, S3};
use hytrain_data::Error;
use support::{pseudo_random, Fault, LocalS3};

/// S3's smallest part but the last.
const PART: u64 = 5 << 20;

fn setup() -> (tempfile::TempDir, LocalS3, S3) {
    let root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(root.path());
    std::fs::create_dir_all(root.path().join("bkt")).unwrap();
    let opts = S3Options { part_size: PART, max_in_flight: 4, ..server.options() };
    let s3 = S3::new("s3://bkt/ckpt", &opts).unwrap();
    (root, server, s3)
}

/// Three parts, the last short.
fn three_parts() -> Bytes {
    Bytes::from(pseudo_random(2 * PART as usize + 12_345, 4))
}

fn stored(server: &LocalS3, name: &str) -> Option<Vec<u8>> {
    std::fs::read(server.root.join("bkt/ckpt").join(name)).ok()
}

#[test]
fn small_and_multipart_objects_arrive_byte_exact_with_parts_in_parallel() {
    let (_root, server, s3) = setup();
    s3.put("ckpt-1/meta.json", Bytes::from_static(b"{\"step\": 1}")).unwrap();
    assert_eq!(server.faults.count("PutObject"), 1);
    assert_eq!(server.faults.count("CreateMultipartUpload"), 0);

    // Every part is held unanswered until three have arrived: the upload sends them at once.
    let data = three_parts();
    server.faults.inject("UploadPart", Fault::Hold, usize::MAX);
    std::thread::scope(|scope| {
        let upload = scope.spawn(|| s3.put("ckpt-1/model.safetensors", data.clone()));
        let arrived = server.faults.wait_for("UploadPart", 3, Duration::from_secs(30));
        server.faults.open_held();
        assert_eq!(arrived, 3, "the parts were not sent in parallel");
        upload.join().unwrap().unwrap();
    });
    assert_eq!(stored(&server, "ckpt-1/model.safetensors").unwrap(), data);
    assert_eq!(server.faults.count("UploadPart"), 3);
    assert_eq!(server.faults.count("CompleteMultipartUpload"), 1);
    assert!(server.incomplete_uploads().is_empty());

    let names: Vec<(String, u64)> = s3.list_all().unwrap().into_iter().map(|o| (o.name, o.size)).collect();
    assert_eq!(
        names,
        [("ckpt-1/meta.json".to_owned(), 11), ("ckpt-1/model.safetensors".to_owned(), data.len() as u64)]
    );
}

#[test]
fn transient_faults_while_uploading_are_retried_and_bytes_stay_exact() {
    let (_root, server, s3) = setup();
    let data = three_parts();
    for fault in [Fault::SlowDown, Fault::Internal, Fault::Reset, Fault::Corrupt] {
        server.faults.reset();
        server.faults.inject("UploadPart", fault, 2);
        server.faults.inject("CreateMultipartUpload", Fault::SlowDown, 1);
        server.faults.inject("CompleteMultipartUpload", Fault::Reset, 1);
        s3.put("model.safetensors", data.clone()).unwrap();
        assert_eq!(stored(&server, "model.safetensors").unwrap(), data, "{fault:?}");
        assert_eq!(server.faults.count("UploadPart"), 3 + 2, "{fault:?}");
        assert_eq!(server.faults.count("CompleteMultipartUpload"), 2);
        assert!(server.incomplete_uploads().is_empty(), "{fault:?}");
    }
    server.faults.reset();
    server.faults.inject("PutObject", Fault::Reset, 1);
    server.faults.inject("PutObject", Fault::SlowDown, 1);
    s3.put("meta.json", Bytes::from_static(b"{}")).unwrap();
    assert_eq!(server.faults.count("PutObject"), 3);
    assert_eq!(stored(&server, "meta.json").unwrap(), b"{}");
}

#[test]
fn a_completion_whose_answer_was_lost_is_not_mistaken_for_a_failure() {
    let (_root, server, s3) = setup();
    let data = three_parts();
    // The server completes the upload, but the answer breaks off: the retry finds the upload gone.
    server.faults.inject("CompleteMultipartUpload", Fault::Truncate, 1);
    s3.put("model.safetensors", data.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.faults.count("CompleteMultipartUpload"), 2);
    assert_eq!(stored(&server, "model.safetensors").unwrap(), data);
}

#[test]
fn a_retried_completion_that_finds_no_upload_and_no_object_of_it_fails() {
    let (_root, server, s3) = setup();
    // The first completion never reaches the server; the retry hears the upload is unknown, yet no object of
    // these parts is there.
    server.faults.inject("CompleteMultipartUpload", Fault::Reset, 1);
    server.faults.inject("CompleteMultipartUpload", Fault::NoSuchUpload, 1);
    let err = s3.put("model.safetensors", three_parts()).unwrap_err();
    assert!(err.to_string().contains("NoSuchUpload") && err.to_string().contains("not this upload's"), "{err}");
    assert!(stored(&server, "model.safetensors").is_none());
    assert!(server.incomplete_uploads().is_empty());
}

#[test]
fn a_failed_upload_is_aborted_and_leaves_the_previous_object_whole() {
    let (_root, server, s3) = setup();
    let old = three_parts();
    s3.put("model.safetensors", old.clone()).unwrap();
    server.faults.inject("UploadPart", Fault::SlowDown, usize::MAX);
    let err = s3.put("model.safetensors", Bytes::from(pseudo_random(3 * PART as usize, 5))).unwrap_err();
    let Error::RetriesExhausted { ref op, .. } = err else { panic!("{err:?}") };
    assert_eq!(op, "UploadPart");
    assert!(err.to_string().contains("SlowDown"), "{err}");
    assert!(server.faults.count("AbortMultipartUpload") >= 1);
    assert!(server.incomplete_uploads().is_empty(), "an upload was left: {:?}", server.incomplete_uploads());
    assert_eq!(stored(&server, "model.safetensors").unwrap(), old);
}

#[test]
fn a_refused_upload_fails_at_once_with_what_s3_said() {
    let (_root, server, s3) = setup();
    let mut opts = S3Options { part_size: PART, ..server.options() };
    if let Some(c) = opts.credentials.as_mut() {
        c.secret_access_key = "not-the-secret".into();
    }
    let refused = S3::new("s3://bkt/ckpt", &opts).unwrap();
    let err = refused.put("meta.json", Bytes::from_static(b"{}")).unwrap_err();
    assert!(matches!(err, Error::AccessDenied { ref code, .. } if code == "SignatureDoesNotMatch"), "{err:?}");
    assert_eq!(server.faults.count("PutObject"), 1, "a refusal was retried");
    let err = s3.put("../escape", Bytes::new()).unwrap_err();
    assert!(err.to_string().contains("not an object name"), "{err}");
    assert!(stored(&server, "meta.json").is_none());
}

#[test]
fn listing_an_empty_prefix_gives_nothing_and_deletes_remove_what_they_name() {
    let (_root, server, s3) = setup();
    assert!(s3.list_all().unwrap().is_empty());
    for name in ["ckpt-1/a", "ckpt-1/b", "ckpt-2/a"] {
        s3.put(name, Bytes::from_static(b"x")).unwrap();
    }
    s3.delete(&["ckpt-1/a".into(), "ckpt-1/b".into(), "ckpt-9/never".into()]).unwrap();
    let left: Vec<String> = s3.list_all().unwrap().into_iter().map(|o| o.name).collect();
    assert_eq!(left, ["ckpt-2/a"]);
    assert!(stored(&server, "ckpt-1/a").is_none());

    server.faults.reset();
    server.faults.inject("DeleteObjects", Fault::SlowDown, 2);
    s3.delete(&["ckpt-2/a".into()]).unwrap();
    assert_eq!(server.faults.count("DeleteObjects"), 3);
    assert!(s3.list_all().unwrap().is_empty());
}

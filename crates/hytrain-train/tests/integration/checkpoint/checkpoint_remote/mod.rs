//! Checkpoints on S3 (a real S3 server, s3s-fs, with faults injected in front of it) and written in the
//! background: only complete checkpoints whose files match their manifest are resumed from, faults while uploading
//! are retried or leave the previous checkpoint in charge, and a background write holds the step loop only for
//! its host copy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hytrain_data::source::S3Options;
use hytrain_train::{model, AsyncCheckpointer, CheckpointStore, TrainError};
use tch::{Device, Kind, Tensor};

use super::support::{Fault, LocalS3};
use super::{by_name, checkpoint_of, meta, trained};
use crate::common::{deep_copy, identical};

const URL: &str = "s3://bkt/run/ckpt";

fn server() -> (tempfile::TempDir, LocalS3) {
    let root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(root.path());
    std::fs::create_dir_all(root.path().join("bkt")).unwrap();
    (root, server)
}

fn options(server: &LocalS3) -> S3Options {
    // Parts of S3's minimum size, so the optimizer file of the test model still goes up in one request, while
    // `big_state` needs several parts.
    S3Options { part_size: 5 << 20, ..server.options() }
}

/// The objects below the checkpoint prefix, as the server stores them.
fn objects(server: &LocalS3) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, base, out);
            } else {
                let name = path.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                if !name.ends_with(".json") || !name.contains("/.") {
                    out.push(name);
                }
            }
        }
    }
    let base = server.root.join("bkt/run/ckpt");
    let mut out = Vec::new();
    walk(&base, &base, &mut out);
    out.retain(|n| !n.split('/').any(|part| part.starts_with('.')));
    out.sort();
    out
}

fn steps_of(names: &[String]) -> Vec<String> {
    let mut steps: Vec<String> = names.iter().map(|n| n.split('/').next().unwrap().to_owned()).collect();
    steps.dedup();
    steps
}

#[test]
fn checkpoints_round_trip_through_s3_and_only_the_newest_kept_remain() {
    let (_root, server) = server();
    let store = CheckpointStore::s3(URL, &options(&server), 2).unwrap();
    assert!(store.latest_valid().unwrap().is_none(), "an empty prefix has no checkpoint");
    let (ddp, opt) = trained(2);
    for step in [1, 2, 3] {
        let path = store.save(&checkpoint_of(&ddp, opt.as_ref(), step)).unwrap();
        assert_eq!(path, PathBuf::from(format!("{URL}/ckpt-{step}")));
    }
    let names = objects(&server);
    assert_eq!(steps_of(&names), ["ckpt-2", "ckpt-3"], "{names:?}");
    assert_eq!(names.len(), 6, "a manifest and two tensor files each: {names:?}");
    assert!(names.contains(&"ckpt-3/meta.json".to_owned()));

    let resume = store.latest_valid().unwrap().expect("a checkpoint");
    assert_eq!(resume.path, PathBuf::from(format!("{URL}/ckpt-3")));
    assert_eq!(resume.checkpoint.meta, meta(3));
    assert!(identical(&by_name(deep_copy(&resume.checkpoint.model)), &by_name(model::state_tensors(ddp.model()))));
    assert!(identical(&by_name(deep_copy(&resume.checkpoint.optimizer)), &by_name(opt.state())));
}

#[test]
fn a_step_saved_again_replaces_its_checkpoint_whole_and_leaves_no_old_files() {
    let (_root, server) = server();
    let store = CheckpointStore::s3(URL, &options(&server), 1).unwrap();
    let (ddp, opt) = trained(1);
    store.save(&checkpoint_of(&ddp, opt.as_ref(), 4)).unwrap();
    let (ddp2, opt2) = trained(3);
    store.save(&checkpoint_of(&ddp2, opt2.as_ref(), 4)).unwrap();
    assert_eq!(objects(&server).len(), 3, "{:?}", objects(&server));
    let resume = store.latest_valid().unwrap().unwrap();
    assert!(identical(&by_name(deep_copy(&resume.checkpoint.model)), &by_name(model::state_tensors(ddp2.model()))));
}

#[test]
fn uploads_interrupted_by_faults_are_retried_and_the_checkpoint_is_exact() {
    let (_root, server) = server();
    let store = CheckpointStore::s3(URL, &options(&server), 2).unwrap();
    let (ddp, opt) = trained(2);
    server.faults.inject("PutObject", Fault::SlowDown, 2);
    server.faults.inject("PutObject", Fault::Reset, 1);
    server.faults.inject("PutObject", Fault::ExpiredToken, 1);
    server.faults.inject("PutObject", Fault::Corrupt, 1);
    store.save(&checkpoint_of(&ddp, opt.as_ref(), 7)).unwrap();
    assert_eq!(server.faults.count("PutObject"), 3 + 5, "three objects, five faulted attempts");
    let resume = store.latest_valid().unwrap().unwrap();
    assert_eq!(resume.checkpoint.meta.step, 7);
    assert!(identical(&by_name(deep_copy(&resume.checkpoint.model)), &by_name(model::state_tensors(ddp.model()))));
}

#[test]
fn a_failed_upload_leaves_the_previous_checkpoint_in_charge_and_no_upload_behind() {
    let (_root, server) = server();
    let store = CheckpointStore::s3(URL, &options(&server), 1).unwrap();
    let (ddp, opt) = trained(1);
    store.save(&checkpoint_of(&ddp, opt.as_ref(), 1)).unwrap();
    // A state large enough for a multipart upload, whose parts S3 keeps refusing.
    let big = big_state();
    server.faults.inject("UploadPart", Fault::SlowDown, usize::MAX);
    let err = store.save(&big).unwrap_err();
    assert!(matches!(err, TrainError::Storage { .. }), "{err:?}");
    assert!(err.to_string().contains("uploading checkpoint step 2"), "{err}");
    assert!(server.incomplete_uploads().is_empty(), "{:?}", server.incomplete_uploads());
    server.faults.reset();
    let resume = store.latest_valid().unwrap().unwrap();
    assert_eq!(resume.checkpoint.meta.step, 1);
    assert!(resume.skipped.is_empty(), "a checkpoint without its manifest does not exist");
}

/// A checkpoint of step 2 with 12 MiB of model state: three upload parts.
fn big_state() -> hytrain_train::Checkpoint {
    hytrain_train::Checkpoint {
        model: vec![("w".into(), Tensor::arange(3 << 20, (Kind::Float, Device::Cpu)))],
        optimizer: vec![],
        meta: meta(2),
    }
}

#[test]
fn a_corrupt_or_torn_newest_checkpoint_is_skipped_for_the_one_before() {
    let (_root, server) = server();
    let store = CheckpointStore::s3(URL, &options(&server), 3).unwrap();
    let (ddp, opt) = trained(1);
    for step in [1, 2, 3] {
        store.save(&checkpoint_of(&ddp, opt.as_ref(), step)).unwrap();
    }
    let model_of = |step: u64| {
        let name = objects(&server)
            .into_iter()
            .find(|n| n.starts_with(&format!("ckpt-{step}/")) && n.ends_with("/model.safetensors"))
            .unwrap();
        format!("run/ckpt/{name}")
    };
    // Step 3's model file damaged in S3; step 2's cut short.
    server.damage("bkt", &model_of(3), |bytes| {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
    });
    server.damage("bkt", &model_of(2), |bytes| bytes.truncate(bytes.len() - 10));

    let resume = store.latest_valid().unwrap().unwrap();
    assert_eq!(resume.checkpoint.meta.step, 1);
    let reasons: Vec<&str> = resume.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert!(reasons[0].contains("SHA-256"), "{reasons:?}");
    assert!(reasons[1].contains("bytes") && reasons[1].contains("torn"), "{reasons:?}");
}

#[test]
fn leftovers_of_a_write_killed_before_its_manifest_are_ignored_then_removed() {
    let (_root, server) = server();
    let store = CheckpointStore::s3(URL, &options(&server), 1).unwrap();
    let (ddp, opt) = trained(1);
    store.save(&checkpoint_of(&ddp, opt.as_ref(), 1)).unwrap();
    // What a kill between the tensor files and the manifest leaves.
    server.put("bkt", "run/ckpt/ckpt-9/0-1/model.safetensors", b"half a checkpoint");
    let resume = store.latest_valid().unwrap().unwrap();
    assert_eq!((resume.checkpoint.meta.step, resume.skipped.len()), (1, 0));
    store.save(&checkpoint_of(&ddp, opt.as_ref(), 2)).unwrap();
    assert_eq!(steps_of(&objects(&server)), ["ckpt-2"]);
}

#[test]
fn s3_that_cannot_be_read_is_an_error_not_a_reason_to_take_an_older_checkpoint() {
    let (_root, server) = server();
    let opts = S3Options {
        retry: hytrain_data::source::S3RetryPolicy { max_attempts: 2, ..options(&server).retry },
        ..options(&server)
    };
    let store = CheckpointStore::s3(URL, &opts, 2).unwrap();
    let (ddp, opt) = trained(1);
    for step in [1, 2] {
        store.save(&checkpoint_of(&ddp, opt.as_ref(), step)).unwrap();
    }
    server.faults.inject("GetObject", Fault::Internal, usize::MAX);
    let err = store.latest_valid().unwrap_err();
    assert!(matches!(err, TrainError::Storage { .. }), "{err:?}");
    assert!(err.to_string().contains("ckpt-2/meta.json"), "{err}");
}

#[test]
fn a_checkpoint_folder_copied_to_s3_resumes_as_it_is() {
    let (_root, server) = server();
    let dir = tempfile::tempdir().unwrap();
    let (ddp, opt) = trained(1);
    CheckpointStore::new(dir.path(), 1).unwrap().save(&checkpoint_of(&ddp, opt.as_ref(), 5)).unwrap();
    for file in ["meta.json", "model.safetensors", "optimizer.safetensors"] {
        let bytes = std::fs::read(dir.path().join("ckpt-5").join(file)).unwrap();
        server.put("bkt", &format!("run/ckpt/ckpt-5/{file}"), &bytes);
    }
    let resume = CheckpointStore::s3(URL, &options(&server), 1).unwrap().latest_valid().unwrap().unwrap();
    assert_eq!(resume.checkpoint.meta.step, 5);
    assert!(identical(&by_name(deep_copy(&resume.checkpoint.model)), &by_name(model::state_tensors(ddp.model()))));
}

#[test]
fn a_background_write_keeps_the_state_of_its_step_while_training_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = AsyncCheckpointer::new(CheckpointStore::new(dir.path(), 2).unwrap());
    let (ddp, opt) = trained(1);
    let ckpt = checkpoint_of(&ddp, opt.as_ref(), 1);
    let before = deep_copy(&ckpt.model);
    writer.save(&ckpt).unwrap();
    // Training goes on at once and changes the weights in place.
    tch::no_grad(|| {
        for (_, t) in &ckpt.model {
            let _ = t.shallow_clone().fill_(7.0);
        }
    });
    let path = writer.finish().unwrap().expect("a checkpoint written");
    assert_eq!(path, dir.path().join("ckpt-1"));
    let read = hytrain_train::checkpoint::read_checkpoint(&path).unwrap();
    assert!(identical(&by_name(deep_copy(&read.model)), &by_name(before)));
}

#[test]
fn consecutive_background_checkpoints_each_hold_their_own_steps_state() {
    // From the second checkpoint on, the host copy fills the buffers of the one before: each must still hold the
    // state of its own step, and the earlier files must stay as written.
    let dir = tempfile::tempdir().unwrap();
    let mut writer = AsyncCheckpointer::new(CheckpointStore::new(dir.path(), 3).unwrap());
    let (ddp, opt) = trained(1);
    let mut expected = Vec::new();
    for step in 1..=3u64 {
        let ckpt = checkpoint_of(&ddp, opt.as_ref(), step);
        tch::no_grad(|| {
            for (_, t) in &ckpt.model {
                let _ = t.shallow_clone().fill_(step as f64);
            }
        });
        expected.push(deep_copy(&ckpt.model));
        writer.save(&ckpt).unwrap();
    }
    writer.finish().unwrap();
    for (step, want) in (1..=3u64).zip(expected) {
        let read = hytrain_train::checkpoint::read_checkpoint(&dir.path().join(format!("ckpt-{step}"))).unwrap();
        assert!(identical(&by_name(deep_copy(&read.model)), &by_name(want)), "step {step}");
    }
}

#[test]
fn one_background_write_at_a_time_and_the_next_checkpoint_waits_for_it() {
    let (_root, server) = server();
    let mut writer = AsyncCheckpointer::new(CheckpointStore::s3(URL, &options(&server), 3).unwrap());
    let (ddp, opt) = trained(1);
    server.faults.inject("PutObject", Fault::Hold, usize::MAX);
    writer.save(&checkpoint_of(&ddp, opt.as_ref(), 1)).unwrap();
    assert_eq!(writer.writing(), Some(1), "save returned while its upload is held");
    assert_eq!(server.faults.wait_for("PutObject", 1, Duration::from_secs(30)), 1);
    let step2 = checkpoint_of(&ddp, opt.as_ref(), 2);
    std::thread::scope(|scope| {
        let writing = &mut writer;
        let second = scope.spawn(move || writing.save(&step2));
        // Step 2's copy waits for step 1's write: no request of step 2 arrives while step 1 is held.
        assert_eq!(server.faults.wait_for("PutObject", 2, Duration::from_millis(500)), 1);
        server.faults.open_held();
        second.join().unwrap().unwrap();
    });
    let last = writer.finish().unwrap().unwrap();
    assert_eq!(last, PathBuf::from(format!("{URL}/ckpt-2")));
    assert_eq!(steps_of(&objects(&server)), ["ckpt-1", "ckpt-2"]);
    assert!(writer.held_secs() > 0.0);
}

#[test]
fn a_background_write_that_fails_is_reported_at_the_next_checkpoint_and_at_the_end() {
    let (_root, server) = server();
    let opts = S3Options {
        retry: hytrain_data::source::S3RetryPolicy { max_attempts: 2, ..options(&server).retry },
        ..options(&server)
    };
    let mut writer = AsyncCheckpointer::new(CheckpointStore::s3(URL, &opts, 3).unwrap());
    let (ddp, opt) = trained(1);
    server.faults.inject("PutObject", Fault::SlowDown, usize::MAX);
    writer.save(&checkpoint_of(&ddp, opt.as_ref(), 1)).unwrap();
    let err = writer.save(&checkpoint_of(&ddp, opt.as_ref(), 2)).unwrap_err();
    assert!(err.to_string().contains("uploading checkpoint step 1"), "{err}");
    assert!(writer.finish().unwrap().is_none(), "nothing was written");

    writer.save(&checkpoint_of(&ddp, opt.as_ref(), 3)).unwrap();
    let err = writer.finish().unwrap_err();
    assert!(err.to_string().contains("step 3") && err.to_string().contains("SlowDown"), "{err}");
}

#[test]
fn a_write_in_flight_is_finished_when_the_writer_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut writer = AsyncCheckpointer::new(CheckpointStore::new(dir.path(), 2).unwrap());
        writer.save(&big_state()).unwrap();
    }
    let read = hytrain_train::checkpoint::read_checkpoint(&dir.path().join("ckpt-2")).unwrap();
    assert_eq!(read.meta.step, 2);
}

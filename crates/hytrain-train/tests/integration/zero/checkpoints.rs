//! Sharded checkpoints: every rank writes its shard, rank 0 the model and the manifest; resumed at the same or
//! another world size or bucket layout, or by an unsharded run, the weights equal DDP's; torn, corrupt or
//! mismatched ones are passed over; on S3 too; and written in the background, the step loop goes on while the
//! shards upload.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Instant;

use super::*;
use crate::support::Fault;
use hytrain_train::ShardedWriter;

fn meta(step: u64) -> CheckpointMeta {
    CheckpointMeta {
        step,
        epoch: 0,
        data_position: serde_json::Value::Null,
        rng: RngState::default(),
        config: serde_json::Value::Null,
        schedule: Schedule::Constant,
        model: "zero-net".into(),
        optimizer: "adamw".into(),
        grad_scaler: None,
    }
}

/// Every rank saves a sharded checkpoint of `step` into `store` (rank 0 with the model).
fn save_sharded(
    store: &CheckpointStore,
    ddp: &mut Ddp,
    optimizer: &dyn Optimizer,
    step: u64,
) -> Result<(), TrainError> {
    let model = (ddp.rank() == 0).then(|| Checkpoint {
        model: model::state_tensors(ddp.model()),
        optimizer: Vec::new(),
        meta: meta(step),
    });
    store.save_sharded(ddp, optimizer, model.as_ref(), step).map(|_| ())
}

const ADAMW: Case = Case {
    opt: OptimizerConfig::AdamW(AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.05 }),
    accum: 1,
    clip: None,
    overlap: true,
};

/// 10 steps on 4 ranks in `shard` mode from the initial weights, with a sharded checkpoint after each of `steps`
/// into `store(rank, step)`: every rank's results of its saves.
fn four_ranks_then_save(
    shard: ShardMode,
    steps: &[u64],
    store: &(dyn Fn(usize, u64) -> CheckpointStore + Sync),
) -> Vec<Vec<Result<(), TrainError>>> {
    let init = Mutex::new(initial());
    on_ranks(4, |rank, comm| {
        let data = data(4, 10);
        let init = deep_copy(&init.lock().unwrap());
        let mut ddp = Ddp::new(net(rank, &init), comm, options(ADAMW, shard)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let mut results = Vec::new();
        for (i, micro) in share(&data, rank, 1).into_iter().enumerate() {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
            let step = i as u64 + 1;
            if steps.contains(&step) {
                results.push(save_sharded(&store(rank, step), &mut ddp, optimizer.as_ref(), step));
            }
        }
        results
    })
}

/// A rank's weights after resuming and training, the checkpoint it resumed from and the shard files it read.
type Resumed = (Vec<(String, Tensor)>, std::path::PathBuf, Vec<String>);

/// Resumes `world` ranks in `shard` mode from the sharded checkpoints of `dir` (a sharded engine through
/// `resume_sharded`, an unsharded one through `latest_valid` as the training loop does) and trains 10 more steps:
/// every rank's weights, the checkpoint it resumed from and the shard files it read.
fn resume_and_train(dir: &std::path::Path, world: usize, shard: ShardMode) -> Vec<Resumed> {
    on_ranks(world, |rank, comm| {
        let data = data(world, 10);
        let mut ddp = Ddp::new(net(rank, &initial()), comm, options(ADAMW, shard)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let store = CheckpointStore::new(dir, 3).unwrap();
        let (path, read) = if shard == ShardMode::None {
            let resume = store.latest_valid().unwrap().expect("a checkpoint");
            model::load_state_tensors(ddp.model(), &resume.checkpoint.model).unwrap();
            ddp.load_optimizer_state(optimizer.as_mut(), &resume.checkpoint.optimizer).unwrap();
            (resume.path, Vec::new())
        } else {
            let resume = store.resume_sharded(&mut ddp, optimizer.as_mut()).unwrap().expect("a checkpoint");
            (resume.path, resume.read)
        };
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        (deep_copy(&model::state_tensors(ddp.model())), path, read)
    })
}

/// DDP's weights (every rank's: the BatchNorm statistics are each rank's own) after 10 steps on 4 ranks, a
/// per-parameter checkpoint, and 10 steps on `world` ranks.
fn ddp_four_then(world: usize) -> Vec<Vec<(String, Tensor)>> {
    let dir = tempfile::tempdir().unwrap();
    let init = Mutex::new(initial());
    on_ranks(4, |rank, comm| {
        let data = data(4, 10);
        let init = deep_copy(&init.lock().unwrap());
        let mut ddp = Ddp::new(net(rank, &init), comm, options(ADAMW, ShardMode::None)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        if rank == 0 {
            let ckpt =
                Checkpoint { model: model::state_tensors(ddp.model()), optimizer: optimizer.state(), meta: meta(10) };
            CheckpointStore::new(dir.path(), 1).unwrap().save(&ckpt).unwrap();
        }
    });
    resume_and_train(dir.path(), world, ShardMode::None).into_iter().map(|r| r.0).collect()
}

fn shard_names(world: usize) -> Vec<String> {
    (0..world).map(|r| shard_file(r, world)).collect()
}

/// Issue 17's resharding test: a ZeRO-2 run on 4 ranks writes one optimizer shard per rank (no rank holds the
/// whole state); resumed on 4, 2 and 3 ranks (ZeRO-1 and ZeRO-2) and by an unsharded run, the weights after 10
/// more steps equal those of a DDP run checkpointed and resumed alike within 1e-6. On 4 ranks each rank reads only
/// its own shard; on fewer, only the shards its blocks overlap.
#[test]
fn a_sharded_checkpoint_of_four_ranks_resumes_on_four_two_and_three_as_ddp_does() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Gradients, &[10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap()) {
        r.into_iter().for_each(Result::unwrap);
    }
    let ckpt = dir.path().join("ckpt-10");
    let mut files: Vec<String> =
        std::fs::read_dir(&ckpt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    let mut want = shard_names(4);
    want.extend(["meta.json".to_string(), "model.safetensors".to_string()]);
    want.sort();
    assert_eq!(files, want, "a sharded checkpoint holds the model, the manifest and one shard per rank");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(ckpt.join("meta.json")).unwrap()).unwrap();
    assert_eq!(manifest["sharded"]["world_size"], 4);
    assert_eq!(manifest["sharded"]["mode"], "gradients");
    // ZeRO-2's buckets: every parameter over the 64-byte cap alone; fc2.weight's 21 elements padded to 24.
    assert_eq!(manifest["sharded"]["buckets"][1]["numel"], 21);
    assert_eq!(manifest["sharded"]["buckets"][1]["padded"], 24);
    for f in shard_names(4) {
        assert_eq!(manifest["sizes"][&f].as_u64(), Some(std::fs::metadata(ckpt.join(&f)).unwrap().len()));
        assert_eq!(manifest["files"][&f].as_str().map(str::len), Some(64), "{f} has a SHA-256 in the manifest");
    }
    for (world, shard) in [
        (4, ShardMode::Gradients),
        (2, ShardMode::Gradients),
        (2, ShardMode::Optimizer),
        (3, ShardMode::Gradients),
        (3, ShardMode::None),
    ] {
        let ddp = ddp_four_then(world);
        let ranks = resume_and_train(dir.path(), world, shard);
        for (rank, (weights, path, read)) in ranks.iter().enumerate() {
            assert_eq!(path, &ckpt);
            let d = difference(weights, &ddp[rank]);
            println!("zero resharding: 4 ranks to {world} ({shard}): rank {rank} read {read:?}, max |w - w_ddp| / max |w_ddp| = {d:.3e}");
            assert!(d <= 1e-6, "4 to {world} ranks ({shard}): rank {rank} differs from DDP by {d:e}");
            if shard == ShardMode::None {
                continue;
            }
            if shard == ShardMode::Optimizer {
                // ZeRO-1 keeps DDP's bucket layout, not ZeRO-2's: the blocks come from the per-parameter state.
                assert_eq!(read.len(), 4, "rank {rank} of {world} ({shard}) read {read:?}");
            } else if world == 4 {
                assert_eq!(read, &[shard_file(rank, 4)], "at the same world size a rank reads only its own shard");
            } else {
                assert!(!read.is_empty() && read.len() < 4, "rank {rank} of {world} read {read:?}");
            }
        }
        assert!(difference(&ranks[0].0, &initial()) > 1e-3, "the resumed run trained");
    }
}

/// A checkpoint with a shard missing, corrupt, or without its manifest does not count: every rank passes over it
/// to the previous complete one, which a failed save never touches.
#[test]
fn a_sharded_checkpoint_with_a_shard_missing_or_corrupt_is_passed_over_for_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Optimizer, &[5, 10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap())
    {
        r.into_iter().for_each(Result::unwrap);
    }
    let (c5, c10) = (dir.path().join("ckpt-5"), dir.path().join("ckpt-10"));
    let shard = c10.join(shard_file(2, 4));
    let good = std::fs::read(&shard).unwrap();
    let mut corrupt = good.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    type Damage<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Damage<'_>, Damage<'_>)> = vec![
        (
            "corrupt or torn",
            Box::new(|| std::fs::write(&shard, &corrupt).unwrap()),
            Box::new(|| std::fs::write(&shard, &good).unwrap()),
        ),
        (
            "is missing",
            Box::new(|| std::fs::remove_file(&shard).unwrap()),
            Box::new(|| std::fs::write(&shard, &good).unwrap()),
        ),
    ];
    for (reason, damage, repair) in cases {
        damage();
        let ranks = on_ranks(4, |rank, comm| {
            let mut ddp = Ddp::new(net(rank, &initial()), comm, options(ADAMW, ShardMode::Optimizer)).unwrap();
            let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
            let store = CheckpointStore::new(dir.path(), 3).unwrap();
            let resume = store.resume_sharded(&mut ddp, optimizer.as_mut()).unwrap().expect("a checkpoint");
            (resume.path, resume.skipped)
        });
        for (rank, (path, skipped)) in ranks.iter().enumerate() {
            assert_eq!(path, &c5, "rank {rank} resumed from the previous complete checkpoint ({reason})");
            if rank == 0 {
                assert_eq!(skipped.len(), 1);
                assert_eq!(skipped[0].path, c10);
            }
        }
        // An unsharded run, reading every shard, passes over it too, naming the shard.
        let resume = CheckpointStore::new(dir.path(), 3).unwrap().latest_valid().unwrap().unwrap();
        assert_eq!(resume.path, c5);
        assert!(
            resume.skipped[0].reason.contains(&shard_file(2, 4)) && resume.skipped[0].reason.contains(reason),
            "{:?}",
            resume.skipped
        );
        repair();
    }
    std::fs::remove_file(c10.join("meta.json")).unwrap();
    assert_eq!(CheckpointStore::new(dir.path(), 3).unwrap().latest_valid().unwrap().unwrap().path, c5);
}

/// One rank that cannot write its shard fails every rank's save; so does a folder the ranks do not share (rank 0
/// finds another rank's shard missing before it writes the manifest). Either way the earlier checkpoint stays
/// the newest, untouched, and nothing of the failed write is left.
#[test]
fn a_rank_failing_to_write_its_shard_fails_every_rank_and_keeps_the_previous_checkpoint() {
    let elsewhere = tempfile::tempdir().unwrap();
    for (unshared, rank0_says, others_say) in [
        (
            false,
            "rank(s) [2] could not write their optimizer shard of step 10",
            "could not write their optimizer shard",
        ),
        (true, "is not in rank 0's view", "rank 0 could not write the model and manifest of step 10"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, b"a file where a folder should be").unwrap();
        let results = four_ranks_then_save(ShardMode::Gradients, &[5, 10], &|rank, step| {
            let at = match (rank, step) {
                (2, 10) if unshared => elsewhere.path().to_path_buf(),
                (2, 10) => blocked.clone(),
                _ => dir.path().to_path_buf(),
            };
            CheckpointStore::new(at, 3).unwrap()
        });
        for (rank, saves) in results.into_iter().enumerate() {
            assert!(saves[0].is_ok(), "step 5 saved");
            let e = saves[1].as_ref().expect_err("step 10 fails on every rank").to_string();
            match (rank, unshared) {
                (2, false) => assert!(e.contains("blocked"), "rank 2 reports its own error: {e}"),
                (0, _) => assert!(e.contains(rank0_says), "{e}"),
                (2, true) => {}
                _ => assert!(e.contains(others_say), "rank {rank}: {e}"),
            }
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("-10")), "nothing of the failed write is left: {names:?}");
        let resume = CheckpointStore::new(dir.path(), 3).unwrap().latest_valid().unwrap().unwrap();
        assert_eq!(resume.path, dir.path().join("ckpt-5"));
        assert!(resume.skipped.is_empty());
    }
}

/// `hytrain checkpoint consolidate`'s library half: a ZeRO-2 checkpoint of 4 ranks becomes one safetensors file
/// holding the model and DDP's per-parameter optimizer state (names, shapes, values of a DDP run's state).
#[test]
fn a_consolidated_sharded_checkpoint_holds_the_model_and_ddps_per_parameter_state() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Gradients, &[10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap()) {
        r.into_iter().for_each(Result::unwrap);
    }
    let init = Mutex::new(initial());
    let ddp_state = on_ranks(4, |rank, comm| {
        let data = data(4, 10);
        let init = deep_copy(&init.lock().unwrap());
        let mut ddp = Ddp::new(net(rank, &init), comm, options(ADAMW, ShardMode::None)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        (deep_copy(&model::state_tensors(ddp.model())), deep_copy(&optimizer.state()))
    })
    .swap_remove(0);
    let out = dir.path().join("consolidated.safetensors");
    let store = CheckpointStore::new(dir.path(), 3).unwrap();
    let done = hytrain_train::consolidate(&store, None, &out).unwrap();
    assert_eq!((done.step, done.from.clone()), (10, dir.path().join("ckpt-10")));
    assert_eq!(done.optimizer, ddp_state.1.len());
    let file = Tensor::read_safetensors(&out).unwrap();
    assert_eq!(file.len(), done.model + done.optimizer);
    let get = |name: &str| file.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    for (name, want) in &ddp_state.1 {
        let got = get(&format!("optimizer.{name}")).unwrap_or_else(|| panic!("optimizer.{name} is in the file"));
        assert_eq!(got.size(), want.size(), "{name}");
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        let d = (&got - want).abs().max().double_value(&[]) / scale;
        assert!(d <= 1e-5, "{name} differs from DDP's by {d:e}");
    }
    let model = hytrain_train::checkpoint::read_checkpoint(&dir.path().join("ckpt-10")).unwrap().model;
    for (name, want) in &model {
        assert!(get(name).unwrap().equal(want), "{name} is the checkpoint's");
    }
    // A named step that is not there says so.
    let e = hytrain_train::consolidate(&store, Some(7), &out).unwrap_err().to_string();
    assert!(e.contains("ckpt-7") && e.contains("meta.json"), "{e}");
}

/// Sharded checkpoints go to S3 (the local S3 server) as to a folder: every rank uploads its shard, rank 0 the
/// model and the manifest last; pruning to the newest one keeps its shards; 2 ranks resume from it as DDP does.
#[test]
fn a_sharded_checkpoint_on_s3_is_written_by_every_rank_and_resumes_on_two_ranks() {
    let root = tempfile::tempdir().unwrap();
    let server = crate::support::LocalS3::start(root.path());
    std::fs::create_dir_all(root.path().join("bkt")).unwrap();
    let url = "s3://bkt/run/ckpt";
    let store = || CheckpointStore::s3(url, &server.options(), 1).unwrap();
    for r in four_ranks_then_save(ShardMode::Optimizer, &[5, 10], &|_, _| store()) {
        r.into_iter().for_each(Result::unwrap);
    }
    // The server keeps objects as files (and may leave emptied folders behind).
    fn files(dir: &std::path::Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.map(Result::unwrap) {
            match e.file_type().unwrap().is_dir() {
                true => out.extend(files(&e.path())),
                false => out.push(e.file_name().to_string_lossy().into_owned()),
            }
        }
        out.sort();
        out
    }
    let prefix = root.path().join("bkt/run/ckpt");
    assert!(
        files(&prefix.join("ckpt-5")).is_empty(),
        "keep 1 pruned step 5 whole: {:?}",
        files(&prefix.join("ckpt-5"))
    );
    let mut want = shard_names(4);
    want.extend(["meta.json".to_string(), "model.safetensors".to_string()]);
    want.sort();
    assert_eq!(files(&prefix.join("ckpt-10")), want);
    let ddp = ddp_four_then(2);
    let ranks = on_ranks(2, |rank, comm| {
        let data = data(2, 10);
        // ZeRO-1 as written, so the bucket layout matches and each rank reads only the shards its blocks overlap.
        let mut ddp = Ddp::new(net(rank, &initial()), comm, options(ADAMW, ShardMode::Optimizer)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let resume = store().resume_sharded(&mut ddp, optimizer.as_mut()).unwrap().expect("a checkpoint on S3");
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        (deep_copy(&model::state_tensors(ddp.model())), resume.path, resume.read)
    });
    for (rank, (weights, path, read)) in ranks.iter().enumerate() {
        assert_eq!(path, std::path::Path::new("s3://bkt/run/ckpt/ckpt-10"));
        assert!(!read.is_empty() && read.len() < 4, "rank {rank} read {read:?}");
        let d = difference(weights, &ddp[rank]);
        assert!(d <= 1e-6, "resumed from S3 on 2 ranks: rank {rank} differs from DDP by {d:e}");
    }
    // An unsharded reader assembles it from S3 too.
    let resume = store().latest_valid().unwrap().unwrap();
    assert!(resume.checkpoint.optimizer.iter().any(|(n, _)| n == "fc1.weight.exp_avg_sq"));
}

/// Another `--bucket-mb` lays the buckets out otherwise than the checkpoint's: every rank then reads all shards
/// and cuts its blocks from the per-parameter state, and continues as DDP does.
#[test]
fn a_sharded_checkpoint_resumes_with_another_bucket_layout_through_the_per_parameter_state() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Gradients, &[10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap()) {
        r.into_iter().for_each(Result::unwrap);
    }
    let ddp = ddp_four_then(2);
    let ranks = on_ranks(2, |rank, comm| {
        let data = data(2, 10);
        // One bucket for the whole model instead of three.
        let options = DdpOptions { bucket_mb: 25.0, first_bucket_mb: 25.0, ..options(ADAMW, ShardMode::Optimizer) };
        let mut ddp = Ddp::new(net(rank, &initial()), comm, options).unwrap();
        assert_eq!(ddp.bucket_layout().len(), 1);
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let resume = CheckpointStore::new(dir.path(), 3)
            .unwrap()
            .resume_sharded(&mut ddp, optimizer.as_mut())
            .unwrap()
            .expect("a checkpoint");
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        (deep_copy(&model::state_tensors(ddp.model())), resume.read)
    });
    for (rank, (weights, read)) in ranks.iter().enumerate() {
        assert_eq!(read, &shard_names(4), "rank {rank} needs every shard");
        let d = difference(weights, &ddp[rank]);
        assert!(d <= 1e-6, "another bucket layout: rank {rank} differs from DDP by {d:e}");
    }
}

/// A sharded checkpoint of another model fails every rank with rank 0's reason (not passed over, not half
/// loaded), naming the tensor that differs.
#[test]
fn a_sharded_checkpoint_of_another_model_fails_every_rank_with_rank_0s_reason() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Gradients, &[10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap()) {
        r.into_iter().for_each(Result::unwrap);
    }
    let errors = on_ranks(2, |_, comm| {
        let other = seeded(5, || model::build("mlp:16", 3, &[3, 8, 8], Device::Cpu).unwrap());
        let mut ddp = Ddp::new(other, comm, options(ADAMW, ShardMode::Optimizer)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let store = CheckpointStore::new(dir.path(), 3).unwrap();
        store.resume_sharded(&mut ddp, optimizer.as_mut()).unwrap_err().to_string()
    });
    assert_eq!(errors[0], errors[1], "every rank reports rank 0's reason");
    let e = &errors[0];
    assert!(e.contains("ckpt-10 holds another model's weights") && e.contains("--no-resume"), "{e}");
}

/// Every rank resumes from `dir` (ZeRO-1 on 4 ranks): each rank's result, as the checkpoint it resumed from and
/// rank 0's skipped reasons, or its error.
fn resume_four(dir: &std::path::Path) -> Vec<Result<(std::path::PathBuf, Vec<String>), String>> {
    on_ranks(4, |rank, comm| {
        let mut ddp = Ddp::new(net(rank, &initial()), comm, options(ADAMW, ShardMode::Optimizer)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let store = CheckpointStore::new(dir, 3).unwrap();
        match store.resume_sharded(&mut ddp, optimizer.as_mut()) {
            Ok(found) => {
                let found = found.expect("a checkpoint");
                Ok((found.path, found.skipped.into_iter().map(|s| s.reason).collect()))
            }
            Err(e) => Err(e.to_string()),
        }
    })
}

/// A manifest that lists no checksum for a shard, and a shard that matches its checksum but lacks a tensor the
/// layout names, make the checkpoint invalid: every rank passes over it to the previous one, saying why.
#[test]
fn a_manifest_or_shard_that_disagrees_with_the_layout_is_passed_over_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Optimizer, &[5, 10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap())
    {
        r.into_iter().for_each(Result::unwrap);
    }
    let c10 = dir.path().join("ckpt-10");
    let manifest_path = c10.join("meta.json");
    let manifest = std::fs::read(&manifest_path).unwrap();
    let shard = c10.join(shard_file(1, 4));
    let good = std::fs::read(&shard).unwrap();

    let mut meta: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    meta["files"].as_object_mut().unwrap().remove(&shard_file(3, 4));
    std::fs::write(&manifest_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    // Rank 0 reads the manifest itself: it passes over the checkpoint before offering it.
    let resumed = resume_four(dir.path());
    let (path, skipped) = resumed[0].clone().unwrap();
    assert_eq!(path, dir.path().join("ckpt-5"));
    assert!(skipped[0].contains("meta.json lists no checksum for optimizer-shard-3-of-4"), "{skipped:?}");

    // Shard 1 without its exp_avg of bucket 0, its checksum and size recorded as they are.
    let tensors: Vec<(String, Tensor)> =
        Tensor::read_safetensors(&shard).unwrap().into_iter().filter(|(n, _)| n != "zero.bucket0.exp_avg").collect();
    Tensor::write_safetensors(&tensors, &shard).unwrap();
    let bytes = std::fs::read(&shard).unwrap();
    let mut meta: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    meta["files"][shard_file(1, 4)] = sha256(&bytes).into();
    meta["sizes"][shard_file(1, 4)] = bytes.len().into();
    std::fs::write(&manifest_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    for (rank, r) in resume_four(dir.path()).into_iter().enumerate() {
        assert_eq!(r.unwrap().0, dir.path().join("ckpt-5"), "rank {rank}");
    }
    let resume = CheckpointStore::new(dir.path(), 3).unwrap().latest_valid().unwrap().unwrap();
    assert!(resume.skipped[0].reason.contains("has no tensor zero.bucket0.exp_avg"), "{:?}", resume.skipped);
    std::fs::write(&shard, good).unwrap();
    std::fs::write(&manifest_path, manifest).unwrap();
    assert_eq!(resume_four(dir.path())[0].clone().unwrap().0, c10, "repaired, it counts again");
}

/// A shard that is there but cannot be read (here a folder in its place; an unreachable S3 alike) is not a torn
/// checkpoint: every rank fails, the rank that could not read saying why, instead of silently taking an older one.
#[test]
fn a_shard_that_cannot_be_read_fails_every_rank_instead_of_passing_over() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Optimizer, &[5, 10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap())
    {
        r.into_iter().for_each(Result::unwrap);
    }
    let shard = dir.path().join("ckpt-10").join(shard_file(2, 4));
    std::fs::remove_file(&shard).unwrap();
    std::fs::create_dir(&shard).unwrap();
    for (rank, r) in resume_four(dir.path()).into_iter().enumerate() {
        let e = r.unwrap_err();
        match rank {
            2 => assert!(e.contains(&shard_file(2, 4)), "rank 2 says what it could not read: {e}"),
            _ => assert!(e.contains("another rank could not read its optimizer shard"), "rank {rank}: {e}"),
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Sorted by name, as a checkpoint file holds them.
fn by_name(mut tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// Written in the background ([`ShardedWriter`], the training loop's): with every upload held at the S3 server,
/// both ranks save step 1 and train three more steps meanwhile, and the checkpoint does not count yet (no
/// manifest). Once the uploads go through, the ranks learn it from the flag they allreduce before each step, and
/// the checkpoint completes holding step 1's weights, not the later ones.
#[test]
fn a_sharded_checkpoint_is_written_in_the_background_while_the_ranks_train_on() {
    let root = tempfile::tempdir().unwrap();
    let server = crate::support::LocalS3::start(root.path());
    std::fs::create_dir_all(root.path().join("bkt")).unwrap();
    let url = "s3://bkt/run/ckpt";
    server.faults.inject("PutObject", Fault::Hold, usize::MAX);
    let trained_on = AtomicUsize::new(0);
    let init = Mutex::new(initial());
    let lr = lr_of(&ADAMW.opt);
    let (ranks, (arrived, trained, counted_early)) = std::thread::scope(|scope| {
        let releaser = scope.spawn(|| {
            // Both ranks' shard uploads arrive and are held...
            let arrived = server.faults.wait_for("PutObject", 2, Duration::from_secs(60));
            // ...while both ranks train three more steps (a synchronous write would keep them from any).
            let deadline = Instant::now() + Duration::from_secs(60);
            while trained_on.load(SeqCst) < 6 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let trained = trained_on.load(SeqCst);
            let counted_early = root.path().join("bkt/run/ckpt/ckpt-1/meta.json").exists();
            server.faults.open_held();
            (arrived, trained, counted_early)
        });
        let ranks = on_ranks(2, |rank, comm| {
            let data = data(2, 4);
            let init = deep_copy(&init.lock().unwrap());
            let mut ddp = Ddp::new(net(rank, &init), comm, options(ADAMW, ShardMode::Gradients)).unwrap();
            let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
            let mut writer = ShardedWriter::new(CheckpointStore::s3(url, &server.options(), 3).unwrap());
            let mut steps = share(&data, rank, 1).into_iter();
            ddp.train_step(&steps.next().unwrap(), optimizer.as_mut(), lr).unwrap();
            let at_step_1 = deep_copy(&model::state_tensors(ddp.model()));
            let model = (rank == 0).then(|| Checkpoint {
                model: model::state_tensors(ddp.model()),
                optimizer: Vec::new(),
                meta: meta(1),
            });
            writer.save(&mut ddp, optimizer.as_ref(), model.as_ref(), 1).unwrap();
            // What the training loop allreduces before each step carries whether this rank's shard is written.
            let flags = |ddp: &mut Ddp, writer: &mut ShardedWriter| -> f64 {
                let mut done = [writer.done_here()];
                ddp.allreduce_f64(&mut done, ReduceOp::Sum).unwrap();
                writer.observe(ddp, done[0]).unwrap();
                done[0]
            };
            // Every rank sees the same sums, so every rank completes the checkpoint at the same step.
            let mut completed = false;
            for micro in steps {
                completed |= flags(&mut ddp, &mut writer) >= 2.0;
                ddp.train_step(&micro, optimizer.as_mut(), lr).unwrap();
                trained_on.fetch_add(1, SeqCst);
            }
            while !completed {
                std::thread::sleep(Duration::from_millis(5));
                completed = flags(&mut ddp, &mut writer) >= 2.0;
            }
            (at_step_1, writer.finish(&mut ddp).unwrap())
        });
        (ranks, releaser.join().unwrap())
    });
    assert_eq!(arrived, 2, "both ranks' shard uploads arrived");
    assert_eq!(trained, 6, "the ranks did not train on while their shards were being written");
    assert!(!counted_early, "the checkpoint counted before its shards were written");
    assert_eq!(ranks[0].1, Some(PathBuf::from("s3://bkt/run/ckpt/ckpt-1")));
    assert_eq!(ranks[1].1, None, "only rank 0 writes the manifest");
    let resume = CheckpointStore::s3(url, &server.options(), 3).unwrap().latest_valid().unwrap().unwrap();
    assert_eq!(resume.checkpoint.meta.step, 1);
    let (read, want) = (by_name(deep_copy(&resume.checkpoint.model)), by_name(deep_copy(&ranks[0].0)));
    assert!(bitwise(&read, &want), "the checkpoint does not hold step 1's weights");
}

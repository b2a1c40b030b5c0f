//! Checkpoints: exact round trip, atomic writes, retention, and recovery from torn or corrupted newest ones.

mod checkpoint_remote;
use crate::common;
use crate::support;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{deep_copy, identical, seeded};
use hytrain_train::checkpoint::{list_checkpoints, read_checkpoint};
use hytrain_train::{
    latest_valid, model, Checkpoint, CheckpointMeta, CheckpointStore, Ddp, DdpOptions, GradScalerState, Optimizer,
    OptimizerConfig, RngState, Schedule, SgdConfig,
};
use tch::{Device, Kind, Tensor};

fn meta(step: u64) -> CheckpointMeta {
    CheckpointMeta {
        step,
        epoch: step / 10,
        data_position: serde_json::json!({ "epoch": step / 10, "samples_seen": step * 64 }),
        rng: RngState { seed: 42, state: serde_json::json!({ "python_like": [1, 2, 3] }) },
        config: serde_json::json!({ "model": "mlp", "lr": 0.1 }),
        schedule: Schedule::Cosine { warmup_steps: 5, total_steps: 100, min_factor: 0.0 },
        model: "mlp".into(),
        optimizer: "sgd".into(),
        grad_scaler: Some(GradScalerState { scale: 1024.0, growth_tracker: 7, ..Default::default() }),
    }
}

/// A small model trained `steps` steps with momentum SGD, and its optimizer.
fn trained(steps: usize) -> (Ddp, Box<dyn Optimizer>) {
    tch::set_num_threads(1);
    let net = seeded(11, || model::build("mlp:16", 3, &[4], Device::Cpu).unwrap());
    let mut ddp = Ddp::single(net, DdpOptions::default()).unwrap();
    let mut opt =
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() }).build(ddp.parameters()).unwrap();
    for i in 0..steps {
        let (xs, ys) = seeded(i as i64, || {
            (Tensor::randn([8, 4], (Kind::Float, Device::Cpu)), Tensor::randint(3, [8], (Kind::Int64, Device::Cpu)))
        });
        ddp.train_step(&[(xs, ys)], opt.as_mut(), 0.1).unwrap();
    }
    (ddp, opt)
}

fn checkpoint_of(ddp: &Ddp, opt: &dyn Optimizer, step: u64) -> Checkpoint {
    Checkpoint { model: model::state_tensors(ddp.model()), optimizer: opt.state(), meta: meta(step) }
}

fn by_name(mut v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Saves checkpoints at steps 1..=n of one model.
fn store_with(dir: &Path, keep: usize, steps: &[u64]) -> CheckpointStore {
    let store = CheckpointStore::new(dir, keep).unwrap();
    let (ddp, opt) = trained(1);
    for &s in steps {
        store.save(&checkpoint_of(&ddp, opt.as_ref(), s)).unwrap();
    }
    store
}

#[test]
fn checkpoint_round_trip_restores_model_optimizer_and_meta_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ddp, mut opt) = trained(3);
    let store = CheckpointStore::new(dir.path(), 3).unwrap();
    let path = store.save(&checkpoint_of(&ddp, opt.as_ref(), 3)).unwrap();
    assert_eq!(path, dir.path().join("ckpt-3"));

    let resume = store.latest_valid().unwrap().expect("a checkpoint");
    assert_eq!(resume.path, path);
    assert!(resume.skipped.is_empty());
    assert_eq!(resume.checkpoint.meta, meta(3));
    assert!(identical(&by_name(deep_copy(&resume.checkpoint.model)), &by_name(model::state_tensors(ddp.model()))));
    assert!(identical(&by_name(deep_copy(&resume.checkpoint.optimizer)), &by_name(opt.state())));

    // A fresh model and optimizer loaded from the checkpoint continue exactly like the original.
    let net = seeded(99, || model::build("mlp:16", 3, &[4], Device::Cpu).unwrap());
    model::load_state_tensors(net.as_ref(), &resume.checkpoint.model).unwrap();
    let mut ddp2 = Ddp::single(net, DdpOptions::default()).unwrap();
    let mut opt2 =
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() }).build(ddp2.parameters()).unwrap();
    opt2.load_state(&resume.checkpoint.optimizer).unwrap();
    let (xs, ys) = seeded(77, || {
        (Tensor::randn([8, 4], (Kind::Float, Device::Cpu)), Tensor::randint(3, [8], (Kind::Int64, Device::Cpu)))
    });
    ddp.train_step(&[(xs.copy(), ys.copy())], opt.as_mut(), 0.1).unwrap();
    ddp2.train_step(&[(xs, ys)], opt2.as_mut(), 0.1).unwrap();
    assert!(identical(&model::state_tensors(ddp.model()), &model::state_tensors(ddp2.model())));
}

#[test]
fn a_checkpoint_written_before_loss_scaling_existed_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2, &[6]);
    let file = dir.path().join("ckpt-6/meta.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(meta["grad_scaler"]["scale"], 1024.0, "the scaler state is saved");
    meta.as_object_mut().unwrap().remove("grad_scaler");
    std::fs::write(&file, serde_json::to_vec(&meta).unwrap()).unwrap();
    let loaded = read_checkpoint(&dir.path().join("ckpt-6")).unwrap();
    assert_eq!(loaded.meta.grad_scaler, None);
    assert_eq!(loaded.meta.step, 6);
}

#[test]
fn files_are_checksummed_and_no_temporary_directory_remains() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2, &[5]);
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["ckpt-5"]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("ckpt-5/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["format"], "hytrain-checkpoint/1");
    assert_eq!(meta["step"], 5);
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let sum = meta["files"][f].as_str().unwrap();
        assert_eq!(sum.len(), 64, "{f}: {sum}");
    }
}

/// Collects what `tracing` logs at WARN while `f` runs.
fn warnings_during<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink(Arc::new(Mutex::new(Vec::new())));
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, || {
        // With this the only registered dispatch, a test thread without a subscriber that reaches the warning's
        // callsite first caches "never" for it, and the event is then dropped here too (tokio-rs/tracing#3611; the
        // warning went missing in one CI run). Rebuilt from this thread, the interest is this subscriber's.
        tracing::callsite::rebuild_interest_cache();
        f()
    });
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[test]
fn a_corrupted_newest_checkpoint_is_skipped_with_a_warning_and_the_previous_used() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 5, &[1, 2, 3]);
    let file = dir.path().join("ckpt-3/model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();

    let (resume, warnings) = warnings_during(|| latest_valid(dir.path()).unwrap().expect("an older checkpoint"));
    assert_eq!(resume.path, dir.path().join("ckpt-2"));
    assert_eq!(resume.checkpoint.meta.step, 2);
    assert_eq!(resume.skipped.len(), 1);
    assert_eq!(resume.skipped[0].path, dir.path().join("ckpt-3"));
    assert!(resume.skipped[0].reason.contains("model.safetensors has SHA-256"), "{}", resume.skipped[0].reason);
    assert!(warnings.contains("WARN") && warnings.contains("ckpt-3") && warnings.contains("SHA-256"), "{warnings}");
}

#[test]
fn torn_checkpoints_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 5, &[1, 2]);
    // A write killed before its rename: a temporary directory with half a file.
    let tmp = dir.path().join(".tmp-ckpt-9-12345");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"\x10\x00").unwrap();
    // A directory that lost its meta.json, and one whose optimizer file is gone.
    std::fs::create_dir(dir.path().join("ckpt-8")).unwrap();
    std::fs::copy(dir.path().join("ckpt-2/model.safetensors"), dir.path().join("ckpt-8/model.safetensors")).unwrap();
    let no_opt = dir.path().join("ckpt-7");
    std::fs::create_dir(&no_opt).unwrap();
    std::fs::copy(dir.path().join("ckpt-2/model.safetensors"), no_opt.join("model.safetensors")).unwrap();
    let meta =
        std::fs::read_to_string(dir.path().join("ckpt-2/meta.json")).unwrap().replace("\"step\": 2", "\"step\": 7");
    std::fs::write(no_opt.join("meta.json"), meta).unwrap();

    let (resume, warnings) = warnings_during(|| latest_valid(dir.path()).unwrap().unwrap());
    assert_eq!(resume.checkpoint.meta.step, 2);
    let skipped: Vec<(&Path, &str)> = resume.skipped.iter().map(|s| (s.path.as_path(), s.reason.as_str())).collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, dir.path().join("ckpt-8"));
    assert!(skipped[0].1.contains("cannot read meta.json"), "{}", skipped[0].1);
    assert_eq!(skipped[1].0, dir.path().join("ckpt-7"));
    assert!(skipped[1].1.contains("optimizer.safetensors is missing"), "{}", skipped[1].1);
    assert!(!warnings.contains(".tmp-ckpt"), "a temporary directory is not a checkpoint: {warnings}");
}

#[test]
fn a_checkpoint_whose_meta_names_another_step_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 5, &[4]);
    std::fs::rename(dir.path().join("ckpt-4"), dir.path().join("ckpt-40")).unwrap();
    let e = read_checkpoint(&dir.path().join("ckpt-40")).unwrap_err().to_string();
    assert!(e.contains("meta.json says step 4"), "{e}");
    assert!(latest_valid(dir.path()).unwrap().is_none());
}

#[test]
fn a_meta_file_over_the_size_limit_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 5, &[3]);
    // Sparse: no disk used, but the size a hostile or broken file system could report.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("ckpt-3/meta.json"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let e = read_checkpoint(&dir.path().join("ckpt-3")).unwrap_err().to_string();
    assert!(e.contains(&format!("meta.json is {} bytes, over the limit of 16 MiB", 64 << 20)), "{e}");
    assert!(latest_valid(dir.path()).unwrap().is_none());
}

#[test]
fn retention_keeps_the_newest_n_and_clears_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join(".tmp-ckpt-2-999999");
    std::fs::create_dir_all(&stale).unwrap();
    store_with(dir.path(), 2, &[1, 2, 3, 4]);
    let steps: Vec<u64> = list_checkpoints(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [3, 4]);
    assert!(!stale.exists(), "the leftover of an interrupted write stays");
    // Numeric, not lexicographic: ckpt-10 is newer than ckpt-9.
    store_with(dir.path(), 2, &[9, 10]);
    let steps: Vec<u64> = list_checkpoints(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [9, 10]);
    assert_eq!(latest_valid(dir.path()).unwrap().unwrap().checkpoint.meta.step, 10);
}

#[test]
fn saving_a_step_again_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(dir.path(), 2).unwrap();
    let (ddp, opt) = trained(1);
    store.save(&checkpoint_of(&ddp, opt.as_ref(), 6)).unwrap();
    let (ddp2, opt2) = trained(2);
    store.save(&checkpoint_of(&ddp2, opt2.as_ref(), 6)).unwrap();
    let resume = latest_valid(dir.path()).unwrap().unwrap();
    assert!(identical(&by_name(resume.checkpoint.model), &by_name(deep_copy(&model::state_tensors(ddp2.model())))));
    assert_eq!(list_checkpoints(dir.path()).unwrap().len(), 1);
}

#[test]
fn no_directory_or_no_checkpoint_means_a_fresh_start() {
    let dir = tempfile::tempdir().unwrap();
    assert!(latest_valid(&dir.path().join("absent")).unwrap().is_none());
    assert!(latest_valid(dir.path()).unwrap().is_none());
}

#[test]
fn keep_zero_is_refused() {
    let e = CheckpointStore::new("/tmp/x", 0).unwrap_err().to_string();
    assert_eq!(e, "invalid --keep: must keep at least 1 checkpoint");
}

#[test]
fn an_unwritable_checkpoint_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let store = CheckpointStore::new(file.join("ckpts"), 1).unwrap();
    let (ddp, opt) = trained(1);
    let e = store.save(&checkpoint_of(&ddp, opt.as_ref(), 1)).unwrap_err().to_string();
    assert!(e.starts_with("cannot create") && e.contains("not-a-dir/ckpts"), "{e}");
}

#[test]
fn replacing_a_step_swaps_it_in_place_and_leaves_no_other_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(dir.path(), 1).unwrap();
    let (ddp, opt) = trained(1);
    store.save(&checkpoint_of(&ddp, opt.as_ref(), 6)).unwrap();
    let (ddp2, opt2) = trained(3);
    store.save(&checkpoint_of(&ddp2, opt2.as_ref(), 6)).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["ckpt-6"]);
    let resume = latest_valid(dir.path()).unwrap().unwrap();
    assert!(identical(&by_name(resume.checkpoint.model), &by_name(deep_copy(&model::state_tensors(ddp2.model())))));
}

/// Where the file system cannot swap two directories, a replace renames the old checkpoint aside first; a kill
/// before the new one is renamed in leaves that state, which must still resume.
#[test]
fn a_checkpoint_renamed_aside_by_an_interrupted_replace_is_resumed_from() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 5, &[4, 6]);
    std::fs::rename(dir.path().join("ckpt-6"), dir.path().join(".old-ckpt-6-4242")).unwrap();
    // The new one's complete files, not yet renamed in, are not taken: only the renamed-aside one is.
    std::fs::create_dir(dir.path().join(".tmp-ckpt-6-4242")).unwrap();
    let resume = latest_valid(dir.path()).unwrap().unwrap();
    assert_eq!(resume.checkpoint.meta.step, 6);
    assert_eq!(resume.path, dir.path().join(".old-ckpt-6-4242"));
    // The next save clears it.
    store_with(dir.path(), 5, &[7]);
    assert!(!dir.path().join(".old-ckpt-6-4242").exists());
    // A valid ckpt-<step> comes before a displaced copy of the same step.
    store_with(dir.path(), 5, &[8]);
    std::fs::create_dir(dir.path().join(".old-ckpt-8-1")).unwrap();
    let resume = latest_valid(dir.path()).unwrap().unwrap();
    assert_eq!(resume.path, dir.path().join("ckpt-8"));
}

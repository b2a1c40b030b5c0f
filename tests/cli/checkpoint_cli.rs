//! `hytrain checkpoint consolidate` as a user runs it: a 2-rank `--shard optimizer` job on the digits writes a
//! sharded checkpoint (one optimizer file per rank), which the command turns into one safetensors file holding
//! the model and the per-parameter optimizer state; a step that is not there, or a folder without checkpoints,
//! fails with one clear line.

use crate::common;
use crate::jobs;

use common::digits;
use jobs::{assert_ok, finish, launch_train, stderr, stdout};
use tch::Tensor;

#[test]
fn a_sharded_checkpoint_of_a_two_rank_job_consolidates_into_one_file_of_model_and_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    let args = [
        "--data",
        data.to_str().unwrap(),
        "--model",
        "mlp",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--validation",
        "none",
        "--shard",
        "optimizer",
        "--max-steps",
        "4",
    ];
    assert_ok(&finish(launch_train(dir.path(), 2, &args), "sharded run"));
    let ckpts = dir.path().join("hytrain-out/checkpoints");
    let ckpt = ckpts.join("ckpt-4");
    for file in ["optimizer-shard-0-of-2.safetensors", "optimizer-shard-1-of-2.safetensors", "model.safetensors"] {
        assert!(ckpt.join(file).is_file(), "{file} is in {}", ckpt.display());
    }
    assert!(!ckpt.join("optimizer.safetensors").exists(), "no rank wrote the whole optimizer state");

    let out_file = dir.path().join("consolidated.safetensors");
    let (ckpts_arg, out_arg) = (ckpts.to_str().unwrap(), out_file.to_str().unwrap());
    let out = common::run(&["checkpoint", "consolidate", "--checkpoint-dir", ckpts_arg, "--out", out_arg], &[]);
    assert_ok(&out);
    assert!(stdout(&out).contains("consolidated step 4 of"), "{}", stdout(&out));
    let file = Tensor::read_safetensors(&out_file).unwrap();
    let model = Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap();
    let get = |name: &str| file.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    let mut params = 0;
    for (name, t) in &model {
        assert!(get(name).unwrap_or_else(|| panic!("{name} is in the file")).equal(t), "{name}");
        // Every parameter (not the buffers) has a momentum buffer of its shape.
        if let Some(m) = get(&format!("optimizer.{name}.momentum_buffer")) {
            assert_eq!(m.size(), t.size(), "{name}");
            assert!(m.abs().max().double_value(&[]) > 0.0, "{name}'s momentum is trained state");
            params += 1;
        }
    }
    assert!(params >= 2, "momentum buffers in {:?}", file.iter().map(|(n, _)| n).collect::<Vec<_>>());
    assert_eq!(file.len(), model.len() + params);

    let missing = common::run(
        &["checkpoint", "consolidate", "--checkpoint-dir", ckpts_arg, "--step", "3", "--out", out_arg],
        &[],
    );
    assert!(!missing.status.success());
    let line = stderr(&missing);
    assert!(line.contains("hytrain: error: cannot consolidate checkpoint step 3") && line.contains("ckpt-3"), "{line}");
    let empty = tempfile::tempdir().unwrap();
    let none = common::run(
        &["checkpoint", "consolidate", "--checkpoint-dir", empty.path().to_str().unwrap(), "--out", out_arg],
        &[],
    );
    assert!(!none.status.success());
    assert!(stderr(&none).contains("holds no valid checkpoint"), "{}", stderr(&none));
}

//! Models exported with `python -m hytrain_export` and trained by `hytrain train` on real worker processes: the
//! digits CNN, torchvision's ResNet-18 on CIFAR-10-shaped data and the GPT example on token files, each loaded back
//! into its PyTorch module afterwards.

use crate::jobs;

use std::path::{Path, PathBuf};
use std::process::Command;

use jobs::{
    assert_ok, cached_export, digits, finish, launch_train, metric_values, stderr, stdout, summary_value, test_python,
    weights,
};

/// python/examples/digits_cnn.py, exported.
fn exported_digits_cnn() -> PathBuf {
    cached_export("digits_cnn")
}

#[test]
fn an_exported_pytorch_model_trains_on_two_workers_resumes_and_its_model_folder_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let exported = exported_digits_cnn();
    let data = digits();
    let job = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            exported.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--batch-size",
            "32",
            "--lr",
            "0.05",
            "--momentum",
            "0.9",
            "--log-interval",
            "10",
        ];
        args.extend(extra);
        launch_train(dir.path(), 2, &args)
    };
    let out = finish(job(&["--max-steps", "30", "--validation", "none"]), "first run");
    assert_ok(&out);
    assert_eq!(summary_value(&stdout(&out), "steps"), 30.0);
    // A second run resumes from the first's checkpoint and trains on to the end of epoch 4, validating each epoch
    // through the exported forward package.
    let out = finish(job(&["--epochs", "4"]), "resumed run");
    assert_ok(&out);
    let text = stdout(&out);
    let accuracy = summary_value(&text, "val_accuracy");
    assert!(accuracy >= 0.9, "validation accuracy {accuracy} below 0.9:\n{text}");
    assert!(text.contains("on 359 samples") || text.contains("on 360 samples"), "every test sample once:\n{text}");
    let losses = metric_values(&text, "train_loss");
    assert!(losses.last() < losses.first(), "the loss did not fall: {losses:?}");
    let steps = summary_value(&text, "steps") as u64;
    assert!(text.contains(&format!("({} this run)", steps - 30)), "the second run did not resume at step 30:\n{text}");
    let model = dir.path().join("hytrain-out/model");
    for file in ["model.safetensors", "metadata.json", "forward.pt2", "train_step.pt2", "hytrain-model.json"] {
        assert!(model.join(file).is_file(), "the model folder has no {file}");
    }
    // The model folder is an exported model with the trained weights: training it again starts from them.
    let out = finish(
        launch_train(
            dir.path(),
            1,
            &[
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--max-steps",
                "1",
                "--lr",
                "0",
                "--checkpoint-dir",
                "none",
                "--model-dir",
                "again",
            ],
        ),
        "training the exported folder",
    );
    assert_ok(&out);
    let (trained, again) = (weights(&model), weights(&dir.path().join("again")));
    assert_eq!(trained.len(), again.len());
    for ((n, a), (_, b)) in trained.iter().zip(&again) {
        // lr 0 leaves the parameters; BatchNorm statistics move with the one step's batch.
        if !n.contains("running") && !n.contains("num_batches") {
            assert!(a.equal(b), "{n} changed in a step with lr 0");
        }
    }
}

#[test]
fn an_exported_model_refuses_data_of_another_shape_and_other_precisions_before_step_1() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("exported-for-cifar");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(exported_digits_cnn()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let meta_path = copy.join("hytrain-model.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["input"]["shape"] = serde_json::json!([3, 32, 32]);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let data = digits();
    let out = finish(
        launch_train(dir.path(), 1, &["--model", copy.to_str().unwrap(), "--data", data.to_str().unwrap()]),
        "mismatched data",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("exported for inputs of shape [3, 32, 32] float32, but the data's samples are [1, 8, 8]"),
        "{}",
        stderr(&out)
    );
    let out = finish(
        launch_train(
            dir.path(),
            1,
            &[
                "--model",
                exported_digits_cnn().to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--precision",
                "bf16",
            ],
        ),
        "bf16 on an exported model",
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("train it with --precision fp32"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("step=1 "), "it trained before refusing");
}

/// Knuth's MMIX linear congruential generator from `seed`: 31 pseudo-random bits per call, the same on every machine.
fn lcg(seed: u64) -> impl FnMut() -> usize {
    let mut state = seed;
    move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize
    }
}

/// Runs `script` (which prints one loss) under the suite's Python with python/examples importable, the trained
/// `model.safetensors` and a data file as its arguments, and returns the loss it prints.
fn loss_in_pytorch(script: &str, model: &Path, data: &Path, what: &str) -> f64 {
    let py = Command::new(test_python())
        .args(["-c", script])
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/examples"))
        .arg(model)
        .arg(data)
        .output()
        .unwrap();
    assert!(py.status.success(), "loading the trained {what} in PyTorch failed:\n{}", stderr(&py));
    stdout(&py).trim().parse().unwrap()
}

/// python/tests/cached_export.py's `gpt`: python/examples/gpt.py with its defaults (vocabulary 64, context 32).
fn exported_gpt() -> PathBuf {
    cached_export("gpt")
}

/// A language of 64 token ids where each id is followed by one of two others (fixed, chosen by an LCG), so a model
/// that learns it gets to ln 2 = 0.69 nats per token from ln 64 = 4.16: nanoGPT's `train.bin` and `val.bin`
/// (headerless uint16) of `train` and `val` ids.
fn token_data(dir: &Path, train: usize, val: usize) -> PathBuf {
    let mut next = lcg(7);
    let successors: Vec<[u16; 2]> = (0..64).map(|_| [(next() % 64) as u16, (next() % 64) as u16]).collect();
    let mut token = 0u16;
    let mut ids = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                token = successors[token as usize][next() % 2];
                token.to_le_bytes()
            })
            .collect()
    };
    let data = dir.join("tokens");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("train.bin"), ids(train)).unwrap();
    std::fs::write(data.join("val.bin"), ids(val)).unwrap();
    data
}

#[test]
fn an_exported_gpt_trains_on_token_files_on_two_workers_and_loads_back_into_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let exported = exported_gpt();
    // 2 ranks x batch 16 x 32 ids: 15 steps per epoch; the validation file holds 64 windows.
    let data = token_data(dir.path(), 2 * 16 * 32 * 15 + 1, 64 * 32 + 1);
    let out = finish(
        launch_train(
            dir.path(),
            2,
            &[
                "--model",
                exported.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--batch-size",
                "16",
                "--epochs",
                "3",
                "--optimizer",
                "adamw",
                "--lr",
                "0.01",
                "--weight-decay",
                "0.01",
                "--schedule",
                "cosine",
                "--warmup",
                "5",
                "--log-interval",
                "5",
            ],
        ),
        "training the GPT",
    );
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("on 64 samples"), "every validation window once:\n{text}");
    let losses = metric_values(&text, "train_loss");
    let val_loss = summary_value(&text, "val_loss");
    assert!(
        losses.first().is_some_and(|&l| l > 3.5) && val_loss < 1.5,
        "the loss did not fall from ln 64 towards ln 2: train {losses:?}, validation {val_loss}\n{text}"
    );
    // The trained weights load into the Python module (tied names included) and score the validation file as
    // hytrain did.
    let model = dir.path().join("hytrain-out/model/model.safetensors");
    let script = r#"
import sys, numpy as np, torch, torch.nn.functional as F
from safetensors.torch import load_file
sys.path.insert(0, sys.argv[1])
from gpt import gpt
model = gpt()
model.load_state_dict(load_file(sys.argv[2]))
assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr(), "the tie was lost"
ids = torch.from_numpy(np.fromfile(sys.argv[3], dtype=np.uint16).astype(np.int64))
n = (len(ids) - 1) // 32
x = ids[: n * 32].view(n, 32)
y = ids[1 : n * 32 + 1].view(n, 32)
with torch.no_grad():
    print(F.cross_entropy(model.eval()(x).flatten(0, 1), y.flatten()).item())
"#;
    let torch_loss = loss_in_pytorch(script, &model, &data.join("val.bin"), "GPT");
    assert!(
        (torch_loss - val_loss).abs() < 1e-3,
        "PyTorch scores the trained weights {torch_loss}, hytrain reported {val_loss}"
    );
}

#[test]
fn token_data_needs_a_model_that_takes_its_windows() {
    let dir = tempfile::tempdir().unwrap();
    let data = token_data(dir.path(), 4097, 1025);
    let run = |args: &[&str], what: &str| {
        let mut all = vec!["--data", data.to_str().unwrap(), "--max-steps", "1"];
        all.extend(args);
        let out = finish(launch_train(dir.path(), 1, &all), what);
        assert!(!out.status.success(), "{what} trained");
        assert!(!stderr(&out).contains("step=1 "), "{what} trained before refusing");
        stderr(&out)
    };
    let e = run(&["--model", "mlp"], "a built-in model without a context length");
    assert!(e.contains("need a context length: give --context-length N"), "{e}");
    let e = run(&["--model", "mlp", "--context-length", "32", "--resize", "8", "--augment"], "image flags on tokens");
    assert!(
        e.contains("holds token ids, which --augment, --resize would not change") && e.contains("drop them"),
        "{e}"
    );
    let e = run(&["--model", "mlp", "--context-length", "32"], "a built-in model on tokens");
    assert!(e.contains("takes float inputs with one class label per sample") && e.contains("hytrain_export"), "{e}");
    let gpt = exported_gpt();
    let e = run(&["--model", gpt.to_str().unwrap(), "--context-length", "16"], "another context length");
    assert!(
        e.contains("exported for inputs of shape [32] int64, but the data's samples are [16] int64")
            && e.contains("--input-shape 16 --input-dtype int64"),
        "{e}"
    );
}

/// CIFAR-10's binary layout (`data_batch_1.bin`, `test_batch.bin`, `batches.meta.txt`) holding `train` and `test`
/// noisy 32x32 images whose class c is told by their brightness (20 + 22 c, noise of +-15).
fn cifar_like(dir: &Path, train: usize, test: usize) -> PathBuf {
    let mut next = lcg(11);
    let mut batch = |n: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(n * 3073);
        for i in 0..n {
            let class = (i % 10) as u8;
            out.push(class);
            out.extend((0..3072).map(|_| 5 + 22 * class + (next() % 31) as u8));
        }
        out
    };
    let data = dir.join("cifar-like");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("data_batch_1.bin"), batch(train)).unwrap();
    std::fs::write(data.join("test_batch.bin"), batch(test)).unwrap();
    let names: Vec<String> = (0..10).map(|c| format!("class{c}")).collect();
    std::fs::write(data.join("batches.meta.txt"), names.join("\n")).unwrap();
    data
}

/// The float32 package's largest gradient error against float64 that the export measured and recorded.
fn recorded_gradient_error(exported: &Path) -> f64 {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exported.join("hytrain-model.json")).unwrap()).unwrap();
    meta["check"]["max_error_vs_float64"].as_f64().expect("the export recorded its float64 check")
}

#[test]
fn torchvisions_resnet18_exported_trains_on_two_workers_and_loads_back_into_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let exported = cached_export("resnet18_cifar");
    let error = recorded_gradient_error(&exported);
    assert!(error < 1e-4, "the package's gradients are {error} off float64");
    let data = cifar_like(dir.path(), 320, 100);
    let out = finish(
        launch_train(
            dir.path(),
            2,
            &[
                "--model",
                exported.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--batch-size",
                "16",
                "--epochs",
                "3",
                "--lr",
                "0.002",
                "--momentum",
                "0.9",
                "--log-interval",
                "5",
            ],
        ),
        "training ResNet-18",
    );
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("on 100 samples"), "every test image once:\n{text}");
    let losses = metric_values(&text, "train_loss");
    let (val_loss, val_accuracy) = (summary_value(&text, "val_loss"), summary_value(&text, "val_accuracy"));
    assert!(
        losses.last() < losses.first() && val_loss < 1.6 && val_accuracy > 0.3,
        "ResNet-18 did not learn: train {losses:?}, validation accuracy {val_accuracy}\n{text}"
    );
    // torchvision's module takes the trained weights (BatchNorm statistics included) and scores the test images,
    // normalized as hytrain normalizes them, as hytrain did.
    let script = r#"
import sys, numpy as np, torch, torch.nn.functional as F
from safetensors.torch import load_file
sys.path.insert(0, sys.argv[1])
from resnet18_cifar import build
model = build()
model.load_state_dict(load_file(sys.argv[2]))
raw = np.fromfile(sys.argv[3], dtype=np.uint8).reshape(-1, 3073)
y = torch.from_numpy(raw[:, 0].astype(np.int64))
x = torch.from_numpy(raw[:, 1:].astype(np.float32)).view(-1, 3, 32, 32) / 255
mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
with torch.no_grad():
    print(F.cross_entropy(model.eval()((x - mean) / std), y).item())
"#;
    let model = dir.path().join("hytrain-out/model/model.safetensors");
    let torch_loss = loss_in_pytorch(script, &model, &data.join("test_batch.bin"), "ResNet-18");
    assert!(
        (torch_loss - val_loss).abs() < 1e-3 * val_loss.max(1.0),
        "PyTorch scores the trained weights {torch_loss}, hytrain reported {val_loss}"
    );
}

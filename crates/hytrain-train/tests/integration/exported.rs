//! Models exported with `python -m hytrain_export` (python/): the compiled step's gradients against float64, 10
//! training steps on 1 and 2 ranks against PyTorch DDP from the same weights and batches (SGD for the digits CNN;
//! AdamW on a cosine schedule for the small GPT, token inputs and per-position targets), the trained weights loading
//! back into the Python module, the refusals before step 1, and the export package's own unit tests.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{max_relative_difference, on_ranks, python};
use hytrain_train::model::{self, ExportedModel, Model};
use hytrain_train::{AdamWConfig, Ddp, DdpOptions, OptimizerConfig, Schedule, SgdConfig, ShardMode};
use tch::{Device, Kind, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// One of python/tests/cached_export.py's examples, exported once per source change (cached under .cache/exported).
fn cached_export(name: &str, folder: &'static OnceLock<PathBuf>) -> &'static Path {
    folder.get_or_init(|| {
        let out = std::process::Command::new(python())
            .arg(repo().join("python/tests/cached_export.py"))
            .arg(name)
            .output()
            .expect("python starts");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "exporting {name} failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(text.trim())
    })
}

/// python/examples/digits_cnn.py: a CNN with BatchNorm for 8x8 images.
fn digits_cnn() -> &'static Path {
    static FOLDER: OnceLock<PathBuf> = OnceLock::new();
    cached_export("digits_cnn", &FOLDER)
}

/// python/examples/gpt.py at its default size: 32 token ids in, logits [32, 64] out, the head tied to the embedding.
fn gpt() -> &'static Path {
    static FOLDER: OnceLock<PathBuf> = OnceLock::new();
    cached_export("gpt", &FOLDER)
}

/// An exported example (tests/parity_exported.py's `EXAMPLES` knows the same two).
#[derive(Debug, Clone, Copy)]
enum Example {
    DigitsCnn,
    Gpt,
}

impl Example {
    fn folder(self) -> &'static Path {
        match self {
            Example::DigitsCnn => digits_cnn(),
            Example::Gpt => gpt(),
        }
    }
}

/// How the parity tests step the weights; tests/parity_exported.py's `OPTIMIZERS` steps PyTorch the same way.
#[derive(Debug, Clone, Copy)]
enum Optimizer {
    /// SGD, lr 0.05, momentum 0.5; PyTorch's side is eager DDP.
    Sgd,
    /// AdamW (weight decay 0.01), lr 1e-2 on a cosine over the 10 steps (2 of warmup) down to a tenth; PyTorch's
    /// side steps torch.optim.AdamW with the compiled package's gradients (see parity_exported.py).
    AdamWCosine,
}

impl Optimizer {
    fn name(self) -> &'static str {
        match self {
            Optimizer::Sgd => "sgd",
            Optimizer::AdamWCosine => "adamw",
        }
    }

    fn config(self) -> OptimizerConfig {
        match self {
            Optimizer::Sgd => sgd(),
            Optimizer::AdamWCosine => OptimizerConfig::AdamW(AdamWConfig::default()),
        }
    }

    /// The learning rate of update `step`.
    fn lr(self, step: u64) -> f64 {
        match self {
            Optimizer::Sgd => 0.05,
            Optimizer::AdamWCosine => {
                1e-2 * Schedule::Cosine { warmup_steps: 2, total_steps: 10, min_factor: 0.1 }.factor(step)
            }
        }
    }
}

fn run_parity(args: &[&std::ffi::OsStr]) {
    let out = std::process::Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/parity_exported.py"))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "parity_exported.py failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn get<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("PyTorch wrote no {name}")).1
}

fn strip(tensors: &[(String, Tensor)], prefix: &str) -> Vec<(String, Tensor)> {
    tensors.iter().filter_map(|(n, t)| n.strip_prefix(prefix).map(|n| (n.to_string(), t.shallow_clone()))).collect()
}

/// Per tensor max|a - ref| / max(max|ref|, 1e-3 * the largest max|ref|): relative, with a floor for gradients
/// whose true value is about zero.
fn worst_error(ours: &[(String, Tensor)], reference: &[(String, Tensor)]) -> (f64, String) {
    let scale = reference.iter().map(|(_, t)| t.abs().max().double_value(&[])).fold(0.0, f64::max);
    ours.iter()
        .map(|(name, t)| {
            let r = get(reference, name).to_kind(Kind::Double);
            let diff = (t.to_kind(Kind::Double) - &r).abs().max().double_value(&[]);
            (diff / r.abs().max().double_value(&[]).max(1e-3 * scale), name.clone())
        })
        .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a })
}

fn check_compiled_gradients_against_float64(example: Example) {
    tch::set_num_threads(1);
    let folder = example.folder();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("float64.safetensors");
    run_parity(&["float64".as_ref(), folder.as_os_str(), file.as_os_str()]);
    let reference = Tensor::read_safetensors(&file).unwrap();
    run_parity(&["train".as_ref(), folder.as_os_str(), dir.path().join("b.safetensors").as_os_str(), "1".as_ref()]);
    let batches = Tensor::read_safetensors(dir.path().join("b.safetensors")).unwrap();

    let net = ExportedModel::load(folder, Device::Cpu).unwrap();
    let step = net.compiled_step().unwrap();
    let (loss, grads) = step.loss_and_grads(get(&batches, "batch0.x"), get(&batches, "batch0.y")).unwrap();
    let names: Vec<String> = net.named_parameters().into_iter().map(|(n, _)| n).collect();
    let ours: Vec<(String, Tensor)> = names.iter().cloned().zip(grads).collect();
    let (worst, name) = worst_error(&ours, &strip(&reference, "grad."));
    let loss_error = (loss.double_value(&[]) - get(&reference, "loss").double_value(&[0])).abs();
    eprintln!("{example:?}: compiled step vs float64: worst gradient {worst:e} ({name}), loss {loss_error:e}");
    assert!(worst <= 1e-4, "gradient of {name} is {worst:e} off float64");
    assert!(loss_error <= 1e-5, "loss is {loss_error:e} off float64");
    // The export's own check, recorded in the metadata: the float64 twin of the compiled step equals eager float64.
    let meta = net.metadata();
    let twin = meta.rest["check"]["float64_twin_max_error"].as_f64().expect("the export checked its float64 twin");
    assert!(twin <= 1e-9, "float64 twin is {twin:e} off eager float64");
}

#[test]
fn compiled_gradients_are_within_1e_4_of_float64() {
    check_compiled_gradients_against_float64(Example::DigitsCnn);
}

#[test]
fn gpt_compiled_gradients_are_within_1e_4_of_float64_tied_head_included() {
    check_compiled_gradients_against_float64(Example::Gpt);
}

fn sgd() -> OptimizerConfig {
    OptimizerConfig::Sgd(SgdConfig { momentum: 0.5, ..Default::default() })
}

/// hytrain on `world` ranks (threads over the TCP ring) against PyTorch on as many processes: 10 steps of
/// `optimizer`, on the same batches split over the ranks the same way.
fn check_parity_with_pytorch(example: Example, optimizer: Optimizer, world: usize) {
    let folder = example.folder();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ddp.safetensors");
    let world_arg = world.to_string();
    run_parity(&[
        "train".as_ref(),
        folder.as_os_str(),
        file.as_os_str(),
        world_arg.as_ref(),
        optimizer.name().as_ref(),
    ]);
    let saved = Tensor::read_safetensors(&file).unwrap();
    let per_rank = 16 / world as i64;
    let finals = on_ranks(world, |rank, comm| {
        // Tensors are not Sync: each rank reads its own copy.
        let saved = Tensor::read_safetensors(&file).unwrap();
        let net = ExportedModel::load(folder, Device::Cpu).unwrap();
        let mut ddp = Ddp::new(Box::new(net), comm, DdpOptions::default()).unwrap();
        let mut opt = optimizer.config().build(ddp.parameters()).unwrap();
        let mut losses = Vec::new();
        for i in 0..10 {
            let x = get(&saved, &format!("batch{i}.x")).narrow(0, rank as i64 * per_rank, per_rank);
            let y = get(&saved, &format!("batch{i}.y")).narrow(0, rank as i64 * per_rank, per_rank);
            losses.push(ddp.train_step(&[(x, y)], opt.as_mut(), optimizer.lr(i)).unwrap().loss_value().unwrap());
        }
        (model::state_tensors(ddp.model()), losses)
    });
    let initial = ExportedModel::load(folder, Device::Cpu).unwrap();
    let aliases = initial.metadata().aliases.clone();
    let moved = max_relative_difference(&finals[0].0, &model::state_tensors(&initial));
    assert!(moved > 1e-3, "10 steps moved the weights by only {moved:e}");
    for (rank, (ours, _)) in finals.iter().enumerate() {
        let theirs = strip(&saved, &format!("rank{rank}."));
        // PyTorch's state_dict names a tied tensor under each of its names; hytrain's state has it once.
        for (alias, name) in &aliases {
            assert!(get(&theirs, alias).equal(get(&theirs, name)), "PyTorch's {alias} is not its {name}");
        }
        let theirs: Vec<_> = theirs.into_iter().filter(|(n, _)| !aliases.contains_key(n)).collect();
        let diff = max_relative_difference(ours, &theirs);
        eprintln!(
            "{example:?}, {optimizer:?}, {world} rank(s), rank {rank}: state after 10 steps vs PyTorch: {diff:e}"
        );
        assert!(diff <= 1e-5, "rank {rank} of {world}: state differs from PyTorch's by {diff:e}");
    }
    if world > 1 && matches!(example, Example::DigitsCnn) {
        // DDP's rule: every rank's forward uses rank 0's buffers, then updates them from its own batch; after the
        // last step rank 1 holds statistics of its own half, not rank 0's.
        let running = |r: usize| finals[r].0.iter().find(|(n, _)| n == "bn1.running_mean").unwrap().1.copy();
        assert!(!running(0).equal(&running(1)), "rank 1's buffers were not its own after the last step");
    }
    let (_, losses) = &finals[0];
    for (i, loss) in losses.iter().enumerate() {
        let mean_over_ranks = finals.iter().map(|(_, l)| l[i]).sum::<f64>() / world as f64;
        let torch = get(&saved, &format!("loss{i}")).double_value(&[0]);
        assert!((mean_over_ranks - torch).abs() <= 1e-5 * torch.abs(), "step {i}: loss {loss} vs PyTorch {torch}");
    }
}

#[test]
fn one_rank_after_10_sgd_steps_matches_pytorch() {
    check_parity_with_pytorch(Example::DigitsCnn, Optimizer::Sgd, 1);
}

#[test]
fn two_ranks_after_10_sgd_steps_match_pytorch_ddp_buffers_included() {
    check_parity_with_pytorch(Example::DigitsCnn, Optimizer::Sgd, 2);
}

#[test]
fn gpt_on_one_rank_after_10_sgd_steps_matches_pytorch() {
    check_parity_with_pytorch(Example::Gpt, Optimizer::Sgd, 1);
}

#[test]
fn gpt_on_two_ranks_after_10_sgd_steps_matches_pytorch_ddp_tied_head_included() {
    check_parity_with_pytorch(Example::Gpt, Optimizer::Sgd, 2);
}

#[test]
fn gpt_on_two_ranks_10_adamw_steps_on_a_cosine_schedule_match_torch_adamw_given_the_same_gradients() {
    check_parity_with_pytorch(Example::Gpt, Optimizer::AdamWCosine, 2);
}

#[test]
fn trained_weights_load_back_into_the_python_module_and_the_exported_folder_trains_on() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let net = ExportedModel::load(digits_cnn(), Device::Cpu).unwrap();
    let mut ddp = Ddp::single(Box::new(net), DdpOptions::default()).unwrap();
    let mut opt = sgd().build(ddp.parameters()).unwrap();
    let x = common::seeded(3, || Tensor::randn([32, 1, 8, 8], (Kind::Float, Device::Cpu)));
    let y = common::seeded(4, || Tensor::randint(10, [32], (Kind::Int64, Device::Cpu)));
    let first =
        ddp.train_step(&[(x.shallow_clone(), y.shallow_clone())], opt.as_mut(), 0.1).unwrap().loss_value().unwrap();
    for _ in 0..20 {
        ddp.train_step(&[(x.shallow_clone(), y.shallow_clone())], opt.as_mut(), 0.1).unwrap();
    }
    let last = ddp.train_step(&[(x, y)], opt.as_mut(), 0.1).unwrap().loss_value().unwrap();
    assert!(last < 0.5 * first, "the loss did not fall: {first} -> {last}");

    let model_dir = dir.path().join("model");
    let meta = hytrain_train::export(ddp.model(), &model_dir, 10, &[1, 8, 8], serde_json::json!({})).unwrap();
    assert!(meta.torchscript.is_none() && meta.packages.contains(&"forward.pt2".to_string()), "{meta:?}");
    let out = dir.path().join("load.safetensors");
    run_parity(&["load".as_ref(), model_dir.as_os_str(), out.as_os_str()]);
    let outputs = Tensor::read_safetensors(&out).unwrap();
    let (eager, compiled) = (get(&outputs, "eager"), get(&outputs, "compiled"));
    let diff = (eager - compiled).abs().max().double_value(&[]) / eager.abs().max().double_value(&[]);
    assert!(diff <= 1e-5, "forward.pt2 with the trained weights differs from the module by {diff:e}");

    // The model folder hytrain wrote is an exported model itself: it loads with the trained weights.
    let again = ExportedModel::load(&model_dir, Device::Cpu).unwrap();
    let trained = model::state_tensors(ddp.model());
    assert_eq!(max_relative_difference(&model::state_tensors(&again), &trained), 0.0);
}

/// Token sequences that count up by one (mod 64) from random starts: the next token is learnable from the current.
fn counting_sequences(seed: i64, batch: i64) -> (Tensor, Tensor) {
    let starts = common::seeded(seed, || Tensor::randint(64, [batch, 1], (Kind::Int64, Device::Cpu)));
    let seq = (starts + Tensor::arange(33, (Kind::Int64, Device::Cpu)).unsqueeze(0)).remainder(64);
    (seq.narrow(1, 0, 32).contiguous(), seq.narrow(1, 1, 32).contiguous())
}

#[test]
fn gpt_trained_on_two_ranks_with_adamw_and_a_cosine_schedule_learns_and_loads_back_into_python() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let steps = 30;
    let schedule = Schedule::Cosine { warmup_steps: 3, total_steps: steps, min_factor: 0.1 };
    let losses = on_ranks(2, |rank, comm| {
        let net = ExportedModel::load(gpt(), Device::Cpu).unwrap();
        let mut ddp = Ddp::new(Box::new(net), comm, DdpOptions::default()).unwrap();
        let mut opt = OptimizerConfig::AdamW(AdamWConfig::default()).build(ddp.parameters()).unwrap();
        let mut losses = Vec::new();
        for step in 0..steps {
            let (x, y) = counting_sequences(100 * step as i64 + rank as i64, 8);
            losses.push(
                ddp.train_step(&[(x, y)], opt.as_mut(), 1e-2 * schedule.factor(step)).unwrap().loss_value().unwrap(),
            );
        }
        if rank == 0 {
            let meta = hytrain_train::export(ddp.model(), &model_dir, 64, &[32], serde_json::json!({})).unwrap();
            assert!(meta.packages.contains(&"forward.pt2".to_string()), "{meta:?}");
        }
        losses
    });
    let (first, last) = (losses[0][0], losses[0][steps as usize - 1]);
    eprintln!("gpt on 2 ranks, AdamW on a cosine schedule: rank 0's loss {first:.3} -> {last:.3} in {steps} steps");
    assert!(last < 0.5 * first, "the loss did not fall: {first} -> {last}");

    // Strict load_state_dict of model.safetensors (the tied lm_head.weight included), then the module in eval mode
    // against forward.pt2 with the trained weights.
    let out = dir.path().join("load.safetensors");
    run_parity(&["load".as_ref(), model_dir.as_os_str(), out.as_os_str()]);
    let outputs = Tensor::read_safetensors(&out).unwrap();
    let (eager, compiled) = (get(&outputs, "eager"), get(&outputs, "compiled"));
    assert_eq!(eager.size(), [16, 32, 64]);
    let diff = (eager - compiled).abs().max().double_value(&[]) / eager.abs().max().double_value(&[]);
    assert!(diff <= 1e-5, "forward.pt2 with the trained weights differs from the module by {diff:e}");
}

/// Each rank's state after 6 AdamW steps of `example` on 2 ranks with `--shard shard` (small buckets, so the
/// model spans several and every one is padded or split), from the exported weights and the same batches.
fn train_exported_sharded(example: Example, shard: ShardMode) -> Vec<Vec<(String, Tensor)>> {
    let options = DdpOptions { bucket_mb: 0.002, first_bucket_mb: 0.0005, shard, ..DdpOptions::default() };
    on_ranks(2, |rank, comm| {
        let net = ExportedModel::load(example.folder(), Device::Cpu).unwrap();
        let mut ddp = Ddp::new(Box::new(net), comm, options.clone()).unwrap();
        assert!(ddp.bucket_layout().len() >= 3, "{example:?} spans only {} buckets", ddp.bucket_layout().len());
        let mut opt = ddp.build_optimizer(&OptimizerConfig::AdamW(AdamWConfig::default())).unwrap();
        for step in 0..6 {
            let seed = 100 * step + rank as i64;
            let batch = match example {
                Example::DigitsCnn => common::seeded(seed, || {
                    (
                        Tensor::randn([8, 1, 8, 8], (Kind::Float, Device::Cpu)),
                        Tensor::randint(10, [8], (Kind::Int64, Device::Cpu)),
                    )
                }),
                Example::Gpt => counting_sequences(seed, 8),
            };
            ddp.train_step(&[batch], opt.as_mut(), 1e-2).unwrap();
        }
        model::state_tensors(ddp.model())
    })
}

/// `--shard` on exported models (their gradients come from the compiled step, not autograd): bit for bit DDP's.
#[test]
fn sharded_training_of_exported_models_equals_ddp_tied_head_included() {
    for example in [Example::DigitsCnn, Example::Gpt] {
        let ddp = train_exported_sharded(example, ShardMode::None);
        let initial = model::state_tensors(&ExportedModel::load(example.folder(), Device::Cpu).unwrap());
        let moved = max_relative_difference(&ddp[0], &initial);
        assert!(moved > 1e-3, "{example:?}: 6 steps moved the weights by only {moved:e}");
        for shard in [ShardMode::Optimizer, ShardMode::Gradients] {
            let sharded = train_exported_sharded(example, shard);
            for rank in 0..2 {
                let diff = max_relative_difference(&sharded[rank], &ddp[rank]);
                eprintln!("{example:?}, --shard {shard}, rank {rank}: state vs DDP after 6 AdamW steps: {diff:e}");
                // No clipping: every update is elementwise on the same averaged gradients, so bit for bit.
                assert_eq!(diff, 0.0, "{example:?}, --shard {shard}, rank {rank}: differs from DDP by {diff:e}");
            }
        }
    }
}

/// A copy of the exported folder with `edit` applied to its metadata JSON.
fn edited(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let copy = dir.join(format!("copy-{}", std::fs::read_dir(dir).unwrap().count()));
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(digits_cnn()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let path = copy.join("hytrain-model.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut meta);
    std::fs::write(&path, serde_json::to_vec(&meta).unwrap()).unwrap();
    copy
}

fn load_error(dir: &Path) -> String {
    ExportedModel::load(dir, Device::Cpu).map(|_| ()).unwrap_err().to_string()
}

#[test]
fn folders_that_cannot_run_here_are_refused_before_step_1() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_error(&edited(dir.path(), |m| m["torch_version"] = "2.10.0+cu128".into()));
    assert!(e.contains("compiled by torch 2.10.0+cu128") && e.contains("export again with torch==2.11"), "{e}");
    let e = load_error(&edited(dir.path(), |m| m["device"] = "cuda".into()));
    assert!(e.contains("compiled for cuda, but this run uses cpu"), "{e}");
    let missing = edited(dir.path(), |_| {});
    std::fs::remove_file(missing.join("forward.pt2")).unwrap();
    let e = load_error(&missing);
    assert!(e.contains("forward package forward.pt2 is missing"), "{e}");
    let foreign = edited(dir.path(), |_| {});
    std::fs::write(foreign.join("train_step.pt2"), b"not a package").unwrap();
    let e = load_error(&foreign);
    assert!(e.contains("cannot load train_step.pt2 as an AOTInductor package"), "{e}");
    let e = load_error(&edited(dir.path(), |m| m["parameters"][0]["shape"] = serde_json::json!([8, 1, 5, 5])));
    assert!(e.contains("parameter conv1.weight is [8, 1, 3, 3]"), "{e}");
    let e = load_error(&edited(dir.path(), |m| m["format_version"] = 99.into()));
    assert!(e.contains("version 99"), "{e}");
}

#[test]
fn data_the_model_was_not_exported_for_is_refused() {
    let e = model::build(digits_cnn().to_str().unwrap(), 10, &[3, 32, 32], Device::Cpu).map(|_| ()).unwrap_err();
    assert!(
        e.to_string().contains(
            "exported for inputs of shape [1, 8, 8] float32, but the data's samples are \
        [3, 32, 32] float32; export it again with --input-shape 3,32,32"
        ),
        "{e}"
    );
    let e = model::build(digits_cnn().to_str().unwrap(), 5, &[1, 8, 8], Device::Cpu).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("outputs [10] per sample, but the data has 5 classes"), "{e}");
    let net = model::build(digits_cnn().to_str().unwrap(), 10, &[1, 8, 8], Device::Cpu).unwrap();
    let step = net.compiled_step().unwrap();
    let y = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
    let e = step.loss_and_grads(&Tensor::zeros([4, 1, 8, 8], (Kind::Double, Device::Cpu)), &y).unwrap_err();
    assert!(e.to_string().contains("was exported for [batch, 1, 8, 8] float32"), "{e}");
    let e = step.loss_and_grads(&Tensor::zeros([4, 1, 8, 8], (Kind::Float, Device::Cpu)), &y.narrow(0, 0, 3));
    assert!(e.unwrap_err().to_string().contains("the targets are [3] Int64"));
    let e = step.loss_and_grads(&Tensor::zeros([5000, 1, 8, 8], (Kind::Float, Device::Cpu)), &y).unwrap_err();
    assert!(e.to_string().contains("a batch of 5000 is outside the 1..=4096"), "{e}");
    let e = Ddp::single(net, DdpOptions { precision: hytrain_train::Precision::Bf16, ..Default::default() });
    assert!(e.unwrap_err().to_string().contains("train it with --precision fp32"));
}

#[test]
fn any_batch_size_runs_through_one_package() {
    let net = ExportedModel::load(digits_cnn(), Device::Cpu).unwrap();
    for batch in [1, 3, 16, 200] {
        let x = common::seeded(batch, || Tensor::randn([batch, 1, 8, 8], (Kind::Float, Device::Cpu)));
        let logits = net.forward_t(&x, false).unwrap();
        assert_eq!(logits.size(), [batch, 10]);
        if batch > 1 {
            let (loss, grads) = net
                .compiled_step()
                .unwrap()
                .loss_and_grads(&x, &Tensor::zeros([batch], (Kind::Int64, Device::Cpu)))
                .unwrap();
            assert!(loss.double_value(&[]).is_finite() && grads.len() == net.named_parameters().len());
        }
    }
}

#[test]
fn the_export_packages_own_tests_pass() {
    let out = std::process::Command::new(python())
        .args(["-m", "unittest", "discover", "-s", "tests", "-t", "."])
        .current_dir(repo().join("python"))
        .env("PYTHONPATH", repo().join("python"))
        .output()
        .expect("python starts");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python/tests failed:\n{text}");
    assert!(text.contains("OK") && !text.contains("Ran 0 tests"), "{text}");
}

/// Parameters only (BatchNorm statistics move once per micro-batch, so accumulation changes them by design).
fn parameters(ddp: &Ddp) -> Vec<(String, Tensor)> {
    ddp.parameters().iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect()
}

#[test]
fn accumulating_two_copies_of_a_batch_steps_like_the_batch_and_clipping_bounds_the_update() {
    tch::set_num_threads(1);
    let x = common::seeded(5, || Tensor::randn([8, 1, 8, 8], (Kind::Float, Device::Cpu)));
    let y = common::seeded(6, || Tensor::randint(10, [8], (Kind::Int64, Device::Cpu)));
    let plain_sgd = OptimizerConfig::Sgd(SgdConfig::default());
    let train = |options: DdpOptions, micro: usize| {
        let net = ExportedModel::load(digits_cnn(), Device::Cpu).unwrap();
        let mut ddp = Ddp::single(Box::new(net), options).unwrap();
        let before = parameters(&ddp);
        let mut opt = plain_sgd.build(ddp.parameters()).unwrap();
        let batches: Vec<_> = (0..micro).map(|_| (x.shallow_clone(), y.shallow_clone())).collect();
        let out = ddp.train_step(&batches, opt.as_mut(), 0.1).unwrap();
        (before, parameters(&ddp), out)
    };
    let (before, once, _) = train(DdpOptions::default(), 1);
    let (_, accumulated, _) = train(DdpOptions { grad_accum: 2, ..Default::default() }, 2);
    let diff = max_relative_difference(&accumulated, &once);
    assert!(diff <= 1e-6, "the mean of two identical micro-batches' gradients stepped differently: {diff:e}");
    assert!(max_relative_difference(&once, &before) > 1e-4, "the step did not move the weights");

    let (before, clipped, out) = train(DdpOptions { max_grad_norm: Some(1e-3), ..Default::default() }, 1);
    let norm = out.grad_norm_value().unwrap().expect("clipping reports the norm");
    assert!(norm > 1e-3, "the gradient norm {norm} was already below the clip");
    let update: f64 = clipped
        .iter()
        .zip(&before)
        .map(|((_, a), (_, b))| (a - b).square().sum(Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt();
    assert!((update - 0.1 * 1e-3).abs() <= 1e-6, "plain SGD moved the weights by {update}, not lr x clip = 1e-4");
}

//! The training loop end to end on real collectives over loopback: learning, evaluation counted once across
//! ranks, metrics lines SageMaker can parse, stop-and-resume landing on the weights of an unbroken run, and
//! checkpoints written to S3 in the background while every rank trains on.

use crate::common;
use crate::support;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{deep_copy, identical, on_ranks, seeded};
use hytrain_comm::testing::{FailingCollective, Fault};
use hytrain_train::{
    model, BatchError, BatchSource, Batches, Collective, Ddp, Precision, RunPaths, ShardMode, Summary, TensorBatches,
    TrainConfig, TrainError, Trainer,
};
use tch::{Device, Kind, Tensor};

const CLASSES: i64 = 3;
const FEATURES: i64 = 4;

/// Samples as plain vectors, so rank threads can share them (tensors are not `Sync`).
#[derive(Clone)]
struct Data {
    inputs: Vec<f32>,
    labels: Vec<i64>,
}

/// `n` samples of three well-separated Gaussian blobs in 4 dimensions (learnable, not noise).
fn blobs(n: i64, seed: i64) -> Data {
    seeded(seed, || {
        let labels = Tensor::randint(CLASSES, [n], (Kind::Int64, Device::Cpu));
        let centers =
            Tensor::from_slice(&[3.0f32, 0., 0., 0., 0., 3., 0., 0., 0., 0., 3., 0.]).view([CLASSES, FEATURES]);
        let inputs = centers.index_select(0, &labels) + Tensor::randn([n, FEATURES], (Kind::Float, Device::Cpu)) * 0.7;
        Data {
            inputs: Vec::<f32>::try_from(inputs.view([-1])).unwrap(),
            labels: Vec::<i64>::try_from(&labels).unwrap(),
        }
    })
}

fn copy(d: &Data) -> (Tensor, Tensor) {
    (Tensor::from_slice(&d.inputs).view([-1, FEATURES]), Tensor::from_slice(&d.labels))
}

/// Collects what the trainer writes as metrics lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// A training source that sets its rank's stop flag when the run pulls batch number `after + 1`, as a SIGTERM
/// arriving during step `after + 1` would; wraps the real in-memory source.
struct StopAfter<'a> {
    inner: TensorBatches,
    stop: &'a AtomicBool,
    pulled: u64,
    after: u64,
}

impl BatchSource for StopAfter<'_> {
    fn epoch(&mut self, epoch: u64, start_batch: u64) -> Result<Batches<'_>, BatchError> {
        let (stop, after, pulled) = (self.stop, self.after, &mut self.pulled);
        Ok(Box::new(self.inner.epoch(epoch, start_batch)?.inspect(move |_| {
            *pulled += 1;
            if *pulled > after {
                stop.store(true, Ordering::SeqCst);
            }
        })))
    }
    fn batches_per_epoch(&self) -> u64 {
        self.inner.batches_per_epoch()
    }
}

struct Job<'a> {
    config: TrainConfig,
    train: Data,
    val: Data,
    paths: RunPaths,
    /// Rank 0 is told to stop after this many steps.
    stop_rank0_after: Option<u64>,
    out: Option<&'a Captured>,
    model_seed: i64,
}

struct Outcome {
    summary: Summary,
    weights: Vec<(String, Tensor)>,
}

fn run_rank(job: &Job, rank: usize, world: usize, comm: Option<Box<dyn Collective>>) -> Result<Outcome, TrainError> {
    let net = seeded(job.model_seed + rank as i64, || model::build("mlp:32", CLASSES, &[FEATURES], Device::Cpu))?;
    let mut ddp = match comm {
        Some(c) => Ddp::new(net, c, job.config.ddp_options())?,
        None => Ddp::single(net, job.config.ddp_options())?,
    };
    let mut optimizer = ddp.build_optimizer(&job.config.optimizer_config())?;
    let (xs, ys) = copy(&job.train);
    let train = TensorBatches::training(xs, ys, job.config.batch_size, rank, world, job.config.seed)?;
    let (vx, vy) = copy(&job.val);
    let mut val = TensorBatches::evaluation(vx, vy, job.config.test_batch_size, rank, world)?;
    let schedule = job.config.schedule_for(job.config.total_steps(train.batches_per_epoch()))?;
    let stop = AtomicBool::new(false);
    let mut trainer = Trainer::new().with_progress_bar(false);
    if let Some(out) = job.out {
        trainer = trainer.with_metrics_writer(Box::new(out.clone()));
    }
    let mut train = StopAfter {
        inner: train,
        stop: &stop,
        pulled: 0,
        after: job.stop_rank0_after.filter(|_| rank == 0).unwrap_or(u64::MAX),
    };
    let summary = trainer.run(
        &mut ddp,
        optimizer.as_mut(),
        &schedule,
        &job.config,
        &mut train,
        Some(&mut val),
        &job.paths,
        &stop,
    )?;
    Ok(Outcome { summary, weights: deep_copy(&model::state_tensors(ddp.model())) })
}

/// Runs `job` on `world` ranks (world 1: a single process without a collective).
fn run(job: &Job, world: usize) -> Vec<Outcome> {
    if world == 1 {
        tch::set_num_threads(1);
        return vec![run_rank(job, 0, 1, None).unwrap()];
    }
    on_ranks(world, |rank, comm| run_rank(job, rank, world, Some(comm)).unwrap())
}

fn paths(dir: &Path) -> RunPaths {
    RunPaths {
        checkpoint_dir: Some(dir.join("checkpoints")),
        model_dir: Some(dir.join("model")),
        output_dir: Some(dir.join("output")),
        ..RunPaths::default()
    }
}

fn jsonl(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("output/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn config() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 16,
        test_batch_size: 25,
        lr: 0.05,
        momentum: 0.9,
        log_interval: 5,
        seed: 3,
        ..Default::default()
    }
}

#[test]
fn two_rank_training_on_separable_data_reaches_high_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job {
        config: config(),
        train: blobs(640, 1),
        val: blobs(201, 2),
        paths: paths(dir.path()),
        stop_rank0_after: None,
        out: None,
        model_seed: 5,
    };
    let outcomes = run(&job, 2);
    for o in &outcomes {
        let s = &o.summary;
        assert!(!s.stopped);
        assert_eq!(s.steps, 3 * 20, "3 epochs of 320 samples per rank in batches of 16");
        assert_eq!(s.samples, 3 * 640);
        assert_eq!(s.val_samples, 201);
        assert!(s.val_accuracy.unwrap() > 0.9, "val accuracy {:?}", s.val_accuracy);
        assert!(s.val_loss.unwrap() < 0.5, "val loss {:?}", s.val_loss);
    }
    assert_eq!(outcomes[0].summary.val_accuracy, outcomes[1].summary.val_accuracy);
    assert!(identical(&outcomes[0].weights, &outcomes[1].weights));
    // Each rank's peak host memory, in rank order, on every rank; the ranks here are threads of one process that
    // holds libtorch, so both slots carry that process's high-water mark, tens of MiB at least.
    let peaks = &outcomes[0].summary.peak_host_bytes;
    assert_eq!(peaks, &outcomes[1].summary.peak_host_bytes);
    assert_eq!(peaks.len(), 2);
    assert!(peaks.iter().all(|b| *b > 20 << 20), "implausible peaks {peaks:?}");
    let text = outcomes[0].summary.to_string();
    assert!(text.contains("peak host memory") && text.contains("MiB by rank:"), "{text}");

    let lines = jsonl(dir.path());
    let vals: Vec<_> = lines.iter().filter(|l| l.get("val_accuracy").is_some()).collect();
    assert_eq!(vals.len(), 3, "one evaluation per epoch");
    assert!(vals[2]["val_accuracy"].as_f64().unwrap() > 0.9);
    assert_eq!(vals[2]["epoch"], 3);
    let trains: Vec<_> = lines.iter().filter(|l| l.get("train_loss").is_some()).collect();
    assert_eq!(trains.len(), 60 / 5);
    let first = trains.first().unwrap()["train_loss"].as_f64().unwrap();
    let last = trains.last().unwrap()["train_loss"].as_f64().unwrap();
    assert!(last < first, "training loss fell: {first} -> {last}");

    assert_eq!(outcomes[0].summary.exported_to.as_deref(), Some(dir.path().join("model").as_path()));
    assert_eq!(outcomes[1].summary.exported_to, None, "only rank 0 exports");
    assert!(dir.path().join("model/model.safetensors").is_file());
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model/metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["num_classes"], CLASSES);
    assert_eq!(meta["input_shape"], serde_json::json!([FEATURES]));
    assert!(dir.path().join("checkpoints/ckpt-60").is_dir());
}

#[test]
fn validation_counts_every_sample_exactly_once() {
    let job = Job {
        config: TrainConfig { max_steps: Some(4), test_batch_size: 3, ..config() },
        train: blobs(300, 3),
        val: blobs(32, 4), // 32 = 3 * 10 + 2: ranks get 11, 11 and 10 samples, in 4, 4 and 4 batches
        paths: RunPaths::default(),
        stop_rank0_after: None,
        out: None,
        model_seed: 9,
    };
    let outcomes = run(&job, 3);
    // The reference, in one process: the trained model on the whole validation set.
    let net = seeded(1, || model::build("mlp:32", CLASSES, &[FEATURES], Device::Cpu).unwrap());
    model::load_state_tensors(net.as_ref(), &outcomes[0].weights).unwrap();
    let (vx, vy) = copy(&job.val);
    let logits = tch::no_grad(|| net.forward_t(&vx, false)).unwrap();
    let loss = hytrain_train::cross_entropy(&logits, &vy).unwrap().double_value(&[]);
    let accuracy = logits.argmax(-1, false).eq_tensor(&vy).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    for o in &outcomes {
        assert_eq!(o.summary.steps, 4);
        assert_eq!(o.summary.val_samples, 32);
        assert!((o.summary.val_loss.unwrap() - loss).abs() < 1e-5, "{:?} vs {loss}", o.summary.val_loss);
        assert!((o.summary.val_accuracy.unwrap() - accuracy).abs() < 1e-12);
    }
}

fn interrupted_and_resumed_matches_uninterrupted(world: usize) {
    interrupted_and_resumed_matches_uninterrupted_with(world, ShardMode::None);
}

fn interrupted_and_resumed_matches_uninterrupted_with(world: usize, shard: ShardMode) {
    let base = TrainConfig { checkpoint_every: Some(4), shard, ..config() };
    let make = |dir: &Path, stop: Option<u64>, model_seed: i64| Job {
        config: base.clone(),
        train: blobs(320, 6),
        val: blobs(40, 7),
        paths: paths(dir),
        stop_rank0_after: stop,
        out: None,
        model_seed,
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = run(&make(straight_dir.path(), None, 11), world);

    let dir = tempfile::tempdir().unwrap();
    let steps_per_epoch = 320 / world as u64 / 16;
    let k = steps_per_epoch + 3; // mid second epoch, between checkpoints
    let first = run(&make(dir.path(), Some(k), 11), world);
    for o in &first {
        assert!(o.summary.stopped);
        assert_eq!(o.summary.steps, k, "every rank stops at the step rank 0 was told to");
        assert_eq!(o.summary.exported_to, None, "a stopped run does not export");
    }
    assert!(dir.path().join(format!("checkpoints/ckpt-{k}")).is_dir());
    // Different initial weights: only the checkpoint can make the resumed run match.
    let resumed = run(&make(dir.path(), None, 99), world);
    for (r, s) in resumed.iter().zip(&straight) {
        assert_eq!(r.summary.resumed_from.as_deref(), Some(dir.path().join(format!("checkpoints/ckpt-{k}")).as_path()));
        assert_eq!(r.summary.steps, s.summary.steps);
        assert_eq!(r.summary.steps_run, s.summary.steps - k);
        assert!(identical(&r.weights, &s.weights), "resumed weights differ from the uninterrupted run's");
        assert_eq!(r.summary.val_loss, s.summary.val_loss);
    }
}

#[test]
fn interrupted_and_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one() {
    interrupted_and_resumed_matches_uninterrupted(1);
    interrupted_and_resumed_matches_uninterrupted(2);
}

/// Every rank takes part in gathering a sharded optimizer's state at each checkpoint; rank 0 writes it in DDP's
/// format, and a resumed sharded run cuts its blocks from it again.
#[test]
fn a_sharded_run_interrupted_and_resumed_ends_with_the_same_weights_as_an_uninterrupted_one() {
    interrupted_and_resumed_matches_uninterrupted_with(2, ShardMode::Gradients);
    interrupted_and_resumed_matches_uninterrupted_with(3, ShardMode::Optimizer);
}

#[test]
fn an_fp16_run_resumed_from_a_checkpoint_continues_with_the_saved_loss_scale() {
    let base = TrainConfig { checkpoint_every: Some(4), precision: Precision::Fp16, ..config() };
    let mut train = blobs(320, 6);
    // One sample far outside float16's range: the step whose batch holds it overflows, once per epoch.
    train.inputs[..FEATURES as usize].iter_mut().for_each(|x| *x = 1e6);
    let make = |dir: &Path, stop: Option<u64>, model_seed: i64| Job {
        config: base.clone(),
        train: train.clone(),
        val: blobs(40, 7),
        paths: paths(dir),
        stop_rank0_after: stop,
        out: None,
        model_seed,
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = run(&make(straight_dir.path(), None, 11), 2);
    let dir = tempfile::tempdir().unwrap();
    let k = 320 / 2 / 16 + 3; // past the first epoch's overflow
    let first = run(&make(dir.path(), Some(k), 11), 2);
    let resumed = run(&make(dir.path(), None, 99), 2);
    for ((s, f), r) in straight.iter().zip(&first).zip(&resumed) {
        assert_eq!(s.summary.skipped_steps, 3, "one overflow per epoch");
        assert!(f.summary.skipped_steps >= 1 && f.summary.loss_scale < Some(65536.0));
        assert_eq!(f.summary.skipped_steps + r.summary.skipped_steps, s.summary.skipped_steps);
        // Without the saved state the resumed run would start again at 2^16 and end at a larger scale.
        assert_eq!(r.summary.loss_scale, s.summary.loss_scale);
        assert_eq!(s.summary.loss_scale, Some(65536.0 / 8.0));
        assert!(identical(&r.weights, &s.weights), "resumed weights differ from the uninterrupted run's");
    }
}

#[test]
fn no_resume_starts_fresh_despite_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = Job {
        config: TrainConfig { max_steps: Some(6), ..config() },
        train: blobs(320, 6),
        val: blobs(40, 7),
        paths: paths(dir.path()),
        stop_rank0_after: None,
        out: None,
        model_seed: 1,
    };
    assert_eq!(run(&job, 1)[0].summary.steps_run, 6);
    job.config.no_resume = true;
    let again = &run(&job, 1)[0].summary;
    assert_eq!((again.steps_run, again.resumed_from.clone()), (6, None));
}

#[test]
fn metrics_lines_match_sagemaker_metric_regexes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Captured::default();
    let job = Job {
        config: TrainConfig { epochs: 2, ..config() },
        train: blobs(320, 8),
        val: blobs(50, 9),
        paths: paths(dir.path()),
        stop_rank0_after: None,
        out: Some(&out),
        model_seed: 2,
    };
    run(&job, 2);
    let text = out.text();
    let train_re = regex::Regex::new(r"train_loss=([0-9\.]+)").unwrap();
    let val_re = regex::Regex::new(r"val_accuracy=([0-9\.]+)").unwrap();
    let line_re =
        regex::Regex::new(r"^epoch=\d+ step=\d+ train_loss=[0-9.]+ lr=[0-9.]+ samples_per_sec=[0-9.]+$").unwrap();
    let val_line_re = regex::Regex::new(r"^epoch=\d+ val_loss=[0-9.]+ val_accuracy=[0-9.]+$").unwrap();
    let train_lines: Vec<&str> = text.lines().filter(|l| train_re.is_match(l)).collect();
    let val_lines: Vec<&str> = text.lines().filter(|l| val_re.is_match(l)).collect();
    // Only rank 0 writes: 2 epochs × 10 steps / log interval 5, and one evaluation per epoch.
    assert_eq!(train_lines.len(), 4, "{text}");
    assert_eq!(val_lines.len(), 2, "{text}");
    for l in &train_lines {
        assert!(line_re.is_match(l), "{l}");
        let loss: f64 = train_re.captures(l).unwrap()[1].parse().unwrap();
        assert!(loss.is_finite());
    }
    assert!(
        train_lines[0].starts_with("epoch=1 step=5 ") && train_lines[0].contains(" lr=0.05 "),
        "{}",
        train_lines[0]
    );
    for l in &val_lines {
        assert!(val_line_re.is_match(l), "{l}");
        let acc: f64 = val_re.captures(l).unwrap()[1].parse().unwrap();
        assert!((0.0..=1.0).contains(&acc), "accuracy is a fraction: {l}");
    }
    // The JSONL file holds the same records.
    let lines = jsonl(dir.path());
    assert_eq!(lines.len(), train_lines.len() + val_lines.len());
    assert_eq!(lines[0]["step"], 5);
    assert_eq!(lines[0]["lr"], 0.05);
}

/// A source that announces more batches than it yields.
struct Short(TensorBatches);

impl BatchSource for Short {
    fn epoch(&mut self, epoch: u64, start_batch: u64) -> Result<Batches<'_>, BatchError> {
        Ok(Box::new(self.0.epoch(epoch, start_batch)?.take(2)))
    }
    fn batches_per_epoch(&self) -> u64 {
        self.0.batches_per_epoch()
    }
}

#[test]
fn a_rank_whose_data_ends_early_fails_every_rank_instead_of_hanging() {
    let data = blobs(128, 10);
    let config = config();
    let errors = on_ranks(2, |rank, comm| {
        let net = seeded(1, || model::build("mlp:8", CLASSES, &[FEATURES], Device::Cpu)).unwrap();
        let mut ddp = Ddp::new(net, comm, config.ddp_options()).unwrap();
        let mut opt = config.optimizer_config().build(ddp.parameters()).unwrap();
        let (xs, ys) = copy(&data);
        let inner = TensorBatches::training(xs, ys, 16, rank, 2, 1).unwrap();
        let mut full;
        let mut short;
        let train: &mut dyn BatchSource = if rank == 1 {
            short = Short(inner);
            &mut short
        } else {
            full = inner;
            &mut full
        };
        let stop = AtomicBool::new(false);
        let schedule = hytrain_train::Schedule::Constant;
        let paths = RunPaths::default();
        let mut trainer = Trainer::new().with_progress_bar(false);
        trainer.run(&mut ddp, opt.as_mut(), &schedule, &config, train, None, &paths, &stop).unwrap_err().to_string()
    });
    assert!(errors[1].contains("ended after 2 batches") && errors[1].contains("announced 4"), "{}", errors[1]);
    assert!(errors[0].contains("another rank's training data"), "{}", errors[0]);
}

#[test]
fn an_epoch_shorter_than_grad_accum_is_refused() {
    let (xs, ys) = copy(&blobs(16, 11));
    let config = TrainConfig { grad_accum: 4, batch_size: 8, ..config() };
    let net = seeded(1, || model::build("mlp:8", CLASSES, &[FEATURES], Device::Cpu).unwrap());
    let mut ddp = Ddp::single(net, config.ddp_options()).unwrap();
    let mut opt = config.optimizer_config().build(ddp.parameters()).unwrap();
    let mut train = TensorBatches::training(xs, ys, 8, 0, 1, 1).unwrap();
    let stop = AtomicBool::new(false);
    let err = Trainer::new()
        .run(
            &mut ddp,
            opt.as_mut(),
            &hytrain_train::Schedule::Constant,
            &config,
            &mut train,
            None,
            &RunPaths::default(),
            &stop,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 batches per rank, fewer than grad-accum 4"), "{err}");
}

#[test]
fn training_shards_are_disjoint_equal_and_reshuffled_each_epoch() {
    let (xs, ys) =
        (Tensor::arange(10, (Kind::Float, Device::Cpu)).view([10, 1]), Tensor::zeros([10], (Kind::Int64, Device::Cpu)));
    let shards: Vec<TensorBatches> =
        (0..3).map(|r| TensorBatches::training(xs.copy(), ys.copy(), 2, r, 3, 7).unwrap()).collect();
    let e0: Vec<Vec<i64>> = shards.iter().map(|s| s.indices(0)).collect();
    let mut all: Vec<i64> = e0.concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 9, "3 ranks × 3 samples, none shared: {e0:?}");
    assert!(shards.iter().all(|s| s.batches_per_epoch() == 2));
    assert_ne!(e0[0], shards[0].indices(1), "epoch 1 has another order");
    assert_eq!(e0[0], TensorBatches::training(xs.copy(), ys.copy(), 2, 0, 3, 7).unwrap().indices(0));
    // Resuming mid-epoch yields the remaining batches of the same order.
    let mut s = TensorBatches::training(xs.copy(), ys.copy(), 2, 0, 3, 7).unwrap();
    let rest: Vec<Vec<f32>> =
        s.epoch(0, 1).unwrap().map(|b| Vec::<f32>::try_from(b.unwrap().0.view([-1])).unwrap()).collect();
    assert_eq!(rest, vec![vec![e0[0][2] as f32]]);
}

#[test]
fn evaluation_shards_cover_the_set_exactly_once() {
    let (xs, ys) =
        (Tensor::zeros([10, 1], (Kind::Float, Device::Cpu)), Tensor::zeros([10], (Kind::Int64, Device::Cpu)));
    let mut all: Vec<i64> =
        (0..3).flat_map(|r| TensorBatches::evaluation(xs.copy(), ys.copy(), 4, r, 3).unwrap().indices(0)).collect();
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
}

#[test]
fn mismatched_in_memory_data_is_refused() {
    let err = TensorBatches::training(
        Tensor::zeros([4, 2], (Kind::Float, Device::Cpu)),
        Tensor::zeros([3], (Kind::Int64, Device::Cpu)),
        2,
        0,
        1,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("do not pair up"), "{err}");
}

#[test]
fn a_checkpoint_of_another_model_fails_every_rank_with_rank_0s_reason() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job {
        config: TrainConfig { max_steps: Some(2), ..config() },
        train: blobs(128, 12),
        val: blobs(20, 13),
        paths: paths(dir.path()),
        stop_rank0_after: None,
        out: None,
        model_seed: 1,
    };
    run(&job, 1); // leaves ckpt-2 of mlp:32
    let data = blobs(128, 12);
    let config = TrainConfig { max_steps: Some(4), ..config() };
    let errors = on_ranks(2, |rank, comm| {
        let net = seeded(1, || model::build("mlp:8", CLASSES, &[FEATURES], Device::Cpu).unwrap());
        let mut ddp = Ddp::new(net, comm, config.ddp_options()).unwrap();
        let mut opt = config.optimizer_config().build(ddp.parameters()).unwrap();
        let (xs, ys) = copy(&data);
        let mut train = TensorBatches::training(xs, ys, 16, rank, 2, 1).unwrap();
        let stop = AtomicBool::new(false);
        let schedule = hytrain_train::Schedule::Constant;
        let mut trainer = Trainer::new().with_progress_bar(false);
        let paths = paths(dir.path());
        trainer
            .run(&mut ddp, opt.as_mut(), &schedule, &config, &mut train, None, &paths, &stop)
            .unwrap_err()
            .to_string()
    });
    for e in &errors {
        assert!(e.contains("checkpoints") && e.contains("shape"), "{e}");
    }
    assert_eq!(errors[0], errors[1], "every rank reports rank 0's reason");
}

/// Rank 0's checkpoint of step 2 goes to S3 (the local S3 server), whose answers are held back: both ranks still
/// train steps 3 and 4, exchanging gradients every step, so a checkpoint costs them only rank 0's host copy; rank 0
/// then waits at step 4's checkpoint for step 2's write (one in flight). A new run resumes from S3.
#[test]
fn ranks_train_on_while_rank_0s_checkpoint_uploads_and_a_new_run_resumes_from_s3() {
    let root = tempfile::tempdir().unwrap();
    let server = support::LocalS3::start(root.path());
    std::fs::create_dir_all(root.path().join("bkt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Captured::default();
    let make = |max_steps: u64, model_seed: i64| Job {
        config: TrainConfig { checkpoint_every: Some(2), max_steps: Some(max_steps), log_interval: 1, ..config() },
        train: blobs(320, 6),
        val: blobs(40, 7),
        paths: RunPaths { checkpoint_dir: Some("s3://bkt/run/ckpt".into()), s3: server.options(), ..paths(dir.path()) },
        stop_rank0_after: None,
        out: Some(&out),
        model_seed,
    };
    let job = make(6, 11);
    server.faults.inject("PutObject", support::Fault::Hold, usize::MAX);
    let first = std::thread::scope(|scope| {
        let running = scope.spawn(|| run(&job, 2));
        let started = std::time::Instant::now();
        while !out.text().contains(" step=4 ") {
            let waited = started.elapsed();
            assert!(waited < std::time::Duration::from_secs(120), "no step 4 while step 2 uploads:\n{}", out.text());
            assert!(!running.is_finished(), "the run ended early:\n{}", out.text());
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(server.faults.count("PutObject") >= 1, "step 2's checkpoint was not being uploaded");
        assert!(!root.path().join("bkt/run/ckpt/ckpt-2/meta.json").exists(), "step 2's upload was not held");
        server.faults.open_held();
        running.join().unwrap()
    });
    let last = first[0].summary.last_checkpoint.clone().expect("rank 0 wrote checkpoints");
    assert_eq!(last, Path::new("s3://bkt/run/ckpt/ckpt-6"));
    assert!(first[0].summary.checkpoint_secs > 0.0);
    assert_eq!(first[1].summary.last_checkpoint, None, "only rank 0 writes");

    let resumed = run(&make(8, 99), 2);
    for r in &resumed {
        assert_eq!(r.summary.resumed_from.as_deref(), Some(Path::new("s3://bkt/run/ckpt/ckpt-6")));
        assert_eq!((r.summary.steps, r.summary.steps_run), (8, 2));
    }
}

/// Runs `job` on 2 ranks whose collectives all fail at call `fail_at` with `fault` (`usize::MAX`: never): each
/// rank's result and how many collective calls it made.
fn run_failing(job: &Job, fail_at: usize, fault: Fault) -> Vec<(Result<Outcome, TrainError>, usize)> {
    on_ranks(2, |rank, comm| {
        let failing = FailingCollective::new(comm, fail_at, fault.clone());
        let calls = failing.calls();
        let result = run_rank(job, rank, 2, Some(Box::new(failing)));
        (result, calls.load(std::sync::atomic::Ordering::SeqCst))
    })
}

/// A rank lost (or silent past the collective timeout) at any collective of a run (in a step, between steps, right
/// after a checkpoint, in validation, in the final summary): every rank fails naming it, the checkpoint folder holds only whole checkpoints (a write in flight
/// is finished, not cut), and a restart ends with the weights of an unbroken run.
#[test]
fn a_rank_lost_at_any_collective_fails_every_rank_and_a_restart_ends_as_an_unbroken_run() {
    let make = |dir: &Path| Job {
        config: TrainConfig { checkpoint_every: Some(3), ..config() },
        train: blobs(320, 6),
        val: blobs(40, 7),
        paths: paths(dir),
        stop_rank0_after: None,
        out: None,
        model_seed: 11,
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let lost = Fault::RankLost { rank: 1 };
    let counted = run_failing(&make(straight_dir.path()), usize::MAX, lost.clone());
    let total = counted[0].1;
    assert_eq!(counted[1].1, total, "the ranks made different numbers of collective calls");
    let straight: Vec<Outcome> = counted.into_iter().map(|(r, _)| r.unwrap()).collect();
    let silent = Fault::Timeout { rank: 1 };
    let cases =
        [total / 7, total / 3, total / 2, total * 5 / 6, total - 2, total - 1].map(|at| (at, &lost, "lost rank 1"));
    for (fail_at, fault, says) in cases.into_iter().chain([(total / 4, &silent, "rank 1 was silent")]) {
        let dir = tempfile::tempdir().unwrap();
        for (result, calls) in run_failing(&make(dir.path()), fail_at, fault.clone()) {
            let err = result.err().unwrap_or_else(|| panic!("a run failing at call {fail_at} succeeded"));
            assert!(err.to_string().contains(says), "call {fail_at}: {err}");
            assert_eq!(calls, fail_at + 1, "call {fail_at}: a rank went on after the loss");
        }
        let leftovers: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints"))
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("ckpt-"))
            .collect();
        assert!(leftovers.is_empty(), "call {fail_at}: partial writes left: {leftovers:?}");
        let resumed = run(&make(dir.path()), 2);
        for (r, s) in resumed.iter().zip(&straight) {
            assert_eq!(r.summary.steps, s.summary.steps, "call {fail_at}");
            assert!(
                identical(&r.weights, &s.weights),
                "call {fail_at}: the restart's weights differ from an unbroken run's"
            );
        }
    }
}

/// Where [`a_read_failing_mid_way`] makes a read fail: in the second epoch, after a whole epoch of steps and an
/// evaluation.
#[derive(Clone, Copy, Debug)]
enum FailingRead {
    /// Rank 1's training data: the second shard read of epoch 2.
    Training,
    /// Rank 0's validation data: the evaluation after epoch 2.
    Validation,
}

/// The digits of `split` on `rank` of 2 through a [`FailingSource`] whose read `reads_after_open` after the
/// dataset is open fails, counted in epochs' worth of reads (`None`: never); each epoch reads every shard once, one
/// at a time.
fn digits_loader(split: &str, rank: usize, fail_after: Option<f64>, training: bool) -> hytrain_train::LoaderBatches {
    use hytrain_data::testing::{FailingSource, ReadFault};
    use hytrain_data::{Dataset, DatasetOptions, Loader, LoaderConfig, SamplerConfig};
    let dir: hytrain_data::source::SharedSource =
        Arc::new(hytrain_data::source::Dir::new(common::digits().join(split)).unwrap());
    // How many reads opening the dataset takes (the index, any shard it must count), so the fault lands after it.
    let counting = Arc::new(FailingSource::new(dir.clone(), usize::MAX, ReadFault::Io));
    Dataset::open(counting.clone(), &DatasetOptions::default()).unwrap();
    let opening = counting.reads().load(Ordering::SeqCst);
    let per_epoch = dir.list().unwrap().len() as f64;
    let fail_at = fail_after.map_or(usize::MAX, |epochs| opening + (epochs * per_epoch).round() as usize);
    let source = Arc::new(FailingSource::new(dir, fail_at, ReadFault::Io));
    let dataset = Arc::new(Dataset::open(source, &DatasetOptions::default()).unwrap());
    let config = LoaderConfig {
        batch_size: 32,
        workers: 1,
        // One shard read at a time, as the batches need it, so a failing read comes mid-epoch.
        prefetch_bytes: 1,
        sampler: SamplerConfig { seed: 5, world_size: 2, rank, ..SamplerConfig::default() },
        ..LoaderConfig::default()
    };
    if training {
        hytrain_train::LoaderBatches::training(Loader::new(dataset, config).unwrap(), 32)
    } else {
        hytrain_train::LoaderBatches::evaluation(dataset, config).unwrap()
    }
}

/// A read failing mid-way (a lost mount) on one rank: every rank stops with an error, the failing rank's naming
/// the object and the cause and the other's naming the rank whose data failed, and no rank applied an optimizer
/// step the other did not (the weights stay equal), so a restart from the last checkpoint is the whole recovery.
fn a_read_failing_mid_way(at: FailingRead) {
    let config = TrainConfig { epochs: 2, batch_size: 32, test_batch_size: 32, lr: 0.05, ..config() };
    let results = on_ranks(2, |rank, comm| {
        let net = seeded(1, || model::build("mlp:16", 10, &[1, 8, 8], Device::Cpu)).unwrap();
        let mut ddp = Ddp::new(net, comm, config.ddp_options()).unwrap();
        let mut opt = config.optimizer_config().build(ddp.parameters()).unwrap();
        let (train_fault, val_fault) = match at {
            // Training: 4 shards, so 1.25 epochs' reads is epoch 2's second; validation: 1 shard, so epoch 2's.
            FailingRead::Training if rank == 1 => (Some(1.25), None),
            FailingRead::Validation if rank == 0 => (None, Some(1.0)),
            _ => (None, None),
        };
        let mut train = digits_loader("train", rank, train_fault, true);
        let mut val = digits_loader("test", rank, val_fault, false);
        let stop = AtomicBool::new(false);
        let mut trainer = Trainer::new().with_progress_bar(false);
        let paths = RunPaths::default();
        let result = trainer.run(
            &mut ddp,
            opt.as_mut(),
            &hytrain_train::Schedule::Constant,
            &config,
            &mut train,
            Some(&mut val),
            &paths,
            &stop,
        );
        (result.map(|_| ()).map_err(|e| e.to_string()), deep_copy(ddp.parameters()))
    });
    let (failing, other) = match at {
        FailingRead::Training => (1, 0),
        FailingRead::Validation => (0, 1),
    };
    let failed = results[failing].0.as_ref().expect_err("the rank whose read failed must fail");
    assert!(
        failed.contains("cannot read shard-") && failed.contains("injected by FailingSource"),
        "the failing rank names the object and the cause: {failed}"
    );
    let when = match at {
        FailingRead::Training => "training batch 1 of epoch 2",
        FailingRead::Validation => "validation batch 1",
    };
    assert!(failed.starts_with(when), "the failure comes where it was injected ({when}): {failed}");
    let told = results[other].0.as_ref().expect_err("the other rank must fail too, not hang or go on alone");
    assert!(told.contains("another rank"), "the other rank says a peer's data failed: {told}");
    assert!(identical(&results[0].1, &results[1].1), "a rank stepped alone after the failure ({at:?})");
}

#[test]
fn a_training_read_failing_mid_run_stops_every_rank_with_equal_weights() {
    a_read_failing_mid_way(FailingRead::Training);
}

#[test]
fn a_validation_read_failing_stops_every_rank_with_equal_weights() {
    a_read_failing_mid_way(FailingRead::Validation);
}

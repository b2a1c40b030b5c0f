//! The identity promise: the same shards served from a folder, from S3 (s3s-fs, a real S3 protocol server, on
//! loopback) and through SageMaker Pipe FIFOs give every rank the same batch stream, byte for byte, for 1, 2 and 3
//! ranks over 2 epochs, with and without augmentation; and ranks see disjoint samples within an epoch.

use crate::support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hytrain_data::source::{Dir, OpenOptions, Pipe, PipeOptions, SharedSource, Source, S3};
use hytrain_data::{
    digest, pack, Batch, DatasetOptions, DigestArgs, Loader, LoaderConfig, PackInput, PackOptions, Remainder, Sampler,
    SamplerConfig,
};
use support::{mkfifo, LocalS3};

const EPOCHS: u64 = 2;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// CIFAR-10 fixture samples packed into one tar shard per sample (tiny shards, so shard shuffling matters).
fn shards() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let src: SharedSource = Arc::new(Dir::new(fixture("cifar-py2")).unwrap());
    let options = PackOptions {
        input: PackInput::Detect,
        out_dir: out.path().to_path_buf(),
        target_shard_bytes: 1,
        skip_bad_samples: false,
    };
    pack(src, &options).unwrap();
    out
}

fn args(world_size: usize, rank: usize, augment: bool) -> DigestArgs {
    DigestArgs {
        world_size,
        rank,
        epochs: EPOCHS,
        batch_size: 2,
        seed: 11,
        augment,
        workers: 2,
        ..DigestArgs::default()
    }
}

/// Digest through a Pipe channel: a writer thread plays SageMaker, streaming the folder's shards concatenated in
/// key order into `training_0`, then `training_1`.
fn pipe_digest(folder: &Path, args: &DigestArgs) -> String {
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let base = channel.path().join("training");
    let dir = Dir::new(folder).unwrap();
    let stream: Vec<u8> = dir.list().unwrap().iter().flat_map(|o| dir.read(&o.name).unwrap()).collect();
    let fifos: Vec<PathBuf> = (0..EPOCHS).map(|e| channel.path().join(format!("training_{e}"))).collect();
    for fifo in &fifos {
        mkfifo(fifo);
    }
    let writer = std::thread::spawn(move || {
        for fifo in fifos {
            let mut file = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            for piece in stream.chunks(4099) {
                file.write_all(piece).unwrap();
            }
        }
    });
    let options = PipeOptions {
        open_timeout: Duration::from_secs(30),
        stall_timeout: Duration::from_secs(30),
        spool_dir: Some(spool.path().to_path_buf()),
        max_spool_bytes: None,
        shard_sizes: None,
    };
    let hex = digest(Arc::new(Pipe::new(&base, &options)), args).unwrap();
    writer.join().unwrap();
    hex
}

#[test]
fn folder_s3_and_pipe_give_every_rank_identical_batches() {
    let packed = shards();
    let folder = packed.path().join("train");
    let s3_root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(s3_root.path());
    let dir = Dir::new(&folder).unwrap();
    let objects = dir.list().unwrap();
    assert!(objects.len() >= 5, "want several shards, got {}", objects.len());
    for o in &objects {
        server.put("datasets", &format!("cifar/train/{}", o.name), &dir.read(&o.name).unwrap());
    }
    let s3_options = OpenOptions { s3: server.options(), ..OpenOptions::default() };
    for world in 1..=3 {
        for augment in [false, true] {
            let mut per_rank = Vec::new();
            for rank in 0..world {
                let a = args(world, rank, augment);
                let from_folder = digest(Arc::new(Dir::new(&folder).unwrap()), &a).unwrap();
                let s3: SharedSource = Arc::new(S3::new("s3://datasets/cifar/train/", &s3_options.s3).unwrap());
                assert_eq!(digest(s3, &a).unwrap(), from_folder, "S3, world {world} rank {rank} augment {augment}");
                assert_eq!(pipe_digest(&folder, &a), from_folder, "Pipe, world {world} rank {rank} augment {augment}");
                per_rank.push(from_folder);
            }
            let distinct: BTreeSet<&String> = per_rank.iter().collect();
            assert_eq!(distinct.len(), world, "ranks must not share a batch stream");
        }
    }
    // Streaming order (Pipe mode's default) is a setting of the sampler, not of the source: the same from all.
    let mut per_rank = BTreeSet::new();
    for rank in 0..2 {
        let a = DigestArgs { stream_window: Some(3), ..args(2, rank, true) };
        let from_folder = digest(Arc::new(Dir::new(&folder).unwrap()), &a).unwrap();
        assert_ne!(from_folder, digest(Arc::new(Dir::new(&folder).unwrap()), &args(2, rank, true)).unwrap());
        assert_eq!(pipe_digest(&folder, &a), from_folder, "Pipe in streaming order, rank {rank}");
        per_rank.insert(from_folder);
    }
    assert_eq!(per_rank.len(), 2, "ranks must not share a batch stream");
}

#[test]
fn ranks_see_disjoint_samples_within_an_epoch() {
    let sizes = vec![1usize; 7];
    for world in 1..=3 {
        for epoch in 0..EPOCHS {
            let mut seen = BTreeSet::new();
            for rank in 0..world {
                let config = SamplerConfig {
                    seed: 11,
                    world_size: world,
                    rank,
                    remainder: Remainder::Drop,
                    ..SamplerConfig::default()
                };
                for s in Sampler::new(sizes.clone(), config).unwrap().epoch(epoch) {
                    assert!(seen.insert((s.shard, s.index)), "sample {s:?} seen twice in epoch {epoch}, world {world}");
                }
            }
            assert_eq!(seen.len(), 7 / world * world);
        }
    }
}

#[test]
fn token_files_from_a_folder_and_from_s3_give_every_rank_identical_batches() {
    let folder = tempfile::tempdir().unwrap();
    // llm.c's layout (header, uint16 ids) in two training shards, and nanoGPT's headerless val.bin.
    let shard = |first: u16| -> Vec<u8> {
        let mut header = [0i32; 256];
        header[..3].copy_from_slice(&[20240520, 1, 301]);
        let ids = (first..first + 301).flat_map(u16::to_le_bytes);
        header.iter().flat_map(|w| w.to_le_bytes()).chain(ids).collect()
    };
    std::fs::write(folder.path().join("corpus_train_000001.bin"), shard(0)).unwrap();
    std::fs::write(folder.path().join("corpus_train_000002.bin"), shard(1000)).unwrap();
    std::fs::write(folder.path().join("corpus_val_000000.bin"), shard(5000)).unwrap();
    let s3_root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(s3_root.path());
    let dir = Dir::new(folder.path()).unwrap();
    for o in dir.list().unwrap() {
        server.put("datasets", &format!("tokens/{}", o.name), &dir.read(&o.name).unwrap());
    }
    let s3_options = OpenOptions { s3: server.options(), ..OpenOptions::default() };
    for world in 1..=2 {
        let mut per_rank = BTreeSet::new();
        for rank in 0..world {
            let a = DigestArgs { context_length: Some(16), ..args(world, rank, false) };
            let from_folder = digest(Arc::new(Dir::new(folder.path()).unwrap()), &a).unwrap();
            let s3: SharedSource = Arc::new(S3::new("s3://datasets/tokens/", &s3_options.s3).unwrap());
            assert_eq!(digest(s3, &a).unwrap(), from_folder, "S3, world {world} rank {rank}");
            per_rank.insert(from_folder);
        }
        assert_eq!(per_rank.len(), world, "ranks must not share a batch stream");
    }
}

/// After the first pass (which must arrive whole: it tells every shard's sample count), an epoch in streaming order
/// (`stream_window`) starts as soon as the shards it reads first have arrived: here the second pass holds back its
/// last shards until the epoch's first batch is out. The batches are those a folder gives with the same settings.
#[test]
fn an_epoch_after_the_first_trains_before_its_pass_has_arrived() {
    let packed = shards();
    let dir = Dir::new(packed.path().join("train")).unwrap();
    let pieces: Vec<Vec<u8>> = dir.list().unwrap().iter().map(|o| dir.read(&o.name).unwrap()).collect();
    // One sample per shard and no sample mixing: the first batch's 2 samples are among the first 1 + 2 shards.
    assert!(pieces.len() >= 6, "want 6 shards or more, got {}", pieces.len());
    let config = LoaderConfig {
        batch_size: 2,
        workers: 2,
        sampler: SamplerConfig { stream_window: Some(2), shuffle_buffer: 1, ..SamplerConfig::default() },
        ..LoaderConfig::default()
    };
    let contents = |b: Batch| (b.inputs, b.targets);
    let folder = Loader::open(Arc::new(dir), &DatasetOptions::default(), config.clone()).unwrap();
    let expected: Vec<_> = folder.epoch(1).unwrap().map(|b| contents(b.unwrap())).collect();

    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let fifos: Vec<PathBuf> = (0..2).map(|e| channel.path().join(format!("training_{e}"))).collect();
    for fifo in &fifos {
        mkfifo(fifo);
    }
    let (release, held) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        std::fs::write(&fifos[0], pieces.concat()).unwrap();
        let mut file = std::fs::OpenOptions::new().write(true).open(&fifos[1]).unwrap();
        // Shard k is complete once shard k + 1 starts: shards 0..=2 are readable, the rest are not.
        file.write_all(&pieces[..4].concat()).unwrap();
        let _ = held.recv_timeout(Duration::from_secs(30));
        file.write_all(&pieces[4..].concat()).unwrap();
    });
    let options = PipeOptions {
        open_timeout: Duration::from_secs(30),
        stall_timeout: Duration::from_secs(5),
        spool_dir: Some(spool.path().to_path_buf()),
        max_spool_bytes: None,
        shard_sizes: None,
    };
    let source: SharedSource = Arc::new(Pipe::new(channel.path().join("training"), &options));
    let loader = Loader::open(source, &DatasetOptions::default(), config).unwrap();
    assert!(loader.epoch(0).unwrap().all(|b| b.is_ok()));
    let mut second = loader.epoch(1).unwrap();
    assert_eq!(contents(second.next().unwrap().unwrap()), expected[0], "the first batch, with the pass incomplete");
    release.send(()).unwrap();
    let rest: Vec<_> = second.map(|b| contents(b.unwrap())).collect();
    assert_eq!(rest, expected[1..]);
    writer.join().unwrap();
}

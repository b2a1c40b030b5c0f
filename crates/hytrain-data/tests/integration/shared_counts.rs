//! Sample counts taken once and shared (issue 15 item 2): a dataset opened with the counts another process took
//! reads no shard to count, so the processes of a host read a 64-shard S3 dataset without an index once, whatever
//! their number; counts that do not fit a shard are not trusted; the index a writable folder keeps is written
//! whole or not at all.

use crate::common;
use crate::support;

use std::sync::Arc;

use hytrain_data::format::{self, Dataset, ShardIndex, Split, INDEX_FILE};
use hytrain_data::source::{self, SharedSource};
use hytrain_data::{DatasetOptions, Loader, LoaderConfig, SamplerConfig};
use support::LocalS3;

const SHARDS: usize = 64;
const PER_SHARD: usize = 8;

/// 64 tar shards of 8 png samples under s3://data/ds/, and no index.
fn s3_dataset() -> (tempfile::TempDir, LocalS3) {
    let root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(root.path());
    for s in 0..SHARDS {
        let members: Vec<(String, Vec<u8>)> = (0..PER_SHARD)
            .flat_map(|i| {
                let key = format!("s{s}-{i}");
                [(format!("{key}.png"), common::png(i as u8, 8)), (format!("{key}.cls"), b"1".to_vec())]
            })
            .collect();
        let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        server.put("data", &format!("ds/shard-{s:06}.tar"), &common::tar(&refs));
    }
    (root, server)
}

fn s3_source(server: &LocalS3) -> SharedSource {
    let options = source::OpenOptions { s3: server.options(), ..source::OpenOptions::default() };
    source::open("s3://data/ds/", &options).unwrap()
}

fn loader(ds: Arc<Dataset>, world_size: usize, rank: usize) -> Loader {
    let config = LoaderConfig {
        batch_size: 4,
        workers: 1,
        // One shard read at a time: what a rank reads for its first batch stays small and countable.
        prefetch_bytes: 1,
        sampler: SamplerConfig { seed: 5, world_size, rank, shuffle_buffer: 8, ..SamplerConfig::default() },
        ..LoaderConfig::default()
    };
    Loader::new(ds, config).unwrap()
}

/// GETs served while the `world_size` processes of one host open the dataset (the first counting, the others
/// taking its counts), and by the time every one of them has its first batch.
fn gets_before_first_batch(world_size: usize) -> (usize, usize) {
    let (_root, server) = s3_dataset();
    let options = DatasetOptions::default();
    let first = Dataset::open(s3_source(&server), &options).unwrap();
    let counts = first.counts();
    let mut sets = vec![Arc::new(first)];
    for _ in 1..world_size {
        sets.push(Arc::new(Dataset::open_with_counts(s3_source(&server), &options, &counts).unwrap()));
    }
    let opening = server.faults.count("GetObject");
    for (rank, ds) in sets.into_iter().enumerate() {
        assert_eq!(ds.len(), SHARDS * PER_SHARD);
        let loader = loader(ds, world_size, rank);
        let batch = loader.epoch(0).unwrap().next().unwrap().unwrap();
        assert_eq!(batch.len(), 4);
    }
    (opening, server.faults.count("GetObject"))
}

#[test]
fn four_processes_of_a_host_read_a_64_shard_s3_dataset_without_an_index_once_like_one() {
    let (open_1, first_batch_1) = gets_before_first_batch(1);
    let (open_4, first_batch_4) = gets_before_first_batch(4);
    println!("GETs to open: {open_1} at 1 rank, {open_4} at 4; by every rank's first batch: {first_batch_1}, {first_batch_4}");
    assert_eq!(open_1, SHARDS, "one rank reads every shard once to count it");
    assert_eq!(open_4, open_1, "the other ranks of the host took the first one's counts");
    // Each rank still reads the shards of its own first batch, a few, never the dataset again.
    assert!(
        first_batch_4 - open_4 <= 4 * (first_batch_1 - open_1 + 2) && first_batch_4 < 2 * SHARDS,
        "{first_batch_4} GETs by the first batch of 4 ranks against {first_batch_1} for one"
    );
}

#[test]
fn counts_that_do_not_fit_a_shard_are_not_trusted_and_that_shard_is_counted() {
    let source: SharedSource = Arc::new(common::numbered_dataset(3, 5));
    let options = DatasetOptions::default();
    let reference = Dataset::open(source.clone(), &options).unwrap();
    let mut counts = reference.counts();
    assert_eq!(counts.shards.len(), 3);
    // Shard 0 changed size since they were taken, shard 1 is not listed, shard 2's counts are right but wrong.
    counts.shards[0].bytes += 512;
    counts.shards[0].samples = 99;
    counts.shards.remove(1);
    let ds = Dataset::open_with_counts(source, &options, &counts).unwrap();
    assert_eq!(ds.shard_sizes(), vec![5, 5, 5]);
    let lied = ShardIndex { shards: vec![format::IndexEntry { samples: 4, ..reference.counts().shards[2].clone() }] };
    let ds = Dataset::open_with_counts(Arc::new(common::numbered_dataset(3, 5)), &options, &lied).unwrap();
    assert_eq!(ds.shard_sizes(), vec![5, 5, 4]);
    // A count another process got wrong is caught when the shard is read, as for a shard rewritten mid-job.
    let e = ds.read_shard(2).unwrap_err().to_string();
    assert!(e.contains("holds 5 samples now but 4"), "{e}");
}

#[test]
fn shared_counts_with_skip_bad_samples_match_what_reading_the_shard_skips() {
    let mut m = common::numbered_dataset(2, 4);
    m.insert(
        "shard-000002.tar",
        common::tar(&[("x.png", b"no label"), ("y.png", &common::png(1, 8)), ("y.cls", b"1")]),
    );
    let source: SharedSource = Arc::new(m);
    let options = DatasetOptions { split: Split::Train, skip_bad_samples: true, ..DatasetOptions::default() };
    let counted = Dataset::open(source.clone(), &options).unwrap();
    assert_eq!(counted.skipped_at_open(), 1);
    let shared = Dataset::open_with_counts(source, &options, &counted.counts()).unwrap();
    assert_eq!(shared.shard_sizes(), vec![4, 4, 1]);
    assert_eq!(shared.read_shard(2).unwrap().len(), 1);
}

#[test]
fn an_index_is_written_whole_beside_the_data_and_a_folder_that_cannot_take_it_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let index = ShardIndex { shards: vec![format::IndexEntry { name: "train/a.tar".into(), bytes: 1024, samples: 3 }] };
    format::write_index(dir.path(), &index).unwrap();
    let written: ShardIndex = serde_json::from_slice(&std::fs::read(dir.path().join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(written, index);
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec![INDEX_FILE.to_string()], "nothing but the index is left");

    // Another writer's unfinished file: left alone, and nothing written.
    let busy = tempfile::tempdir().unwrap();
    std::fs::write(busy.path().join(".index.json.partial"), b"{").unwrap();
    let e = format::write_index(busy.path(), &index).unwrap_err().to_string();
    assert!(e.contains(".index.json.partial"), "{e}");
    assert!(!busy.path().join(INDEX_FILE).exists());
    assert_eq!(std::fs::read(busy.path().join(".index.json.partial")).unwrap(), b"{");

    // A folder that is not there.
    let e = format::write_index(&dir.path().join("missing"), &index).unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
}

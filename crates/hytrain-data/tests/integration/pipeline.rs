//! The loader and the digest: ranks read disjoint samples in equal numbers, results never depend on thread timing,
//! a resumed epoch continues, bad samples are skipped without changing the step count.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{fixture, numbered_dataset};
use hytrain_data::augment::Transform;
use hytrain_data::digest::digest_dataset;
use hytrain_data::format::{Dataset, OpenOptions, Split};
use hytrain_data::pipeline::Inputs;
use hytrain_data::source::SharedSource;
use hytrain_data::{digest, Batch, DigestArgs, Loader, LoaderConfig, MemorySource, Position, Remainder, SamplerConfig};

fn dataset(source: SharedSource) -> Arc<Dataset> {
    Arc::new(Dataset::open(source, &OpenOptions::default()).unwrap())
}

fn config(world_size: usize, rank: usize, batch_size: usize, workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        workers,
        prefetch_bytes: 1 << 20,
        transform: Transform::reference_train(),
        sampler: SamplerConfig { seed: 11, world_size, rank, shuffle_buffer: 10, ..SamplerConfig::default() },
    }
}

fn epoch(loader: &Loader, e: u64) -> Vec<Batch> {
    loader.epoch(e).unwrap().map(Result::unwrap).collect()
}

#[test]
fn ranks_read_disjoint_samples_in_equal_numbers_and_together_all_of_them() {
    let ds = dataset(Arc::new(numbered_dataset(5, 9))); // 45 samples
    for (world, remainder) in [(1, Remainder::Pad), (2, Remainder::Drop), (3, Remainder::Pad), (4, Remainder::Pad)] {
        let mut seen = HashSet::new();
        let mut counts = Vec::new();
        let mut batch_counts = Vec::new();
        for rank in 0..world {
            let mut c = config(world, rank, 4, 2);
            c.sampler.remainder = remainder;
            let loader = Loader::new(ds.clone(), c).unwrap();
            let batches = epoch(&loader, 1);
            batch_counts.push(batches.len());
            let labels: Vec<i64> = batches.iter().flat_map(|b| b.targets.clone()).collect();
            counts.push(labels.len());
            for l in labels {
                // With padding a few samples repeat on the last ranks; everything else is on one rank only.
                let fresh = seen.insert(l);
                assert!(fresh || remainder == Remainder::Pad, "sample {l} on two ranks (world {world})");
            }
        }
        assert!(counts.iter().all(|&c| c == counts[0]), "world {world}: {counts:?}");
        assert!(batch_counts.iter().all(|&c| c == batch_counts[0]), "same steps on every rank");
        match remainder {
            Remainder::Pad => assert_eq!(seen.len(), 45, "world {world} reads every sample"),
            Remainder::Drop => assert_eq!(seen.len(), 45 / world * world),
        }
    }
}

#[test]
fn batches_are_nchw_with_the_reference_normalization() {
    let loader = Loader::new(dataset(fixture("cifar-bin")), config(1, 0, 3, 2)).unwrap();
    let batches = epoch(&loader, 0);
    assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), vec![3, 3, 1]);
    let b = &batches[0];
    assert_eq!(b.shape, vec![3, 3, 32, 32]);
    assert_eq!(b.inputs.len(), 3 * 3 * 32 * 32);
    // Normalized pixels of [0, 255] lie within these bounds for the reference mean/std.
    let Inputs::Float(values) = &b.inputs else { panic!("image inputs are float") };
    assert!(values.iter().all(|v| (-2.5..=2.8).contains(v)));
    assert_eq!(b.position, Position { epoch: 0, samples: 3 });
    assert_eq!(batches[2].position, Position { epoch: 0, samples: 7 });
}

#[test]
fn worker_count_and_prefetch_cap_do_not_change_the_batches() {
    let ds = dataset(Arc::new(numbered_dataset(6, 7)));
    let reference = epoch(&Loader::new(ds.clone(), config(2, 1, 5, 1)).unwrap(), 3);
    for (workers, prefetch) in [(4, 1u64), (8, 1 << 30), (3, 900)] {
        let mut c = config(2, 1, 5, workers);
        c.prefetch_bytes = prefetch;
        assert_eq!(epoch(&Loader::new(ds.clone(), c).unwrap(), 3), reference, "{workers} workers, cap {prefetch}");
    }
}

#[test]
fn resumed_epoch_gives_the_remaining_batches_of_the_uninterrupted_one() {
    let ds = dataset(Arc::new(numbered_dataset(4, 10)));
    let loader = Loader::new(ds, config(2, 0, 4, 3)).unwrap();
    let full = epoch(&loader, 2);
    let stop_after = 2;
    let position = full[stop_after - 1].position;
    assert_eq!(position, Position { epoch: 2, samples: 8 });
    let rest: Vec<Batch> = loader.resume(position).unwrap().map(Result::unwrap).collect();
    assert_eq!(rest, full[stop_after..]);
}

#[test]
fn dropping_an_epoch_midway_stops_it_and_the_next_epoch_runs() {
    let ds = dataset(Arc::new(numbered_dataset(4, 10)));
    let loader = Loader::new(ds, config(1, 0, 2, 2)).unwrap();
    let mut e = loader.epoch(0).unwrap();
    let first = e.next().unwrap().unwrap();
    assert_eq!(e.position().samples, 2);
    drop(e);
    let again = epoch(&loader, 0);
    assert_eq!(again[0], first);
    assert_eq!(again.len(), 20);
}

#[test]
fn waiting_for_data_is_metered() {
    let loader = Loader::new(dataset(Arc::new(numbered_dataset(2, 5))), config(1, 0, 5, 1)).unwrap();
    assert_eq!(loader.data_wait(), std::time::Duration::ZERO);
    epoch(&loader, 0);
    assert!(loader.data_wait() > std::time::Duration::ZERO);
}

#[test]
fn a_bad_image_fails_the_epoch_naming_shard_and_member() {
    let mut m = numbered_dataset(2, 4);
    let bad = common::tar(&[("x.png", b"\x89PNG\r\n\x1a\nbroken"), ("x.cls", b"1")]);
    m.insert("shard-000002.tar", bad);
    let loader = Loader::new(dataset(Arc::new(m)), config(1, 0, 3, 2)).unwrap();
    let err = loader.epoch(0).unwrap().find_map(Result::err).expect("an error");
    let e = err.to_string();
    assert!(e.contains("shard-000002.tar") && e.contains("x.png") && e.contains("does not decode"), "{e}");
}

#[test]
fn skipped_bad_images_are_counted_and_every_rank_keeps_its_step_count() {
    let mut m = numbered_dataset(3, 4);
    let bad =
        common::tar(&[("x.png", b"\x89PNG\r\n\x1a\nbroken"), ("x.cls", b"1"), ("y.png", b"nope"), ("y.cls", b"2")]);
    m.insert("shard-000003.tar", bad);
    let ds = Arc::new(
        Dataset::open(
            Arc::new(m),
            &OpenOptions { split: Split::Train, skip_bad_samples: true, ..OpenOptions::default() },
        )
        .unwrap(),
    );
    let mut skipped = 0;
    for rank in 0..2 {
        let loader = Loader::new(ds.clone(), config(2, rank, 4, 2)).unwrap();
        let batches = epoch(&loader, 0);
        assert_eq!(batches.iter().map(Batch::len).sum::<usize>(), 7, "14 samples, 2 ranks");
        assert!(batches.iter().flat_map(|b| &b.targets).all(|&l| l < 12), "only good samples appear");
        skipped += loader.skipped();
    }
    assert_eq!(skipped, 2);
}

#[test]
fn digest_is_the_same_for_the_same_arguments_and_thread_counts() {
    let source: SharedSource = Arc::new(numbered_dataset(4, 6));
    let args = DigestArgs {
        world_size: 2,
        rank: 1,
        epochs: 2,
        batch_size: 4,
        seed: 5,
        augment: true,
        workers: 1,
        ..DigestArgs::default()
    };
    let a = digest(source.clone(), &args).unwrap();
    assert_eq!(a.len(), 64);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(digest(source.clone(), &args).unwrap(), a);
    assert_eq!(digest(source, &DigestArgs { workers: 6, ..args }).unwrap(), a);
}

#[test]
fn digest_differs_between_ranks_seeds_epochs_and_augmentation() {
    let ds = dataset(Arc::new(numbered_dataset(4, 6)));
    let args = DigestArgs {
        world_size: 2,
        rank: 0,
        epochs: 1,
        batch_size: 4,
        seed: 5,
        augment: false,
        workers: 2,
        ..DigestArgs::default()
    };
    let base = digest_dataset(ds.clone(), &args).unwrap();
    let variants = [
        DigestArgs { rank: 1, ..args.clone() },
        DigestArgs { seed: 6, ..args.clone() },
        DigestArgs { epochs: 2, ..args.clone() },
        DigestArgs { augment: true, ..args.clone() },
        DigestArgs { batch_size: 3, ..args.clone() },
    ];
    for v in variants {
        assert_ne!(digest_dataset(ds.clone(), &v).unwrap(), base, "{v:?}");
    }
}

#[test]
fn digest_of_a_dataset_is_the_same_from_every_cifar_layout() {
    let args = DigestArgs {
        world_size: 2,
        rank: 1,
        epochs: 2,
        batch_size: 2,
        seed: 1,
        augment: true,
        workers: 2,
        ..DigestArgs::default()
    };
    let reference = digest(fixture("cifar-bin"), &args).unwrap();
    for layout in ["cifar-py2", "cifar-py3", "cifar-py3-bytes", "cifar-py3-proto5"] {
        assert_eq!(digest(fixture(layout), &args).unwrap(), reference, "{layout}");
    }
}

#[test]
fn invalid_settings_are_errors() {
    let ds = dataset(Arc::new(numbered_dataset(1, 3)));
    let e = Loader::new(ds.clone(), config(2, 5, 2, 1)).unwrap_err().to_string();
    assert!(e.contains("rank 5"), "{e}");
    let e = Loader::new(ds, config(1, 0, 0, 1)).unwrap_err().to_string();
    assert!(e.contains("batch size"), "{e}");
    let e = digest(Arc::new(MemorySource::new("mem:none")), &DigestArgs::default()).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn images_of_different_sizes_in_one_batch_are_an_error_naming_the_member() {
    let small = common::png(1, 8);
    let big = common::png(2, 9);
    let shard = common::tar(&[("a.png", &small), ("a.cls", b"0"), ("b.png", &big), ("b.cls", b"1")]);
    let source = MemorySource::new("mem:sizes").with("s.tar", shard);
    let mut c = config(1, 0, 2, 1);
    c.sampler.shuffle = false;
    let loader = Loader::new(dataset(Arc::new(source)), c).unwrap();
    let e = loader.epoch(0).unwrap().next().unwrap().unwrap_err().to_string();
    assert!(e.contains("mem:sizes") && e.contains("s.tar") && e.contains("b.png") && e.contains("[3, 9, 9]"), "{e}");
}

#[test]
fn digest_from_a_directory_equals_digest_from_memory() {
    let dir = hytrain_data::source::Dir::new(common::fixtures().join("cifar-py2")).unwrap();
    let args = DigestArgs {
        world_size: 3,
        rank: 2,
        epochs: 2,
        batch_size: 2,
        seed: 9,
        augment: true,
        workers: 2,
        ..DigestArgs::default()
    };
    assert_eq!(digest(Arc::new(dir), &args).unwrap(), digest(fixture("cifar-py2"), &args).unwrap());
}

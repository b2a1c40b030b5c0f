//! The SageMaker Pipe source against real FIFOs: writer threads play SageMaker, delivering the channel's tar shards
//! concatenated in key order, once per epoch through `training_0`, `training_1`, ...

use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support;

use hytrain_data::source::{Dir, Pipe, PipeOptions, Source};
use hytrain_data::Error;
use support::mkfifo;

/// A tar shard of `samples` samples (`{key}.bin` + `{key}.cls`), as Python's tarfile writes it (padded to 10 KiB)
/// when `pad_to_record`, else as the tar crate writes it (end marker only).
fn shard(index: usize, samples: usize, pad_to_record: bool) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for s in 0..samples {
        let key = format!("{index:03}{s:04}");
        let data: Vec<u8> = (0..(s * 131 + index * 7) % 3000).map(|i| (i * 31 + s + index) as u8).collect();
        for (ext, bytes) in [("bin", data), ("cls", format!("{}", s % 10).into_bytes())] {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, format!("{key}.{ext}"), bytes.as_slice()).unwrap();
        }
    }
    let mut bytes = builder.into_inner().unwrap();
    if pad_to_record {
        bytes.resize(bytes.len().div_ceil(10240) * 10240, 0);
    }
    bytes
}

/// A dataset folder of tar shards; returns it with the shards' bytes in name order.
fn dataset() -> (tempfile::TempDir, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let mut shards = Vec::new();
    for i in 0..6 {
        let bytes = shard(i, 3 + i * 5, i % 2 == 0);
        std::fs::write(dir.path().join(format!("train-{i:04}.tar")), &bytes).unwrap();
        shards.push(bytes);
    }
    (dir, shards)
}

/// Plays SageMaker for one epoch: opens the FIFO for writing (blocking until the reader opens it) and writes
/// `stream` in uneven pieces.
fn deliver(fifo: PathBuf, stream: Vec<u8>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        for piece in stream.chunks(7001) {
            file.write_all(piece).unwrap();
        }
    })
}

fn fast(spool: &Path) -> PipeOptions {
    PipeOptions {
        open_timeout: Duration::from_secs(20),
        stall_timeout: Duration::from_secs(20),
        spool_dir: Some(spool.to_path_buf()),
        max_spool_bytes: None,
        shard_sizes: None,
    }
}

#[test]
fn each_epoch_fifo_delivers_the_folders_shards_byte_identical_in_order() {
    let (data, shards) = dataset();
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let base = channel.path().join("training");
    let dir = Dir::new(data.path()).unwrap();
    let dir_objects = dir.list().unwrap();
    let stream: Vec<u8> = dir_objects.iter().flat_map(|o| dir.read(&o.name).unwrap()).collect();
    assert_eq!(stream, shards.concat());
    let pipe = Pipe::new(&base, &fast(spool.path()));
    for epoch in 0..2u64 {
        let fifo = channel.path().join(format!("training_{epoch}"));
        mkfifo(&fifo);
        let writer = deliver(fifo, stream.clone());
        pipe.begin_epoch(epoch).unwrap();
        writer.join().unwrap();
        let objects = pipe.list().unwrap();
        assert_eq!(objects.len(), dir_objects.len());
        for (i, (from_pipe, from_dir)) in objects.iter().zip(&dir_objects).enumerate() {
            assert_eq!(from_pipe.name, format!("pipe-{i:06}.tar"));
            assert_eq!(from_pipe.size, from_dir.size);
            assert_eq!(
                pipe.read(&from_pipe.name).unwrap(),
                dir.read(&from_dir.name).unwrap(),
                "epoch {epoch} shard {i}"
            );
        }
        // Beginning the same epoch again reads nothing new.
        pipe.begin_epoch(epoch).unwrap();
        // One epoch spooled at a time: the previous epoch's folder is gone.
        assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 1);
    }
    assert!(pipe.read("train-0000.tar").is_err());
}

#[test]
fn listing_before_the_first_epoch_reads_fifo_0_and_the_first_epoch_adopts_it() {
    let (data, shards) = dataset();
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let fifo = channel.path().join("train_0");
    mkfifo(&fifo);
    let writer = deliver(fifo, shards.concat());
    let opts = PipeOptions { open_timeout: Duration::from_millis(300), ..fast(spool.path()) };
    let pipe = Pipe::new(channel.path().join("train"), &opts);
    assert_eq!(pipe.list().unwrap().len(), 6);
    writer.join().unwrap();
    // A resumed job's first epoch may be 7: it still uses what FIFO 0 delivered, and opens no FIFO.
    pipe.begin_epoch(7).unwrap();
    assert_eq!(pipe.read("pipe-000005.tar").unwrap(), std::fs::read(data.path().join("train-0005.tar")).unwrap());
    // The next epoch needs train_1, which never comes.
    let err = pipe.begin_epoch(8).unwrap_err().to_string();
    assert!(err.contains("train_1") && err.contains("did not appear"), "{err}");
}

#[test]
fn a_missing_fifo_times_out_with_an_error_naming_it() {
    let channel = tempfile::tempdir().unwrap();
    let opts = PipeOptions { open_timeout: Duration::from_millis(400), ..PipeOptions::default() };
    let pipe = Pipe::new(channel.path().join("training"), &opts);
    let started = Instant::now();
    let err = pipe.begin_epoch(0).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(matches!(err, Error::Path { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("training_0") && text.contains("did not appear within") && text.contains("Pipe"), "{text}");
}

#[test]
fn a_fifo_no_one_writes_to_stalls_into_a_clear_error() {
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    mkfifo(&channel.path().join("training_0"));
    let opts = PipeOptions { stall_timeout: Duration::from_millis(400), ..fast(spool.path()) };
    let started = Instant::now();
    let err = Pipe::new(channel.path().join("training"), &opts).list().unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(err.contains("training_0") && err.contains("no data from the Pipe FIFO"), "{err}");
}

#[test]
fn a_stream_that_is_not_tar_shards_is_refused() {
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let fifo = channel.path().join("training_0");
    mkfifo(&fifo);
    let writer = deliver(fifo, b"\x80\x02}q\x00(X\x05\x00\x00\x00cifar pickle, not tar".repeat(100));
    let err = Pipe::new(channel.path().join("training"), &fast(spool.path())).list().unwrap_err().to_string();
    writer.join().unwrap();
    assert!(err.contains("training_0") && err.contains("tar shards only"), "{err}");
}

#[test]
fn a_stream_cut_inside_a_shard_is_reported_as_truncated() {
    let (_data, shards) = dataset();
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let fifo = channel.path().join("training_0");
    mkfifo(&fifo);
    let stream = shards.concat();
    let writer = deliver(fifo, stream[..shards[0].len() + 1000].to_vec());
    let err = Pipe::new(channel.path().join("training"), &fast(spool.path())).list().unwrap_err().to_string();
    writer.join().unwrap();
    assert!(err.contains("shard 1") && err.contains("truncated"), "{err}");
}

#[test]
fn an_epoch_larger_than_the_spool_limit_fails_naming_the_limit() {
    let (_data, shards) = dataset();
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let fifo = channel.path().join("training_0");
    mkfifo(&fifo);
    let writer = std::thread::spawn({
        let stream = shards.concat();
        // The reader stops early; a broken pipe on this side is expected.
        move || {
            let mut file = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            let _ = file.write_all(&stream);
        }
    });
    let opts = PipeOptions { max_spool_bytes: Some(20_000), ..fast(spool.path()) };
    let err = Pipe::new(channel.path().join("training"), &opts).list().unwrap_err().to_string();
    writer.join().unwrap();
    assert!(err.contains("spool limit of 20000 bytes"), "{err}");
}

#[test]
fn an_empty_stream_is_an_empty_source() {
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let fifo = channel.path().join("training_0");
    mkfifo(&fifo);
    let writer = deliver(fifo, Vec::new());
    let err = Pipe::new(channel.path().join("training"), &fast(spool.path())).list().unwrap_err();
    writer.join().unwrap();
    assert!(matches!(err, Error::Empty(_)), "{err:?}");
    assert!(err.to_string().contains("training_0"), "{err}");
}

/// Plays SageMaker for one pass that holds back its last shard until `release` says so (or 30 s pass).
fn deliver_held(fifo: PathBuf, shards: Vec<Vec<u8>>, release: std::sync::mpsc::Receiver<()>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let (last, first) = shards.split_last().unwrap();
        file.write_all(&first.concat()).unwrap();
        let _ = release.recv_timeout(Duration::from_secs(30));
        file.write_all(last).unwrap();
    })
}

#[test]
fn a_later_pass_serves_its_first_shards_while_the_rest_is_still_arriving() {
    let (data, shards) = dataset();
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let base = channel.path().join("training");
    let opts = PipeOptions { stall_timeout: Duration::from_secs(5), ..fast(spool.path()) };
    let pipe = Pipe::new(&base, &opts);
    mkfifo(&channel.path().join("training_0"));
    let writer = deliver(channel.path().join("training_0"), shards.concat());
    pipe.begin_epoch(0).unwrap();
    assert_eq!(pipe.list().unwrap().len(), shards.len());
    writer.join().unwrap();

    mkfifo(&channel.path().join("training_1"));
    let (release, held) = std::sync::mpsc::channel();
    let writer = deliver_held(channel.path().join("training_1"), shards.clone(), held);
    // The pass is not complete (its last shard is held back), yet the epoch starts and its first shards read.
    pipe.begin_epoch(1).unwrap();
    for (i, shard) in shards[..shards.len() - 2].iter().enumerate() {
        let name = format!("pipe-{i:06}.tar");
        assert_eq!(&pipe.read(&name).unwrap(), shard, "shard {i} while the pass is still arriving");
    }
    assert_eq!(pipe.list().unwrap().len(), shards.len(), "the listing is the first pass's");
    release.send(()).unwrap();
    let last = format!("pipe-{:06}.tar", shards.len() - 1);
    assert_eq!(pipe.read(&last).unwrap(), std::fs::read(data.path().join("train-0005.tar")).unwrap());
    writer.join().unwrap();
    // Still one spool folder: the first pass's was deleted before the second filled.
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 1);
}

#[test]
fn a_later_pass_that_differs_from_the_first_fails_naming_the_shard() {
    let (_data, shards) = dataset();
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let pipe = Pipe::new(channel.path().join("training"), &fast(spool.path()));
    let mut changed = shards.clone();
    changed[2] = shard(2, 4, true);
    assert_ne!(changed[2].len(), shards[2].len());
    let passes = [shards.concat(), changed.concat(), shards[..5].concat()];
    for (n, stream) in passes.into_iter().enumerate() {
        let fifo = channel.path().join(format!("training_{n}"));
        mkfifo(&fifo);
        let writer = std::thread::spawn(move || {
            // The reader stops at the difference; a broken pipe on this side is expected.
            let mut file = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            let _ = file.write_all(&stream);
        });
        let opened = pipe.begin_epoch(n as u64);
        match n {
            0 => {
                opened.unwrap();
                assert_eq!(pipe.read("pipe-000002.tar").unwrap(), shards[2]);
            }
            1 => {
                opened.unwrap();
                assert_eq!(pipe.read("pipe-000001.tar").unwrap(), shards[1], "shards before the difference serve");
                let err = pipe.read("pipe-000002.tar").unwrap_err().to_string();
                assert!(
                    err.contains("training_1") && err.contains("shard 2 is") && err.contains("were expected"),
                    "{err}"
                );
                assert!(err.contains("must deliver the same shards"), "{err}");
            }
            _ => {
                // Opening the next FIFO reports the previous pass's failure first; the one after that reads on.
                let err = opened.unwrap_err().to_string();
                assert!(err.contains("training_1") && err.contains("shard 2 is"), "{err}");
                pipe.begin_epoch(n as u64).unwrap();
                let err = pipe.read("pipe-000005.tar").unwrap_err().to_string();
                assert!(
                    err.contains("training_2") && err.contains("delivered 5 shards where 6 were expected"),
                    "{err}"
                );
            }
        }
        writer.join().unwrap();
    }
}

#[test]
fn with_the_shard_sizes_known_the_first_pass_streams_too_and_is_checked_against_them() {
    let (_data, shards) = dataset();
    let channel = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let sizes: Vec<u64> = shards.iter().map(|s| s.len() as u64).collect();
    let opts =
        PipeOptions { shard_sizes: Some(sizes.clone()), stall_timeout: Duration::from_secs(5), ..fast(spool.path()) };
    let pipe = Pipe::new(channel.path().join("training"), &opts);
    // Listed before any FIFO exists: nothing is waited for.
    let listed = pipe.list().unwrap();
    assert_eq!(listed.iter().map(|o| o.size).collect::<Vec<_>>(), sizes);
    assert_eq!(listed[3].name, "pipe-000003.tar");

    mkfifo(&channel.path().join("training_0"));
    let (release, held) = std::sync::mpsc::channel();
    let writer = deliver_held(channel.path().join("training_0"), shards.clone(), held);
    pipe.begin_epoch(0).unwrap();
    assert_eq!(pipe.read("pipe-000000.tar").unwrap(), shards[0], "the first pass's first shard, while it arrives");
    release.send(()).unwrap();
    assert_eq!(pipe.read("pipe-000005.tar").unwrap(), shards[5]);
    writer.join().unwrap();

    // Sizes that are not the channel's: the first pass fails naming the shard.
    let mut wrong = sizes;
    wrong[1] += 512;
    let channel = tempfile::tempdir().unwrap();
    let pipe =
        Pipe::new(channel.path().join("training"), &PipeOptions { shard_sizes: Some(wrong), ..fast(spool.path()) });
    mkfifo(&channel.path().join("training_0"));
    let stream = shards.concat();
    let fifo = channel.path().join("training_0");
    let writer = std::thread::spawn(move || {
        // The reader stops at the difference; a broken pipe on this side is expected.
        let mut file = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let _ = file.write_all(&stream);
    });
    pipe.begin_epoch(0).unwrap();
    let err = pipe.read("pipe-000004.tar").unwrap_err().to_string();
    writer.join().unwrap();
    assert!(err.contains("training_0") && err.contains("shard 1 is") && err.contains("were expected"), "{err}");
}

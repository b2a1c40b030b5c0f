//! Entry points for the fuzz targets (`fuzz/`) and the tests that replay their corpus: the format readers run on
//! arbitrary bytes. Each must return (an error is fine) without panicking, hanging or allocating more than the
//! bytes justify. Not API.

use crate::format::{cifar, npy, tar};
use crate::source::tar_split::{ShardSink, TarSplitter};

/// Counts what the Pipe splitter hands on, keeping no bytes.
#[derive(Default)]
struct Count {
    shards: usize,
    bytes: usize,
}

impl ShardSink for Count {
    fn start(&mut self, _: usize) -> std::io::Result<()> {
        self.shards += 1;
        Ok(())
    }
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.bytes += bytes.len();
        Ok(())
    }
    fn end(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A WebDataset shard: split as a SageMaker Pipe stream (in uneven pieces, as a FIFO delivers them), parsed
/// strictly and with bad samples skipped, and every sample it yields decoded (png/jpeg/npy). Returns the number
/// of samples that decoded.
pub fn webdataset_shard(bytes: &[u8]) -> usize {
    let mut splitter = TarSplitter::new();
    let mut sink = Count::default();
    if bytes.chunks(777).try_for_each(|piece| splitter.push(piece, &mut sink)).is_ok() {
        let _ = splitter.finish(&mut sink);
    }
    // The splitter passes bytes through; it never invents any.
    assert!(sink.bytes <= bytes.len(), "the splitter wrote {} of {} bytes", sink.bytes, bytes.len());
    let mut decoded = 0;
    for skip_bad in [false, true] {
        if let Ok((samples, _)) = tar::parse(bytes, "fuzz", "shard.tar", skip_bad) {
            decoded += samples.iter().filter(|s| s.decode("fuzz", "shard.tar").is_ok()).count();
        }
    }
    decoded
}

/// An `.npy` member. Returns whether it parsed.
pub fn npy(bytes: &[u8]) -> bool {
    npy::parse(bytes).is_ok()
}

/// A CIFAR python batch (a pickle) and, for the same bytes, the binary layout. Returns the number of samples
/// the pickle held.
pub fn cifar(bytes: &[u8]) -> usize {
    let _ = cifar::parse_bin(bytes, "fuzz", "data_batch_1.bin");
    cifar::parse_py(bytes, "fuzz", "data_batch_1").map_or(0, |s| s.len())
}

//! Splits a stream of concatenated tar archives (what a SageMaker Pipe channel of tar shards delivers) back into the
//! archives, byte for byte.
//!
//! A tar archive is 512-byte blocks: a header, `ceil(size / 512)` data blocks, the next header, ..., then at least
//! two zero blocks (the end-of-archive marker), padded with more zero blocks to the writer's record size (10 KiB
//! for GNU tar and Python's tarfile). The splitter follows headers and sizes, so zero blocks inside a member's data
//! are never mistaken for the end; after the marker, zero blocks belong to the archive that just ended (so every
//! shard comes out identical to its file), and the next non-zero block must be the next archive's first header.

/// Receives the shards the splitter finds.
pub(crate) trait ShardSink {
    /// A new shard (number `index`, counting from 0) starts.
    fn start(&mut self, index: usize) -> std::io::Result<()>;
    /// The next bytes of the current shard.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// The current shard is complete.
    fn end(&mut self) -> std::io::Result<()>;
}

/// Why a stream cannot be split.
#[derive(Debug)]
pub(crate) enum SplitError {
    /// The sink failed (e.g. the spool disk is full).
    Sink(std::io::Error),
    /// The stream is not tar, or is damaged.
    Format(String),
}

impl From<std::io::Error> for SplitError {
    fn from(io: std::io::Error) -> Self {
        Self::Sink(io)
    }
}

const BLOCK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first archive: leading zero blocks are ignored.
    Start,
    /// Inside an archive, expecting a header (or the end marker).
    Header,
    /// Inside a member's data, this many blocks still to come.
    Data(u64),
    /// One zero block seen where a header was expected.
    OneZero,
    /// After the end-of-archive marker: zero padding, or the next archive.
    Ended,
}

/// The streaming splitter: feed it bytes with [`TarSplitter::push`], then call [`TarSplitter::finish`].
pub(crate) struct TarSplitter {
    state: State,
    block: [u8; BLOCK],
    filled: usize,
    /// Shards started so far.
    shards: usize,
    /// Byte offset of the stream at the start of `block`, for messages.
    offset: u64,
}

impl TarSplitter {
    pub(crate) fn new() -> Self {
        Self { state: State::Start, block: [0; BLOCK], filled: 0, shards: 0, offset: 0 }
    }

    /// Feeds the next bytes of the stream.
    pub(crate) fn push(&mut self, mut bytes: &[u8], sink: &mut impl ShardSink) -> Result<(), SplitError> {
        while !bytes.is_empty() {
            // Whole data blocks go straight through, without copying them block by block.
            if let (State::Data(n), 0) = (self.state, self.filled) {
                let whole = (bytes.len() / BLOCK).min(usize::try_from(n).unwrap_or(usize::MAX));
                if whole > 0 {
                    let len = whole * BLOCK;
                    sink.write(&bytes[..len])?;
                    self.offset += len as u64;
                    let left = n - whole as u64;
                    self.state = if left == 0 { State::Header } else { State::Data(left) };
                    bytes = &bytes[len..];
                    continue;
                }
            }
            let take = (BLOCK - self.filled).min(bytes.len());
            self.block[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == BLOCK {
                self.filled = 0;
                self.on_block(sink)?;
                self.offset += BLOCK as u64;
            }
        }
        Ok(())
    }

    fn on_block(&mut self, sink: &mut impl ShardSink) -> Result<(), SplitError> {
        let zero = self.block.iter().all(|&b| b == 0);
        match self.state {
            State::Data(n) => {
                sink.write(&self.block)?;
                self.state = if n == 1 { State::Header } else { State::Data(n - 1) };
            }
            State::Start if zero => {}
            State::Header | State::OneZero if zero => {
                sink.write(&self.block)?;
                self.state = if self.state == State::Header { State::OneZero } else { State::Ended };
            }
            State::Ended if zero => sink.write(&self.block)?,
            State::Start | State::Ended | State::Header | State::OneZero => {
                let data_blocks = header_data_blocks(&self.block).ok_or_else(|| {
                    SplitError::Format(format!(
                        "byte {} of the stream{} is not a tar header; Pipe mode reads WebDataset tar shards only \
                         (use File or FastFile mode for other formats)",
                        self.offset,
                        if self.shards > 0 { format!(" (after shard {})", self.shards - 1) } else { String::new() }
                    ))
                })?;
                if matches!(self.state, State::Start | State::Ended) {
                    if self.state == State::Ended {
                        sink.end()?;
                    }
                    sink.start(self.shards)?;
                    self.shards += 1;
                }
                sink.write(&self.block)?;
                self.state = if data_blocks == 0 { State::Header } else { State::Data(data_blocks) };
            }
        }
        Ok(())
    }

    /// The stream ended: closes the last shard, or reports where it was cut off.
    pub(crate) fn finish(self, sink: &mut impl ShardSink) -> Result<(), SplitError> {
        let cut = |what: &str| {
            SplitError::Format(format!(
                "the stream ended {what} at byte {} (shard {}); the Pipe stream was cut off or a shard is truncated",
                self.offset + self.filled as u64,
                self.shards.saturating_sub(1)
            ))
        };
        if self.filled != 0 {
            return Err(cut("inside a 512-byte block"));
        }
        match self.state {
            State::Data(_) => Err(cut("inside a member's data")),
            State::Start => Ok(()),
            // A last archive without its end marker still holds whole members; the tar reader above decides.
            State::Header | State::OneZero | State::Ended => Ok(sink.end()?),
        }
    }
}

/// The number of data blocks after a valid tar header, or `None` when `block` is not a tar header.
fn header_data_blocks(block: &[u8; BLOCK]) -> Option<u64> {
    let stored = parse_octal(&block[148..156])?;
    let unsigned: u64 =
        block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    let signed: i64 =
        block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { i64::from(b as i8) }).sum();
    if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
        return None;
    }
    // Links, folders, devices and FIFOs carry no data whatever their size field says (as tar readers treat them).
    if matches!(block[156], b'1' | b'2' | b'3' | b'4' | b'5' | b'6') {
        return Some(0);
    }
    let size = if block[124] & 0x80 != 0 {
        // GNU base-256 for sizes of 8 GiB and more.
        block[125..136].iter().fold(0u64, |acc, &b| acc.saturating_mul(256) | u64::from(b))
    } else {
        parse_octal(&block[124..136])?
    };
    Some(size.div_ceil(BLOCK as u64))
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = field.iter().take_while(|&&b| b != 0).copied().collect::<Vec<u8>>();
    let text = std::str::from_utf8(&text).ok()?.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Default)]
    struct Collect {
        shards: Vec<Vec<u8>>,
        open: bool,
    }

    impl ShardSink for Collect {
        fn start(&mut self, index: usize) -> std::io::Result<()> {
            assert!(!self.open);
            assert_eq!(index, self.shards.len());
            self.shards.push(Vec::new());
            self.open = true;
            Ok(())
        }
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            assert!(self.open);
            self.shards.last_mut().unwrap().extend_from_slice(bytes);
            Ok(())
        }
        fn end(&mut self) -> std::io::Result<()> {
            assert!(self.open);
            self.open = false;
            Ok(())
        }
    }

    /// A tar archive of `members` (name, content), padded with `pad` extra zero blocks after the end marker.
    fn archive(members: &[(String, Vec<u8>)], pad: usize) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, data.as_slice()).unwrap();
        }
        let mut bytes = builder.into_inner().unwrap();
        bytes.resize(bytes.len() + pad * BLOCK, 0);
        bytes
    }

    fn split(stream: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, SplitError> {
        let mut sink = Collect::default();
        let mut splitter = TarSplitter::new();
        for piece in stream.chunks(chunk.max(1)) {
            splitter.push(piece, &mut sink)?;
        }
        splitter.finish(&mut sink)?;
        assert!(!sink.open);
        Ok(sink.shards)
    }

    fn member() -> impl Strategy<Value = (String, Vec<u8>)> {
        // Data made mostly of zero bytes, so whole zero blocks inside members are common.
        ("[a-z]{1,8}\\.(cls|png)", prop::collection::vec(prop_oneof![3 => Just(0u8), 1 => any::<u8>()], 0..2000))
    }

    proptest! {
        #[test]
        fn concatenated_archives_split_back_byte_identical(
            archives in prop::collection::vec((prop::collection::vec(member(), 1..5), 0usize..20), 1..5),
            chunk in 1usize..3000,
        ) {
            let originals: Vec<Vec<u8>> = archives.iter().map(|(m, pad)| archive(m, *pad)).collect();
            let stream = originals.concat();
            let shards = split(&stream, chunk).unwrap();
            prop_assert_eq!(shards, originals);
        }
    }

    #[test]
    fn a_member_of_zero_blocks_is_not_taken_for_the_end_marker() {
        let a = archive(&[("zeros.npy".into(), vec![0; 4096]), ("x.cls".into(), b"3".to_vec())], 0);
        let b = archive(&[("y.cls".into(), b"4".to_vec())], 18);
        assert_eq!(split(&[a.clone(), b.clone()].concat(), 512).unwrap(), [a, b]);
    }

    #[test]
    fn a_stream_that_is_not_tar_is_refused_naming_pipe_mode_limits() {
        let Err(SplitError::Format(msg)) = split(&[b'P'; 4096], 700) else { panic!("accepted non-tar") };
        assert!(msg.contains("byte 0") && msg.contains("tar shards only"), "{msg}");
    }

    #[test]
    fn garbage_between_archives_names_the_shard_before_it() {
        let a = archive(&[("x.cls".into(), b"1".to_vec())], 0);
        let Err(SplitError::Format(msg)) = split(&[a.clone(), vec![7; 512]].concat(), 512) else { panic!() };
        assert!(msg.contains(&format!("byte {}", a.len())) && msg.contains("after shard 0"), "{msg}");
    }

    #[test]
    fn a_stream_cut_inside_a_member_is_reported_as_truncated() {
        let a = archive(&[("big.npy".into(), vec![1; 5000])], 0);
        for cut in [700, 1024, 2000] {
            let Err(SplitError::Format(msg)) = split(&a[..cut], 512) else { panic!("accepted cut at {cut}") };
            assert!(msg.contains("cut off or a shard is truncated"), "{msg}");
        }
    }
}

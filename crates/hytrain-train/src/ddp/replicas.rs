//! Every rank holding rank 0's state: the start-up check that all ranks built the same model, and the broadcasts
//! of parameters, buffers and checkpoint state from rank 0 (through the host collective, or the device collective
//! for buffers on a GPU).

use std::time::Instant;

use sha2::{Digest, Sha256};
use tch::{TchError, Tensor};

use super::{comm_err, Ddp};
use crate::bucket::MB;
use crate::{Result, TrainError};

fn describe(role: &str, name: &str, t: &Tensor) -> String {
    format!("{role} {name} {:?} {:?}", t.size(), t.kind())
}

impl Ddp {
    /// Fails on every rank, naming the first rank and tensor that differ, unless every rank built a model with the
    /// same parameter and buffer names, shapes and dtypes (one allgather of a hash when they agree).
    pub(super) fn verify_same_model(&mut self) -> Result<()> {
        let world = self.world_size();
        if world == 1 {
            return Ok(());
        }
        let lines: Vec<String> = self
            .params
            .iter()
            .map(|(n, t)| describe("parameter", n, t))
            .chain(self.buffers.iter().map(|(n, t)| describe("buffer", n, t)))
            .collect();
        let text = lines.join("\n").into_bytes();
        let digest = Sha256::digest(&text);
        let mut digests = vec![0u8; digest.len() * world];
        self.comm.allgather(&digest, &mut digests).map_err(comm_err("model check (allgather of shape hashes)"))?;
        let digests: Vec<&[u8]> = digests.chunks(digest.len()).collect();
        if digests.iter().all(|d| *d == digests[0]) {
            return Ok(());
        }
        // Hashes differ: every rank takes the same second round to learn what differs, so all fail alike.
        let mut lens = vec![0u8; 8 * world];
        self.comm
            .allgather(&(text.len() as u64).to_le_bytes(), &mut lens)
            .map_err(comm_err("model check (allgather of description lengths)"))?;
        let lens: Vec<usize> =
            lens.chunks(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize).collect();
        let max = *lens.iter().max().expect("world >= 2");
        let mut padded = text.clone();
        padded.resize(max, 0);
        let mut all = vec![0u8; max * world];
        self.comm.allgather(&padded, &mut all).map_err(comm_err("model check (allgather of descriptions)"))?;
        let described = |r: usize| -> Vec<String> {
            String::from_utf8_lossy(&all[r * max..r * max + lens[r]]).lines().map(str::to_string).collect()
        };
        let reference = described(0);
        let rank = (1..world).find(|&r| digests[r] != digests[0]).expect("some rank differs");
        let other = described(rank);
        let detail = match reference.iter().zip(&other).position(|(a, b)| a != b) {
            Some(i) => format!("tensor #{i} is '{}' on rank 0 but '{}' on rank {rank}", reference[i], other[i]),
            None if reference.len() > other.len() => format!(
                "rank 0 has {} tensors, rank {rank} has {}; rank {rank} lacks '{}'",
                reference.len(),
                other.len(),
                reference[other.len()]
            ),
            None => format!(
                "rank 0 has {} tensors, rank {rank} has {}; rank {rank} has an extra '{}'",
                reference.len(),
                other.len(),
                other[reference.len()]
            ),
        };
        Err(TrainError::ModelMismatch(format!(
            "rank {rank} built a different model than rank 0: {detail}; every rank must build the same model \
             (same model, number of classes and input shape)"
        )))
    }

    /// Rank 0's `bytes` on every rank (their length first), for what rank 0 alone decides.
    pub(crate) fn broadcast_bytes(&mut self, bytes: &mut Vec<u8>, during: &str) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mut len = (bytes.len() as u64).to_le_bytes();
        self.collective().broadcast(&mut len, 0).map_err(comm_err(during))?;
        bytes.resize(u64::from_le_bytes(len) as usize, 0);
        self.collective().broadcast(bytes, 0).map_err(comm_err(during))
    }

    /// Copies rank 0's values of `tensors` into every rank's, in chunks of at most one bucket.
    pub(crate) fn broadcast_tensors(&mut self, tensors: &[(String, Tensor)], during: &str) -> Result<()> {
        if self.world_size() == 1 || tensors.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let cap = ((self.options.bucket_mb * MB as f64) as usize).max(1);
        let nbytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let mut start = 0;
        while start < tensors.len() {
            let mut end = start;
            let mut total = 0;
            while end < tensors.len() && (end == start || total + nbytes(&tensors[end].1) <= cap) {
                total += nbytes(&tensors[end].1);
                end += 1;
            }
            self.broadcast_chunk(&tensors[start..end], total, during)?;
            start = end;
        }
        self.stats.broadcast_secs += started.elapsed().as_secs_f64();
        Ok(())
    }

    fn broadcast_chunk(&mut self, tensors: &[(String, Tensor)], total: usize, during: &str) -> Result<()> {
        let root = self.rank() == 0;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(total, 0);
        let torch = |name: &str, e: TchError| TrainError::torch(format!("{during}: tensor {name}"), e);
        if root {
            let mut off = 0;
            for (name, t) in tensors {
                let n = t.numel() * t.kind().elt_size_in_bytes();
                t.f_copy_data_u8(&mut scratch[off..off + n], t.numel()).map_err(|e| torch(name, e))?;
                off += n;
            }
        }
        let result = self.comm.broadcast(&mut scratch, 0).map_err(comm_err(during));
        if result.is_ok() && !root {
            let mut off = 0;
            for (name, t) in tensors {
                let n = t.numel() * t.kind().elt_size_in_bytes();
                let src = Tensor::f_from_data_size(&scratch[off..off + n], &t.size(), t.kind())
                    .and_then(|s| s.f_to_device(t.device()))
                    .map_err(|e| torch(name, e))?;
                let mut dst = t.shallow_clone();
                tch::no_grad(|| dst.f_copy_(&src)).map_err(|e| torch(name, e))?;
                off += n;
            }
        }
        self.scratch = scratch;
        result
    }

    /// Copies rank 0's buffers to every rank (done before each training forward when `broadcast_buffers`; call it
    /// before evaluation too so every rank evaluates the same model). With a device collective the buffers stay on
    /// the GPU: one broadcast per dtype of their concatenation.
    pub fn sync_buffers(&mut self) -> Result<()> {
        if self.world_size() == 1 || self.buffers.is_empty() {
            return Ok(());
        }
        let buffers: Vec<(String, Tensor)> = self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        let during = "buffer broadcast from rank 0";
        match self.device_comm.as_mut() {
            Some(device_comm) => {
                let started = Instant::now();
                crate::coalesced::broadcast(device_comm.as_mut(), &buffers)
                    .map_err(|source| TrainError::DeviceComm { during: during.into(), source })?;
                self.stats.broadcast_secs += started.elapsed().as_secs_f64();
                Ok(())
            }
            None => self.broadcast_tensors(&buffers, during),
        }
    }
}

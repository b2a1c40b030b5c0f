//! A [`DeviceCollective`] on host memory, carried by one of hytrain-comm's host collectives (the TCP ring, shared
//! memory, MPI, or the in-process collective of its `testing` feature): what stands where NCCL would when the
//! engine's GPU path runs on CPU tensors, on machines without a GPU and in tests.

use hytrain_comm::{Buffer, Collective, ReduceOp};

use crate::collective::check_blocks;
use crate::{CudaError, DType, DeviceCollective, DeviceReduceOp, DeviceSlice};

/// Runs every [`DeviceCollective`] operation through a host [`Collective`]; its "device" slices are host memory
/// ([`host_memory`](DeviceCollective::host_memory) says so), which the caller keeps alive and unused elsewhere for
/// each call, as [`DeviceSlice::from_raw`] asks of device memory. Reductions take f32, f64 and bf16, as the host
/// collectives do; the operations that only move data (broadcast, allgather, allgather_blocks) take every type,
/// f16 included.
pub struct HostCollective {
    inner: Box<dyn Collective>,
}

impl std::fmt::Debug for HostCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCollective")
            .field("rank", &self.inner.rank())
            .field("world_size", &self.inner.world_size())
            .field("backend", &self.inner.backend())
            .finish()
    }
}

impl HostCollective {
    /// Wraps the job's host collective.
    pub fn new(inner: Box<dyn Collective>) -> HostCollective {
        HostCollective { inner }
    }

    /// The host collective underneath.
    pub fn into_inner(self) -> Box<dyn Collective> {
        self.inner
    }
}

fn reduce_op(op: DeviceReduceOp) -> ReduceOp {
    match op {
        DeviceReduceOp::Sum => ReduceOp::Sum,
        DeviceReduceOp::Avg => ReduceOp::Avg,
    }
}

/// The slice's elements as a host buffer the host collectives reduce.
///
/// # Safety
/// `buf` must be host memory holding its elements, lent for `'a` and used by nothing else meanwhile.
unsafe fn typed<'a>(buf: &DeviceSlice<'a>, op: &str) -> Result<Buffer<'a>, CudaError> {
    let (address, len) = (buf.address(), buf.len());
    // SAFETY: the caller's promise; the element types match the dtype's size and alignment.
    Ok(unsafe {
        match buf.dtype() {
            DType::F32 => Buffer::F32(std::slice::from_raw_parts_mut(address as *mut f32, len)),
            DType::F64 => Buffer::F64(std::slice::from_raw_parts_mut(address as *mut f64, len)),
            DType::Bf16 => Buffer::Bf16(std::slice::from_raw_parts_mut(address as *mut half::bf16, len)),
            DType::F16 => {
                return Err(CudaError::Shape(format!(
                    "host {op} of {len} f16 elements: the host collectives reduce f32, f64 and bf16; convert \
                     the buffer, or use NCCL"
                )))
            }
        }
    })
}

/// The slice's bytes.
///
/// # Safety
/// As for [`typed`].
unsafe fn bytes<'a>(buf: &DeviceSlice<'a>) -> &'a mut [u8] {
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts_mut(buf.address() as *mut u8, buf.len() * buf.dtype().size()) }
}

impl DeviceCollective for HostCollective {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn allreduce(&mut self, buf: DeviceSlice<'_>, op: DeviceReduceOp) -> Result<(), CudaError> {
        // SAFETY: host_memory() is true, so callers lend host memory (the type's contract).
        let buffer = unsafe { typed(&buf, "allreduce")? };
        Ok(self.inner.allreduce(buffer, reduce_op(op))?)
    }

    fn broadcast(&mut self, buf: DeviceSlice<'_>, root: usize) -> Result<(), CudaError> {
        // SAFETY: as for allreduce.
        Ok(self.inner.broadcast(unsafe { bytes(&buf) }, root)?)
    }

    fn allgather(&mut self, input: DeviceSlice<'_>, output: DeviceSlice<'_>) -> Result<(), CudaError> {
        let (input_bytes, output_bytes) = (input.len() * input.dtype().size(), output.len() * output.dtype().size());
        let (i, o) = (input.address(), output.address());
        if i < o + output_bytes as u64 && o < i + input_bytes as u64 && input_bytes > 0 && output_bytes > 0 {
            return Err(CudaError::Shape(format!(
                "host allgather: the input ({input_bytes} bytes at {i:#x}) overlaps the output ({output_bytes} \
                 bytes at {o:#x}); use allgather_blocks to gather in place"
            )));
        }
        if input.dtype() != output.dtype() {
            return Err(CudaError::Shape(format!(
                "host allgather: the input holds {} elements but the output {}",
                input.dtype(),
                output.dtype()
            )));
        }
        // SAFETY: as for allreduce; the two do not overlap (checked above).
        let (input, output) = unsafe { (&*bytes(&input), bytes(&output)) };
        Ok(self.inner.allgather(input, output)?)
    }

    fn host_memory(&self) -> bool {
        true
    }

    /// The host collective's reduce-scatter: its blocks are, bit for bit, its allreduce's (hytrain-comm's
    /// contract).
    fn reduce_scatter(&mut self, buf: DeviceSlice<'_>, op: DeviceReduceOp) -> Result<(), CudaError> {
        check_blocks("host reduce_scatter", &buf, self.world_size())?;
        // SAFETY: as for allreduce.
        let buffer = unsafe { typed(&buf, "reduce_scatter")? };
        Ok(self.inner.reduce_scatter(buffer, reduce_op(op))?)
    }

    /// The host collective's allgather_blocks; f16 travels as its 16 bits.
    fn allgather_blocks(&mut self, buf: DeviceSlice<'_>) -> Result<(), CudaError> {
        check_blocks("host allgather_blocks", &buf, self.world_size())?;
        let buffer = match buf.dtype() {
            // SAFETY: as for allreduce; f16 and bf16 have the same size and alignment, and only bits move.
            DType::F16 => unsafe {
                Buffer::Bf16(std::slice::from_raw_parts_mut(buf.address() as *mut half::bf16, buf.len()))
            },
            // SAFETY: as for allreduce.
            _ => unsafe { typed(&buf, "allgather_blocks")? },
        };
        Ok(self.inner.allgather_blocks(buffer)?)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use half::{bf16, f16};
    use hytrain_comm::testing::InProcess;

    use super::*;

    fn slice<T>(values: &mut [T], dtype: DType) -> DeviceSlice<'_> {
        // SAFETY: host memory borrowed for the slice's life, which is what HostCollective takes.
        unsafe { DeviceSlice::from_raw(values.as_mut_ptr() as u64, dtype, values.len()) }
    }

    /// Runs `f` on every rank of an in-process job of `world`, each with its HostCollective.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(usize, &mut HostCollective) -> T + Sync) -> Vec<T> {
        let ranks = InProcess::group(world, Duration::from_secs(30));
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .enumerate()
                .map(|(r, c)| {
                    let f = &f;
                    s.spawn(move || f(r, &mut HostCollective::new(Box::new(c))))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Implements only what the trait requires, through a HostCollective, so `reduce_scatter` and
    /// `allgather_blocks` are the trait's defaults.
    struct Defaults<'a>(&'a mut HostCollective);

    impl DeviceCollective for Defaults<'_> {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world_size(&self) -> usize {
            self.0.world_size()
        }
        fn backend(&self) -> &'static str {
            "defaults"
        }
        fn allreduce(&mut self, buf: DeviceSlice<'_>, op: DeviceReduceOp) -> Result<(), CudaError> {
            self.0.allreduce(buf, op)
        }
        fn broadcast(&mut self, buf: DeviceSlice<'_>, root: usize) -> Result<(), CudaError> {
            self.0.broadcast(buf, root)
        }
        fn allgather(&mut self, input: DeviceSlice<'_>, output: DeviceSlice<'_>) -> Result<(), CudaError> {
            self.0.allgather(input, output)
        }
    }

    /// Arbitrary floats, different on every rank.
    fn noise(i: usize, rank: usize) -> f32 {
        ((i * 7919 + rank * 104_729) % 10_007) as f32 / 997.0 - 5.123_456
    }

    #[test]
    fn host_reduce_scatter_leaves_each_rank_the_allreduce_of_its_block_natively_and_through_the_defaults() {
        let world = 3;
        let results = on_ranks(world, |rank, c| {
            let mut all: Vec<f32> = (0..12).map(|i| noise(i, rank)).collect();
            c.allreduce(slice(&mut all, DType::F32), DeviceReduceOp::Avg).unwrap();
            let mut native: Vec<f32> = (0..12).map(|i| noise(i, rank)).collect();
            c.reduce_scatter(slice(&mut native, DType::F32), DeviceReduceOp::Avg).unwrap();
            let mut default: Vec<f32> = (0..12).map(|i| noise(i, rank)).collect();
            Defaults(c).reduce_scatter(slice(&mut default, DType::F32), DeviceReduceOp::Avg).unwrap();
            let mut wide: Vec<bf16> = (0..12).map(|i| bf16::from_f32(noise(i, rank))).collect();
            c.reduce_scatter(slice(&mut wide, DType::Bf16), DeviceReduceOp::Sum).unwrap();
            let mine = rank * 4..(rank + 1) * 4;
            let bits = |v: &[f32]| v[mine.clone()].iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (bits(&all), bits(&native), bits(&default), wide[mine.clone()].to_vec(), mine)
        });
        for (rank, (all, native, default, wide, mine)) in results.into_iter().enumerate() {
            assert_eq!(native, all, "rank {rank}");
            assert_eq!(default, all, "rank {rank}");
            let expect: Vec<bf16> = mine
                .map(|i| bf16::from_f32((0..world).fold(0.0f32, |s, r| s + bf16::from_f32(noise(i, r)).to_f32())))
                .collect();
            assert_eq!(wide, expect, "rank {rank}");
        }
    }

    #[test]
    fn host_allgather_blocks_gathers_every_type_in_place_natively_and_through_the_defaults() {
        let world = 4;
        let results = on_ranks(world, |rank, c| {
            let fill = |i: usize| if i / 3 == rank { (i * 10 + rank) as f32 } else { -1.0 };
            let mut f32s: Vec<f32> = (0..12).map(fill).collect();
            c.allgather_blocks(slice(&mut f32s, DType::F32)).unwrap();
            let mut f16s: Vec<f16> = (0..12).map(|i| f16::from_f32(fill(i))).collect();
            c.allgather_blocks(slice(&mut f16s, DType::F16)).unwrap();
            let mut f64s: Vec<f64> = (0..12).map(|i| fill(i) as f64).collect();
            Defaults(c).allgather_blocks(slice(&mut f64s, DType::F64)).unwrap();
            (f32s, f16s, f64s)
        });
        let expect: Vec<f32> = (0..12).map(|i| (i * 10 + i / 3) as f32).collect();
        for (rank, (f32s, f16s, f64s)) in results.into_iter().enumerate() {
            assert_eq!(f32s, expect, "rank {rank}");
            assert_eq!(f16s, expect.iter().map(|x| f16::from_f32(*x)).collect::<Vec<_>>(), "rank {rank}");
            assert_eq!(f64s, expect.iter().map(|x| *x as f64).collect::<Vec<_>>(), "rank {rank}");
        }
    }

    #[test]
    fn host_collectives_refuse_unpadded_blocks_f16_sums_and_overlapping_allgathers_before_moving_data() {
        let results = on_ranks(2, |_, c| {
            let mut odd = vec![1.0f32; 5];
            let rs = c.reduce_scatter(slice(&mut odd, DType::F32), DeviceReduceOp::Sum).unwrap_err().to_string();
            let ag = Defaults(c).allgather_blocks(slice(&mut odd, DType::F32)).unwrap_err().to_string();
            let mut halves = vec![f16::ONE; 4];
            let sum = c.allreduce(slice(&mut halves, DType::F16), DeviceReduceOp::Sum).unwrap_err().to_string();
            let mut both = vec![0.0f32; 4];
            let overlap = {
                let start = both.as_ptr() as u64;
                let whole = slice(&mut both, DType::F32);
                // SAFETY: the first two elements of `both`; the call refuses them before touching memory.
                let input = unsafe { DeviceSlice::from_raw(start, DType::F32, 2) };
                c.allgather(input, whole).unwrap_err().to_string()
            };
            // Nothing moved, and the job still works.
            let mut v = vec![1.0f64; 2];
            c.reduce_scatter(slice(&mut v, DType::F64), DeviceReduceOp::Sum).unwrap();
            (rs, ag, sum, overlap, odd, v)
        });
        for (rank, (rs, ag, sum, overlap, odd, v)) in results.into_iter().enumerate() {
            assert_eq!(
                rs,
                "host reduce_scatter of 5 f32 elements: they do not split into 2 equal blocks (one per rank); the \
                 caller pads the buffer to a multiple of world_size (6 elements)"
            );
            assert!(ag.starts_with("allgather_blocks of 5 f32 elements: they do not split into 2"), "{ag}");
            assert!(sum.contains("the host collectives reduce f32, f64 and bf16"), "{sum}");
            assert!(overlap.contains("overlaps the output"), "{overlap}");
            assert_eq!(odd, [1.0; 5]);
            assert_eq!(v[rank], 2.0);
        }
    }

    #[test]
    fn a_failing_host_collective_reports_its_own_error() {
        let results = on_ranks(2, |rank, c| {
            let mut v = vec![1.0f32; 2];
            let e = match rank {
                0 => c.reduce_scatter(slice(&mut v, DType::F32), DeviceReduceOp::Sum).unwrap_err(),
                _ => c.allgather_blocks(slice(&mut v, DType::F32)).unwrap_err(),
            };
            (matches!(&e, CudaError::Host(h) if matches!(**h, hytrain_comm::CommError::Mismatch(_))), e.to_string())
        });
        for (host, message) in results {
            assert!(host, "{message}");
            assert!(message.starts_with("collective mismatch: rank"), "{message}");
        }
    }
}

//! A training step never makes the host wait for the device: no value read back (loss, clipping norm), no copy
//! through host memory, no collective through the host. Counted on the CPU, where every such point is visible
//! though free: libtorch operations that would synchronise a CUDA device through `hytrain_train::host_sync`, host
//! collectives through a counting wrapper, and device collectives through a stand-in for NCCL that works on host
//! memory (the real TCP ring underneath), so the engine runs its GPU path here.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{on_ranks, seeded, TinyBn};
use hytrain_cuda::{CudaError, DType, DeviceCollective, DeviceReduceOp, DeviceSlice};
use hytrain_train::{
    host_sync, Buffer, Collective, CommError, Ddp, DdpOptions, OptimizerConfig, Precision, ReduceOp, SgdConfig,
};
use tch::{Device, Kind, Tensor};

const STEPS: usize = 3;
const ACCUM: usize = 2;

type Shared = Arc<Mutex<Box<dyn Collective>>>;

/// The job's host collective, counting every call.
struct CountingHost {
    inner: Shared,
    calls: Arc<AtomicUsize>,
    rank: usize,
    world_size: usize,
}

impl Collective for CountingHost {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "counting"
    }
    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.lock().unwrap().allreduce(buf, op)
    }
    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.lock().unwrap().broadcast(bytes, root)
    }
    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.lock().unwrap().allgather(input, output)
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.lock().unwrap().barrier()
    }
}

/// Stands where NCCL would: the same calls on host memory, carried by the ring, counted.
struct RingAsDevice {
    inner: Shared,
    calls: Arc<AtomicUsize>,
    rank: usize,
    world_size: usize,
}

impl DeviceCollective for RingAsDevice {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "ring-as-device"
    }
    fn allreduce(&mut self, buf: DeviceSlice<'_>, op: DeviceReduceOp) -> Result<(), CudaError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let op = match op {
            DeviceReduceOp::Sum => ReduceOp::Sum,
            DeviceReduceOp::Avg => ReduceOp::Avg,
        };
        // SAFETY: host_memory() is true, so the engine hands over host tensors it keeps alive for the call.
        let buffer = unsafe {
            match buf.dtype() {
                DType::F32 => Buffer::F32(std::slice::from_raw_parts_mut(buf.address() as *mut f32, buf.len())),
                DType::F64 => Buffer::F64(std::slice::from_raw_parts_mut(buf.address() as *mut f64, buf.len())),
                other => return Err(CudaError::Shape(format!("the stand-in reduces no {other:?}"))),
            }
        };
        self.inner.lock().unwrap().allreduce(buffer, op).map_err(|e| CudaError::Shape(e.to_string()))
    }
    fn broadcast(&mut self, buf: DeviceSlice<'_>, root: usize) -> Result<(), CudaError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let bytes = buf.len() * buf.dtype().size();
        // SAFETY: as for allreduce.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.address() as *mut u8, bytes) };
        self.inner.lock().unwrap().broadcast(bytes, root).map_err(|e| CudaError::Shape(e.to_string()))
    }
    fn allgather(&mut self, _input: DeviceSlice<'_>, _output: DeviceSlice<'_>) -> Result<(), CudaError> {
        Err(CudaError::Shape("the engine allgathers nothing in a step".into()))
    }
    fn host_memory(&self) -> bool {
        true
    }
}

/// What one rank counted in each step.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    host_syncs: u64,
    host_collectives: usize,
    device_collectives: usize,
}

/// Per rank: the buckets, the counts of every step (clipping on, momentum, `ACCUM` micro-batches, the same
/// batches on every rank) and the buffers after the last, rank 1's spoiled after start-up, so they equal rank 0's
/// only if the broadcasts arrived.
fn count_steps(world: usize, device_collective: bool, precision: Precision) -> Vec<(usize, Vec<Counts>, Vec<Tensor>)> {
    let data: Vec<(Tensor, Tensor)> = seeded(5, || {
        (0..STEPS * ACCUM)
            .map(|_| {
                (
                    Tensor::randn([4, 3, 8, 8], (Kind::Float, Device::Cpu)),
                    Tensor::randint(3, [4], (Kind::Int64, Device::Cpu)),
                )
            })
            .collect()
    });
    let data = Mutex::new(data);
    on_ranks(world, |rank, comm| {
        let batches: Vec<(Tensor, Tensor)> = data.lock().unwrap().iter().map(|(x, y)| (x.copy(), y.copy())).collect();
        let shared: Shared = Arc::new(Mutex::new(comm));
        let (host_calls, device_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let host = CountingHost { inner: shared.clone(), calls: host_calls.clone(), rank, world_size: world };
        let options = DdpOptions { grad_accum: ACCUM, max_grad_norm: Some(0.5), precision, ..Default::default() };
        let net = seeded(9, || Box::new(TinyBn::new()));
        let mut ddp = Ddp::new(net, Box::new(host), options).unwrap();
        if device_collective {
            let device = RingAsDevice { inner: shared, calls: device_calls.clone(), rank, world_size: world };
            ddp = ddp.with_device_collective(Box::new(device), None).unwrap();
        }
        if rank == 1 {
            for (_, mut b) in ddp.model().named_buffers() {
                let _ = tch::no_grad(|| b.fill_(7));
            }
        }
        let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() });
        let mut optimizer = sgd.build(ddp.parameters()).unwrap();
        host_sync::watch_this_thread();
        let mut counts = Vec::new();
        for step in batches.chunks(ACCUM) {
            let before =
                (host_sync::on_this_thread(), host_calls.load(Ordering::SeqCst), device_calls.load(Ordering::SeqCst));
            ddp.train_step(step, optimizer.as_mut(), 0.1).unwrap();
            counts.push(Counts {
                host_syncs: host_sync::on_this_thread() - before.0,
                host_collectives: host_calls.load(Ordering::SeqCst) - before.1,
                device_collectives: device_calls.load(Ordering::SeqCst) - before.2,
            });
        }
        // The control: the counter sees a value read back, so the zeros above can fail.
        let before = host_sync::on_this_thread();
        let _ = ddp.parameters()[0].1.sum(Kind::Float).double_value(&[]);
        assert_eq!(host_sync::on_this_thread(), before + 1, "the counter missed a value read back");
        let buffers = ddp.model().named_buffers().into_iter().map(|(_, b)| b.copy()).collect();
        (ddp.bucket_layout().len(), counts, buffers)
    })
}

fn assert_same_buffers(a: &[Tensor], b: &[Tensor]) {
    assert_eq!(a.len(), 3, "running mean, running variance, batch count");
    for (x, y) in a.iter().zip(b) {
        assert!(x.equal(y), "rank 1 kept its own buffer {y:?} instead of rank 0's {x:?}");
    }
}

#[test]
fn one_rank_steps_without_host_syncs_or_collectives() {
    for device_collective in [false, true] {
        for (_, counts, _) in count_steps(1, device_collective, Precision::Fp32) {
            let none = Counts { host_syncs: 0, host_collectives: 0, device_collectives: 0 };
            assert_eq!(counts, vec![none; STEPS], "device collective: {device_collective}");
        }
    }
}

#[test]
fn two_ranks_on_the_gpu_path_step_without_host_syncs_and_only_device_collectives() {
    // Buffers are float32 and int64: one broadcast each before every training forward, one allreduce per bucket.
    let dtypes = 2;
    let ranks = count_steps(2, true, Precision::Fp32);
    for (buckets, counts, _) in &ranks {
        let want = Counts { host_syncs: 0, host_collectives: 0, device_collectives: buckets + dtypes * ACCUM };
        assert_eq!(*counts, vec![want; STEPS]);
    }
    assert_same_buffers(&ranks[0].2, &ranks[1].2);
}

#[test]
fn two_ranks_on_the_cpu_read_no_value_back_and_use_the_ring_only_for_buckets_and_buffers() {
    // On the CPU the ring is the data path: one allreduce per bucket, one broadcast of the (small) buffers before
    // every training forward.
    let ranks = count_steps(2, false, Precision::Fp32);
    for (buckets, counts, _) in &ranks {
        let want = Counts { host_syncs: 0, host_collectives: buckets + ACCUM, device_collectives: 0 };
        assert_eq!(*counts, vec![want; STEPS]);
    }
    assert_same_buffers(&ranks[0].2, &ranks[1].2);
}

#[test]
fn bf16_steps_read_nothing_back_and_fp16_steps_read_only_the_overflow_flag() {
    // bf16 autocast changes the arithmetic, not the synchronisation. fp16 reads one value per step: whether the
    // averaged gradients overflowed, which decides on the host whether the optimizer steps (as
    // torch.amp.GradScaler.step does with an optimizer that is not fused).
    for (precision, reads) in [(Precision::Bf16, 0), (Precision::Fp16, 1)] {
        for world in [1, 2] {
            for (_, counts, _) in count_steps(world, true, precision) {
                assert!(
                    counts.iter().all(|c| c.host_syncs == reads),
                    "{precision:?} at world size {world}: {counts:?}"
                );
                assert!(
                    counts.iter().all(|c| c.host_collectives == 0),
                    "{precision:?} at world size {world}: {counts:?}"
                );
            }
        }
    }
}

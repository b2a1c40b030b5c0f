//! The GPU gradient path's checks that need no GPU: a device collective (NCCL) refuses a model left on the CPU or
//! a collective of another rank, and a bucket in host memory is never handed to it.

use hytrain_cuda::{CudaError, DeviceCollective, DeviceReduceOp, DeviceSlice};
use hytrain_train::{model, Bucket, Ddp, DdpOptions};
use tch::{Device, Kind, Tensor};

/// Counts the calls it gets; it stands where NCCL would, which this machine cannot run.
struct Counting {
    rank: usize,
    world_size: usize,
    calls: usize,
}

impl DeviceCollective for Counting {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn allreduce(&mut self, _buf: DeviceSlice<'_>, _op: DeviceReduceOp) -> Result<(), CudaError> {
        self.calls += 1;
        Ok(())
    }
    fn broadcast(&mut self, _buf: DeviceSlice<'_>, _root: usize) -> Result<(), CudaError> {
        self.calls += 1;
        Ok(())
    }
    fn allgather(&mut self, _i: DeviceSlice<'_>, _o: DeviceSlice<'_>) -> Result<(), CudaError> {
        self.calls += 1;
        Ok(())
    }
}

fn cpu_model() -> Box<dyn hytrain_train::Model> {
    tch::manual_seed(1);
    model::build("mlp:8", 3, &[4], Device::Cpu).unwrap()
}

#[test]
fn a_device_collective_refuses_a_model_on_the_cpu() {
    let ddp = Ddp::single(cpu_model(), DdpOptions::default()).unwrap();
    let error = ddp
        .with_device_collective(Box::new(Counting { rank: 0, world_size: 1, calls: 0 }), None)
        .unwrap_err()
        .to_string();
    assert_eq!(error, "invalid device collective: nccl (NCCL) needs the model on a GPU, but it is on the CPU");
}

#[test]
fn a_device_collective_of_another_rank_or_size_is_refused() {
    let ddp = Ddp::single(cpu_model(), DdpOptions::default()).unwrap();
    let error = ddp
        .with_device_collective(Box::new(Counting { rank: 1, world_size: 2, calls: 0 }), None)
        .unwrap_err()
        .to_string();
    assert_eq!(error, "invalid device collective: is rank 1 of 2 but the job is rank 0 of 1");
}

#[test]
fn a_bucket_in_host_memory_is_never_handed_to_a_device_collective() {
    let p = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let params = vec![("w".to_string(), p)];
    let mut bucket = Bucket::new(vec![0], &params).unwrap();
    let mut comm = Counting { rank: 0, world_size: 1, calls: 0 };
    let error = bucket.allreduce_on_device(&mut comm).unwrap_err().to_string();
    assert_eq!(
        error,
        "a gradient bucket in host memory was handed to a GPU collective; move the model to the GPU first"
    );
    assert_eq!(comm.calls, 0);
}

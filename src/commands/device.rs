//! Where `hytrain train` computes: `--device auto|cpu|cuda`, and the NCCL communicator of a GPU job.
//!
//! The binary links the CPU libtorch only. On a GPU image `libtorch_cuda.so` sits beside `libtorch_cpu.so`;
//! hytrain-cuda opens it before libtorch is first asked about CUDA, so its CUDA backend registers, and each process
//! then takes `cuda:LOCAL_RANK` (CUDA numbers the GPUs CUDA_VISIBLE_DEVICES leaves visible from 0), or `cuda:0`
//! when CUDA_VISIBLE_DEVICES gives it one GPU of its own, and makes it the current device.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use hytrain_cuda::{CudaDriver, CudaError, Nccl, NcclCollective, SideStream, TorchStreams, UniqueId, UNIQUE_ID_BYTES};

use crate::comm::{Collective, Store};

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// A GPU when this libtorch and machine can use one, else the CPU.
    #[default]
    Auto,
    /// The CPU, whatever the machine has.
    Cpu,
    /// A GPU, or a clear error.
    Cuda,
}

impl FromStr for DeviceRequest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda),
            _ => Err(format!("'{s}' is not a device; use auto, cpu or cuda")),
        }
    }
}

/// What the machine offers, as [`select`] finds it; separate so the decision can be tested without CUDA.
#[derive(Debug)]
pub struct Probe {
    /// Loading `libtorch_cuda.so`: its file, or why not.
    pub torch_cuda: Result<hytrain_cuda::TorchCuda, CudaError>,
    /// GPUs libtorch sees once its CUDA backend is loaded (0 when none or not loaded).
    pub visible: usize,
    /// Why libtorch sees no GPU, asked of the driver only when it sees none.
    pub no_gpu_reason: Option<CudaError>,
}

/// The device for this process's `local_rank` given `request` and the machine: pure, so every branch is tested.
pub fn decide(
    request: DeviceRequest,
    probe: &Probe,
    local_rank: usize,
    cuda_visible_devices: Option<&str>,
) -> anyhow::Result<tch::Device> {
    let cuda_error = || -> anyhow::Error {
        match (&probe.torch_cuda, &probe.no_gpu_reason) {
            (Err(e), _) => anyhow::anyhow!("--device cuda: {e}"),
            (Ok(_), Some(e)) => anyhow::anyhow!("--device cuda: {e}"),
            (Ok(t), None) => anyhow::anyhow!(
                "--device cuda: libtorch's CUDA backend loaded from {} but it sees no GPU; check nvidia-smi and \
                 CUDA_VISIBLE_DEVICES, or use --device cpu",
                t.path.display()
            ),
        }
    };
    match request {
        DeviceRequest::Cpu => Ok(tch::Device::Cpu),
        DeviceRequest::Cuda if probe.visible == 0 => Err(cuda_error()),
        DeviceRequest::Auto if probe.visible == 0 => {
            tracing::info!(
                "--device auto: using the CPU ({})",
                cuda_error().to_string().trim_start_matches("--device cuda: ")
            );
            Ok(tch::Device::Cpu)
        }
        DeviceRequest::Cuda | DeviceRequest::Auto => {
            let index = hytrain_cuda::device_for_local_rank(local_rank, probe.visible, cuda_visible_devices)?;
            if request == DeviceRequest::Auto {
                tracing::info!("--device auto: using cuda:{index} of {} visible GPU(s)", probe.visible);
            }
            Ok(tch::Device::Cuda(index))
        }
    }
}

/// The folder of the `libtorch_cpu.so` this process runs with.
fn libtorch_lib_dir() -> Option<PathBuf> {
    hytrain_cuda::library::loaded_libtorch().map(|root| root.join("lib"))
}

/// Looks at this machine for [`decide`]: loads libtorch's CUDA backend when it is there, then asks libtorch how
/// many GPUs it sees.
pub fn probe() -> Probe {
    let torch_cuda = match libtorch_lib_dir() {
        Some(dir) => hytrain_cuda::load_torch_cuda(&dir),
        None => Err(CudaError::TorchCudaNotFound { dir: PathBuf::from("(no libtorch_cpu.so is loaded)") }),
    };
    let visible =
        if torch_cuda.is_ok() && tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
    // The driver says best why there is no GPU (no libcuda, cuInit failing, no device).
    let no_gpu_reason = (torch_cuda.is_ok() && visible == 0).then(|| CudaDriver::load().err()).flatten();
    Probe { torch_cuda, visible, no_gpu_reason }
}

/// The device for this process: [`probe`] then [`decide`], and a GPU made libtorch's current device at once, so
/// no context lands on GPU 0 of a process that trains on another; `--device cpu` looks at nothing.
pub fn select(
    request: DeviceRequest,
    local_rank: usize,
    cuda_visible_devices: Option<&str>,
) -> anyhow::Result<tch::Device> {
    if request == DeviceRequest::Cpu {
        return Ok(tch::Device::Cpu);
    }
    let device = decide(request, &probe(), local_rank, cuda_visible_devices)?;
    if let tch::Device::Cuda(index) = device {
        hytrain_cuda::set_current_device(local_rank, index, cuda_visible_devices)?;
    }
    Ok(device)
}

/// The store key rank 0 publishes NCCL's unique id under (prefixed with the job id by the store).
pub const UNIQUE_ID_KEY: &str = "nccl/unique-id";

/// Joins this rank's NCCL communicator on GPU `ordinal`, ordered against libtorch's current CUDA stream. The
/// unique id goes from rank 0 through the rendezvous `store`, or, under mpirun where there is none, by a broadcast
/// over the host collective.
pub fn nccl_collective(
    store: Option<&Store>,
    host: &mut dyn Collective,
    ordinal: usize,
    timeout: Duration,
) -> anyhow::Result<NcclCollective> {
    let (rank, world_size) = (host.rank(), host.world_size());
    let driver = CudaDriver::load().context("the NCCL backend needs the CUDA driver")?;
    let nccl = Nccl::load()?;
    let id = match store {
        Some(store) => hytrain_cuda::exchange_unique_id(&nccl, store, rank, 0, UNIQUE_ID_KEY)?,
        None => {
            let mut bytes = [0u8; UNIQUE_ID_BYTES];
            if rank == 0 {
                bytes = *nccl.unique_id()?.as_bytes();
            }
            host.broadcast(&mut bytes, 0).context("handing NCCL's unique id from rank 0 to every rank")?;
            UniqueId::from_bytes(&bytes, "broadcast from rank 0")?
        }
    };
    let ordinal = u32::try_from(ordinal).map_err(|_| anyhow::anyhow!("GPU index {ordinal} is out of range"))?;
    // libtorch_cuda.so is loaded by now (the device was chosen through it), so the stream shim can reach c10.
    let streams = TorchStreams::load()?;
    let mut collective = NcclCollective::new(driver, nccl, ordinal, &id, rank, world_size, timeout)?;
    collective.follow_current_stream(streams);
    Ok(collective)
}

/// The side stream on GPU `ordinal` that gradient buckets are reduced on while backward computes (`--overlap`).
pub fn side_stream(ordinal: usize) -> anyhow::Result<SideStream> {
    let gpu = u32::try_from(ordinal).map_err(|_| anyhow::anyhow!("GPU index {ordinal} is out of range"))?;
    let driver = CudaDriver::load().context("overlapping allreduces with backward needs the CUDA driver")?;
    Ok(SideStream::new(driver, gpu, TorchStreams::load()?)?)
}

/// Sets NCCL_SOCKET_IFNAME to `interface` (SageMaker's network interface) unless it is set already, as SageMaker's
/// training toolkit does; must run before NCCL opens its first socket.
pub fn set_nccl_socket_ifname(interface: Option<&str>, already: Option<&str>) {
    match (interface, already) {
        (Some(name), None) => {
            tracing::info!("NCCL_SOCKET_IFNAME={name} (SageMaker's network interface)");
            std::env::set_var("NCCL_SOCKET_IFNAME", name);
        }
        (Some(name), Some(set)) if name != set => {
            tracing::info!("NCCL_SOCKET_IFNAME={set} kept (SageMaker names {name})");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn no_torch_cuda(dir: &str) -> Probe {
        Probe {
            torch_cuda: Err(CudaError::TorchCudaNotFound { dir: PathBuf::from(dir) }),
            visible: 0,
            no_gpu_reason: None,
        }
    }

    fn loaded(visible: usize, reason: Option<CudaError>) -> Probe {
        Probe {
            torch_cuda: Ok(hytrain_cuda::TorchCuda {
                path: Path::new("/opt/torch/lib/libtorch_cuda.so").into(),
                version: Some("2.11.0+cu130".into()),
            }),
            visible,
            no_gpu_reason: reason,
        }
    }

    #[test]
    fn device_names_parse_and_a_wrong_one_lists_the_choices() {
        assert_eq!("auto".parse::<DeviceRequest>().unwrap(), DeviceRequest::Auto);
        assert_eq!("CPU".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!("cuda".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda);
        assert_eq!("tpu".parse::<DeviceRequest>().unwrap_err(), "'tpu' is not a device; use auto, cpu or cuda");
    }

    #[test]
    fn cpu_is_taken_whatever_the_machine_has() {
        assert_eq!(decide(DeviceRequest::Cpu, &loaded(8, None), 3, None).unwrap(), tch::Device::Cpu);
    }

    #[test]
    fn auto_takes_the_local_ranks_gpu_when_there_is_one_else_the_cpu() {
        assert_eq!(decide(DeviceRequest::Auto, &loaded(8, None), 3, None).unwrap(), tch::Device::Cuda(3));
        assert_eq!(decide(DeviceRequest::Auto, &no_torch_cuda("/l/lib"), 3, None).unwrap(), tch::Device::Cpu);
        assert_eq!(decide(DeviceRequest::Auto, &loaded(0, None), 0, None).unwrap(), tch::Device::Cpu);
    }

    #[test]
    fn cuda_without_libtorch_cuda_says_where_it_looked() {
        let error = decide(DeviceRequest::Cuda, &no_torch_cuda("/l/lib"), 0, None).unwrap_err().to_string();
        assert!(
            error.starts_with(
                "--device cuda: CUDA was requested but this libtorch has no CUDA support: no libtorch_cuda.so in /l/lib; "
            ),
            "{error}"
        );
        assert!(error.ends_with("or use --device cpu"), "{error}");
    }

    #[test]
    fn cuda_with_libtorch_cuda_but_no_gpu_gives_the_drivers_reason() {
        let reason = CudaError::NoDriver { searched: "system folder: /usr/lib".into() };
        let error = decide(DeviceRequest::Cuda, &loaded(0, Some(reason)), 0, None).unwrap_err().to_string();
        assert!(
            error.starts_with("--device cuda: CUDA was requested but no NVIDIA driver / libcuda.so.1 found"),
            "{error}"
        );
        let error = decide(DeviceRequest::Cuda, &loaded(0, None), 0, None).unwrap_err().to_string();
        assert!(error.contains("/opt/torch/lib/libtorch_cuda.so but it sees no GPU"), "{error}");
    }

    #[test]
    fn a_process_given_one_gpu_by_cuda_visible_devices_uses_cuda_0() {
        for request in [DeviceRequest::Cuda, DeviceRequest::Auto] {
            let device = decide(request, &loaded(1, None), 3, Some("3")).unwrap();
            assert_eq!(device, tch::Device::Cuda(0));
        }
    }

    #[test]
    fn more_local_ranks_than_gpus_is_an_error_for_cuda_and_auto() {
        for request in [DeviceRequest::Cuda, DeviceRequest::Auto] {
            let error = decide(request, &loaded(2, None), 2, Some("0,1")).unwrap_err().to_string();
            assert!(
                error.starts_with(
                    "local rank 2 needs GPU cuda:2 but only 2 GPU(s) are visible (CUDA_VISIBLE_DEVICES=0,1)"
                ),
                "{error}"
            );
        }
    }
}

//! Sharded data parallelism (ZeRO, `--shard`): each bucket's gradients are reduce-scattered so that every rank
//! holds the averaged block it owns, each rank's optimizer steps only its blocks, and the updated blocks of the
//! flat parameter buffers are allgathered back into the model.
//!
//! With [`ShardMode::Optimizer`] (ZeRO-1) the optimizer state exists only for this rank's blocks; with
//! [`ShardMode::Gradients`] (ZeRO-2) the full gradient buffer of a bucket is released as soon as its block is
//! reduced, the parameters' gradients are undefined between steps, and backward waits for each bucket's
//! reduction before computing the next one's gradients ([`ZERO2_BUCKETS_IN_FLIGHT`]). The three updates (SGD with momentum,
//! Nesterov and weight decay, AdamW) are elementwise, so stepping blocks of flat buffers gives DDP's weights.
//!
//! fp16 loss scaling unscales this rank's blocks and skips a step when any rank's overflowed
//! ([`Ddp::overflowed_on_any_rank`]), so every rank skips alike and the scale stays the same everywhere.
//!
//! Checkpoints are sharded too ([`crate::checkpoint::sharded`]): each rank writes its blocks' state, and the
//! manifest records the bucket layout, so a sharded run resumes from a DDP checkpoint, a DDP run from a sharded
//! one, and a sharded run from one written at another world size.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::{comm_err, Ddp};
use crate::checkpoint::sharded::{assemble, cut, ShardBucket, ShardLayout, ShardParam};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::{ReduceOp, Result, TrainError};

/// What data parallelism shards across ranks (`--shard`), after the ZeRO paper's stages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardMode {
    /// Nothing: every rank holds the whole model, its gradients and its optimizer state (DDP, ZeRO-0).
    #[default]
    None,
    /// The optimizer state (ZeRO-1): gradients are reduce-scattered, each rank steps its block of every bucket and
    /// the parameters are allgathered.
    Optimizer,
    /// The optimizer state and the gradients (ZeRO-2): as `optimizer`, and each bucket's full gradients are freed
    /// as soon as its block is reduced.
    Gradients,
}

impl std::str::FromStr for ShardMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "0" => Ok(ShardMode::None),
            "optimizer" | "1" => Ok(ShardMode::Optimizer),
            "gradients" | "2" => Ok(ShardMode::Gradients),
            _ => Err(format!("must be none, optimizer or gradients, got '{s}'")),
        }
    }
}

impl std::fmt::Display for ShardMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShardMode::None => "none",
            ShardMode::Optimizer => "optimizer",
            ShardMode::Gradients => "gradients",
        })
    }
}

/// Under ZeRO-2 with overlap, how many launched buckets may still be reducing when backward goes on (see
/// `Overlap::new`). Zero: backward waits in each bucket's last gradient hook until the bucket is reduced and its
/// full gradients released, so at most one bucket's full gradients exist at a time (a bucket holds 25 MiB by
/// default; a layer larger than that is a bucket of its own). One would let backward compute the next bucket's
/// gradients meanwhile, for twice the gradient memory.
pub(super) const ZERO2_BUCKETS_IN_FLIGHT: usize = 0;

/// The optimizer's name for bucket `b`'s block.
fn shard_name(b: usize) -> String {
    format!("zero.bucket{b}")
}

/// The suffixes of optimizer state entries (`<param>.<suffix>`).
const SUFFIXES: [&str; 4] = ["momentum_buffer", "exp_avg_sq", "exp_avg", "step"];

impl Ddp {
    /// What this engine shards: [`DdpOptions::shard`](super::DdpOptions::shard), or [`ShardMode::None`] alone
    /// (one rank has nothing to shard).
    pub fn shard_mode(&self) -> ShardMode {
        self.shard
    }

    /// Builds `config`'s optimizer over what this rank updates: the model's parameters, or with sharding one
    /// block of the flat parameter buffer per bucket, with the matching block of the averaged gradient. Build it
    /// after [`Ddp::with_device_collective`], which moves the gradient buffers.
    pub fn build_optimizer(&self, config: &OptimizerConfig) -> Result<Box<dyn Optimizer>> {
        if self.shard == ShardMode::None {
            return config.build(&self.params);
        }
        let on_cpu = self.params.iter().all(|(_, p)| p.device() == tch::Device::Cpu);
        if !on_cpu && self.device_comm.is_none() {
            return Err(TrainError::option(
                "--shard",
                format!(
                    "is {}, but the model is on a GPU and gradients go through the host collective; sharding on a \
                     GPU needs the device collective (NCCL, --backend nccl), or use --shard none",
                    self.shard
                ),
            ));
        }
        let mut targets = Vec::with_capacity(self.buckets.len());
        for (b, bucket) in self.buckets.iter().enumerate() {
            let (params, grad) = bucket
                .shard_pair()
                .map_err(|e| TrainError::torch(format!("shard of gradient bucket {b}"), e))?
                .expect("every bucket is sharded");
            targets.push((shard_name(b), params, grad));
        }
        config.build_over_gradients(&targets)
    }

    /// Refuses an optimizer that does not update what this engine's sharding needs (one built over the model's
    /// parameters while sharding, or over shards while not).
    pub(super) fn check_optimizer(&self, optimizer: &dyn Optimizer) -> Result<()> {
        let names = optimizer.parameter_names();
        let expected: Vec<String> = match self.shard {
            ShardMode::None => return Ok(()),
            _ => (0..self.buckets.len()).map(shard_name).collect(),
        };
        if names.len() != expected.len() || names.iter().zip(&expected).any(|(a, b)| a != b) {
            return Err(TrainError::option(
                "--shard",
                format!(
                    "is {}, but the optimizer updates {} tensors ({}) instead of this rank's {} shards: build it \
                     with Ddp::build_optimizer",
                    self.shard,
                    names.len(),
                    names.first().copied().unwrap_or("none"),
                    expected.len()
                ),
            ));
        }
        Ok(())
    }

    /// Sharded clipping: the global L2 norm is the square root of the sum over ranks of the squares of their own
    /// averaged blocks (padding is zero and adds nothing), one allreduce of one number; every block is then
    /// multiplied by `min(1, max_norm / (norm + 1e-6))` as [`Ddp::clip_grad_norm`] does. Returns the norm.
    pub(super) fn clip_shards(&mut self, max_norm: f64) -> Result<Tensor> {
        let torch = |e| TrainError::torch("gradient clipping over shards", e);
        let grads = self.shard_gradients()?;
        let device = grads.first().map_or(tch::Device::Cpu, Tensor::device);
        let mut squares = Tensor::f_zeros([1], (Kind::Double, device)).map_err(torch)?;
        for g in &grads {
            let s = g.f_to_kind(Kind::Double).and_then(|g| g.f_square()).and_then(|g| g.f_sum(Kind::Double));
            let _ = squares.f_add_(&s.map_err(torch)?).map_err(torch)?;
        }
        let during = "gradient norm allreduce over shards";
        match self.device_comm.as_mut() {
            Some(device_comm) => {
                // SAFETY: `squares` is a contiguous f64 tensor of one element on the collective's device, owned here
                // and not touched by anything else during the call.
                let slice = unsafe {
                    hytrain_cuda::DeviceSlice::from_raw(squares.data_ptr() as u64, hytrain_cuda::DType::F64, 1)
                };
                device_comm
                    .allreduce(slice, hytrain_cuda::DeviceReduceOp::Sum)
                    .map_err(|source| TrainError::DeviceComm { during: during.into(), source })?;
            }
            None => {
                let mut sum = [squares.f_double_value(&[0]).map_err(torch)?];
                self.comm.allreduce(crate::Buffer::F64(&mut sum), ReduceOp::Sum).map_err(comm_err(during))?;
                squares = Tensor::from_slice(&sum);
            }
        }
        // As torch.nn.utils.clip_grad_norm_ does it for float32 gradients: the norm and the factor in float32.
        let total =
            squares.f_sqrt().and_then(|t| t.f_to_kind(Kind::Float)).and_then(|t| t.f_reshape([])).map_err(torch)?;
        let coef = total
            .f_add_scalar(1e-6)
            .and_then(|d| d.f_reciprocal())
            .and_then(|r| r.f_mul_scalar(max_norm))
            .and_then(|c| c.f_clamp_max(1.0))
            .map_err(torch)?;
        for g in &grads {
            let c = coef.f_to_kind(g.kind()).map_err(torch)?;
            let _ = tch::no_grad(|| g.shallow_clone().f_mul_(&c)).map_err(torch)?;
        }
        Ok(total)
    }

    /// This rank's averaged gradient block of every bucket: what its optimizer steps with.
    pub(super) fn shard_gradients(&self) -> Result<Vec<Tensor>> {
        self.buckets
            .iter()
            .map(|b| b.shard_pair().map(|pair| pair.expect("sharded").1))
            .collect::<Result<_, _>>()
            .map_err(|e| TrainError::torch("gradient blocks of the shards", e))
    }

    /// fp16 with sharding: whether any rank's gradient blocks overflowed (`local` is this rank's), so that every rank
    /// skips the step together, as PyTorch's `ShardedGradScaler` does: one allreduce of one number.
    pub(super) fn overflowed_on_any_rank(&mut self, local: bool) -> Result<bool> {
        let during = "fp16 overflow check over shards";
        let flag = if local { 1.0 } else { 0.0 };
        let torch = |e| TrainError::torch(during, e);
        match self.device_comm.as_mut() {
            Some(device_comm) => {
                let device = self.params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
                let count = Tensor::f_full([1], flag, (Kind::Double, device)).map_err(torch)?;
                // SAFETY: `count` is a contiguous f64 tensor of one element on the collective's device, owned here
                // and not touched by anything else during the call.
                let slice = unsafe {
                    hytrain_cuda::DeviceSlice::from_raw(count.data_ptr() as u64, hytrain_cuda::DType::F64, 1)
                };
                device_comm
                    .allreduce(slice, hytrain_cuda::DeviceReduceOp::Sum)
                    .map_err(|source| TrainError::DeviceComm { during: during.into(), source })?;
                Ok(count.f_double_value(&[0]).map_err(torch)? > 0.0)
            }
            None => {
                let mut count = [flag];
                self.comm.allreduce(crate::Buffer::F64(&mut count), ReduceOp::Sum).map_err(comm_err(during))?;
                Ok(count[0] > 0.0)
            }
        }
    }

    /// After the optimizer stepped this rank's blocks: every bucket's flat parameter buffer allgathered, so every
    /// rank's model holds every rank's update.
    pub(super) fn gather_parameters(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        for (i, bucket) in self.buckets.iter_mut().enumerate() {
            let bytes = bucket.bytes();
            let during = || format!("parameter allgather of bucket {i} ({bytes} bytes)");
            match self.device_comm.as_mut() {
                Some(device_comm) => bucket
                    .allgather_parameters_on_device(device_comm.as_mut())
                    .map_err(|source| TrainError::DeviceComm { during: during(), source })?,
                None => bucket.allgather_parameters(self.comm.as_mut()).map_err(comm_err(during()))?,
            }
        }
        self.stats.broadcast_secs += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Loads optimizer state in DDP's checkpoint format (per parameter, `<param>.exp_avg`, as an unsharded run
    /// saves it and a sharded checkpoint is assembled) into `optimizer`: unsharded [`Optimizer::load_state`]; sharded, each bucket's state is laid out flat and this
    /// rank's block kept, whatever world size wrote it. Needs no other rank.
    pub fn load_optimizer_state(&self, optimizer: &mut dyn Optimizer, state: &[(String, Tensor)]) -> Result<()> {
        if self.shard == ShardMode::None {
            return optimizer.load_state(state);
        }
        self.check_optimizer(optimizer)?;
        let by_name: HashMap<&str, usize> = self.params.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
        let mut found: HashMap<(usize, &str), &Tensor> = HashMap::new();
        for (key, t) in state {
            let entry = SUFFIXES.iter().find_map(|suffix| {
                let param = key.strip_suffix(suffix)?.strip_suffix('.')?;
                by_name.get(param).map(|&p| (p, *suffix))
            });
            let Some((p, suffix)) = entry else {
                return Err(TrainError::OptimizerState(format!(
                    "entry {key} belongs to no parameter of this model; was the checkpoint written for another model?"
                )));
            };
            if suffix != "step" && t.numel() != self.params[p].1.numel() {
                return Err(TrainError::OptimizerState(format!(
                    "entry {key} has shape {:?}, parameter {} has {:?}",
                    t.size(),
                    self.params[p].0,
                    self.params[p].1.size()
                )));
            }
            found.insert((p, suffix), t);
        }
        let mut shards = Vec::new();
        for (b, bucket) in self.buckets.iter().enumerate() {
            let block = bucket.block().expect("sharded");
            for suffix in SUFFIXES {
                let parts: Vec<(usize, i64, Option<&Tensor>)> =
                    bucket.layout().map(|(m, off)| (m, off, found.get(&(m, suffix)).copied())).collect();
                let Some(&(_, _, Some(first))) = parts.iter().find(|(_, _, t)| t.is_some()) else {
                    continue;
                };
                if let Some(&(m, _, _)) = parts.iter().find(|(_, _, t)| t.is_none()) {
                    return Err(TrainError::OptimizerState(format!(
                        "parameter {} has no {suffix} state while others of its gradient bucket have: a sharded \
                         optimizer keeps one state per bucket; resume this checkpoint with --shard none",
                        self.params[m].0
                    )));
                }
                let torch = |e| TrainError::torch(format!("laying out optimizer state {suffix} of bucket {b}"), e);
                if suffix == "step" {
                    let steps: Vec<f64> = parts
                        .iter()
                        .map(|(_, _, t)| t.expect("checked").f_to_kind(Kind::Double)?.f_double_value(&[]))
                        .collect::<Result<_, _>>()
                        .map_err(torch)?;
                    if steps.iter().any(|s| *s != steps[0]) {
                        return Err(TrainError::OptimizerState(format!(
                            "the parameters of gradient bucket {b} have different step counts ({steps:?}): a sharded \
                             optimizer steps a bucket as one; resume this checkpoint with --shard none"
                        )));
                    }
                    shards.push((format!("{}.step", shard_name(b)), first.copy()));
                    continue;
                }
                let device = self.params[parts[0].0].1.device();
                let full = Tensor::f_zeros([bucket.padded_numel() as i64], (first.kind(), device)).map_err(torch)?;
                for (m, off, t) in &parts {
                    let n = self.params[*m].1.numel() as i64;
                    let src = t.expect("checked").f_reshape([n]).map_err(torch)?;
                    tch::no_grad(|| full.f_narrow(0, *off, n)?.f_copy_(&src)).map_err(torch)?;
                }
                let own = full.f_narrow(0, block.start as i64, block.len() as i64).and_then(|t| t.f_contiguous());
                shards.push((format!("{}.{suffix}", shard_name(b)), own.map_err(torch)?));
            }
        }
        optimizer.load_state(&shards)
    }
}

impl Ddp {
    /// The layout of this engine's sharded optimizer state, as a sharded checkpoint's manifest records it.
    pub(crate) fn shard_layout(&self, optimizer: &dyn Optimizer) -> Result<ShardLayout> {
        self.check_optimizer(optimizer)?;
        let names: Vec<String> = optimizer.state().into_iter().map(|(n, _)| n).collect();
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(b, bucket)| {
                let prefix = format!("{}.", shard_name(b));
                ShardBucket {
                    params: bucket
                        .layout()
                        .map(|(m, offset)| ShardParam {
                            name: self.params[m].0.clone(),
                            shape: self.params[m].1.size(),
                            offset,
                        })
                        .collect(),
                    numel: bucket.numel(),
                    padded: bucket.padded_numel(),
                    state: names.iter().filter_map(|n| n.strip_prefix(&prefix)).map(str::to_string).collect(),
                }
            })
            .collect();
        Ok(ShardLayout { world_size: self.world_size(), mode: self.shard, buckets })
    }

    /// This rank's optimizer state from a sharded checkpoint of `layout`, not loaded yet: `read(q)` gives old
    /// rank `q`'s shard. Where this engine's buckets are laid out as the checkpoint's, each block is cut from the
    /// shards it overlaps (`false`: load it with [`Optimizer::load_state`]); otherwise every shard is read and the
    /// state assembled per parameter (`true`: load it with [`Ddp::load_optimizer_state`]).
    pub(crate) fn prepare_sharded_state(
        &self,
        optimizer: &dyn Optimizer,
        layout: &ShardLayout,
        read: &mut dyn FnMut(usize) -> Result<Vec<(String, Tensor)>>,
    ) -> Result<(Vec<(String, Tensor)>, bool)> {
        if self.shard != ShardMode::None {
            let own = self.shard_layout(optimizer)?;
            let same = layout.buckets.len() == own.buckets.len()
                && layout.buckets.iter().zip(&own.buckets).all(|(a, b)| a.params == b.params && a.numel == b.numel);
            if same {
                let blocks: Vec<_> = self.buckets.iter().map(|b| b.block().expect("sharded")).collect();
                return Ok((cut(layout, &blocks, read)?, false));
            }
        }
        let all = (0..layout.world_size).map(read).collect::<Result<Vec<_>>>()?;
        let state = assemble(layout, &all).map_err(TrainError::OptimizerState)?;
        Ok((state, true))
    }
}

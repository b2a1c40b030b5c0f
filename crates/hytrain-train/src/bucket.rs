//! Gradient buckets: which parameters share one allreduce, and the flat buffer that carries them.
//!
//! The assignment is a pure function of parameter sizes and kinds, so every rank computes the same one. A bucket's
//! three phases (pack, allreduce, unpack) are separate calls, so a later hook-driven launch can start a bucket as
//! soon as its last gradient is ready instead of after the whole backward pass.
//!
//! As PyTorch DDP's `gradient_as_bucket_view`, each parameter's `.grad` is made a view into its bucket
//! ([`Bucket::view_gradients`]): backward accumulates straight into the bucket, the allreduce averages it in place,
//! and pack and unpack copy nothing. They still copy a gradient that is not its view (one replaced by someone
//! else), so the result is the same either way.

use std::ops::Range;

use hytrain_cuda::{CudaError, DType, DeviceCollective, DeviceReduceOp, DeviceSlice};
use tch::{Device, Kind, TchError, Tensor};

use crate::{Buffer, Collective, CommError, ReduceOp};

/// Bytes in a mebibyte, the unit of `--bucket-mb`.
pub const MB: usize = 1 << 20;

/// Groups parameters into buckets the way PyTorch DDP does: walk them in reverse definition order (gradients of
/// the last layers are ready first in backward), one open bucket per dtype, close a bucket once it holds at least
/// its cap; the first bucket of each dtype has the small `first_cap_bytes` cap so communication starts early.
/// With `alone_from_cap` (ZeRO-2), a parameter of at least `cap_bytes` closes the open bucket before it and gets
/// one of its own, so that its gradient is reduced in its own memory ([`Bucket::pack`]); the values averaged are
/// the same whatever the grouping.
///
/// `tensors` gives `(numel, kind)` per parameter in definition order; the result lists parameter indices per
/// bucket, buckets in the order they are filled.
pub fn assign_buckets(
    tensors: &[(usize, Kind)],
    first_cap_bytes: usize,
    cap_bytes: usize,
    alone_from_cap: bool,
) -> Vec<Vec<usize>> {
    struct Open {
        kind: Kind,
        members: Vec<usize>,
        bytes: usize,
        closed_before: usize,
    }
    let mut open: Vec<Open> = Vec::new();
    let mut done = Vec::new();
    for index in (0..tensors.len()).rev() {
        let (numel, kind) = tensors[index];
        let slot = match open.iter().position(|o| o.kind == kind) {
            Some(s) => s,
            None => {
                open.push(Open { kind, members: Vec::new(), bytes: 0, closed_before: 0 });
                open.len() - 1
            }
        };
        let o = &mut open[slot];
        let bytes = numel * kind.elt_size_in_bytes();
        if alone_from_cap && bytes >= cap_bytes && !o.members.is_empty() {
            done.push(std::mem::take(&mut o.members));
            o.bytes = 0;
            o.closed_before += 1;
        }
        o.members.push(index);
        o.bytes += bytes;
        let cap = if o.closed_before == 0 { first_cap_bytes } else { cap_bytes };
        if o.bytes >= cap {
            done.push(std::mem::take(&mut o.members));
            o.bytes = 0;
            o.closed_before += 1;
        }
    }
    done.extend(open.into_iter().map(|o| o.members).filter(|m| !m.is_empty()));
    done
}

/// Kinds whose gradients can be averaged by a [`Collective`].
pub(crate) fn reducible(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::BFloat16)
}

/// One bucket: its parameters and a flat host buffer holding their gradients back to back.
#[derive(Debug)]
pub struct Bucket {
    members: Vec<usize>,
    offsets: Vec<i64>,
    numel: usize,
    /// Elements of the flat buffers: `numel`, padded to a multiple of the world size when sharded.
    padded: usize,
    kind: Kind,
    // Host memory: the collectives work on byte slices (a device bucket would be staged through here).
    flat: Tensor,
    /// The sharded layout (ZeRO), when the engine shards.
    shard: Option<Sharding>,
}

/// A sharded bucket (ZeRO): its parameters are views of one flat parameter buffer, and this rank owns one block
/// of it and of the averaged gradient.
#[derive(Debug)]
struct Sharding {
    /// This rank's elements of the flat buffers.
    block: Range<usize>,
    /// The flat parameter buffer (padding zero), on the parameters' device; the members are views of it.
    params: Tensor,
    /// ZeRO-2: this rank's block of the averaged gradient, kept while the full gradient buffer is released between
    /// reductions. ZeRO-1 reads the block in the gradient buffer itself.
    grad: Option<Tensor>,
}

/// `t` (contiguous, `n` elements of the reducible `kind`, in host memory) as a collective's buffer.
///
/// # Safety
/// Nothing else may read or write `t`'s memory while the slice lives.
pub(crate) unsafe fn host_buffer<'a>(t: &'a Tensor, kind: Kind, n: usize) -> Buffer<'a> {
    let ptr = t.data_ptr();
    // SAFETY: the caller's promise; `t` holds `n` elements of `kind` from `ptr`. half::bf16 is a transparent
    // u16, libtorch's BFloat16 layout.
    unsafe {
        match kind {
            Kind::Float => Buffer::F32(std::slice::from_raw_parts_mut(ptr.cast::<f32>(), n)),
            Kind::Double => Buffer::F64(std::slice::from_raw_parts_mut(ptr.cast::<f64>(), n)),
            Kind::BFloat16 => Buffer::Bf16(std::slice::from_raw_parts_mut(ptr.cast::<half::bf16>(), n)),
            other => unreachable!("bucket of non-reducible kind {other:?} (Ddp::new checks kinds)"),
        }
    }
}

/// The device collective's dtype of a bucket's kind.
pub(crate) fn device_dtype(kind: Kind) -> DType {
    match kind {
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::BFloat16 => DType::Bf16,
        Kind::Half => DType::F16,
        other => unreachable!("bucket of non-reducible kind {other:?} (Ddp::new checks kinds)"),
    }
}

impl Bucket {
    /// A bucket for `members` (indices into `params`), all of one reducible kind.
    pub fn new(members: Vec<usize>, params: &[(String, Tensor)]) -> Result<Self, TchError> {
        let mut bucket = Bucket::unallocated(members, params)?;
        bucket.flat = Tensor::f_zeros([bucket.numel as i64], (bucket.kind, Device::Cpu))?;
        Ok(bucket)
    }

    /// [`Bucket::new`] without its flat buffer, for a bucket that will be sharded with `release` (ZeRO-2), which
    /// allocates one only from [`Bucket::pack`] to [`Bucket::finish`].
    pub(crate) fn unallocated(members: Vec<usize>, params: &[(String, Tensor)]) -> Result<Self, TchError> {
        let kind = params[members[0]].1.kind();
        let mut offsets = Vec::with_capacity(members.len());
        let mut numel = 0usize;
        for &m in &members {
            offsets.push(numel as i64);
            numel += params[m].1.numel();
        }
        let flat = Tensor::f_zeros([0], (kind, Device::Cpu))?;
        Ok(Bucket { members, offsets, numel, padded: numel, kind, flat, shard: None })
    }

    /// Shards this bucket over `world` ranks as rank `rank` (ZeRO): the flat buffers are padded to a multiple of
    /// `world`, and the members become views of one flat parameter buffer on their device, holding their values,
    /// so that [`Bucket::allgather_parameters`] updates the model in place. With `release` (ZeRO-2) the full
    /// gradient buffer exists only from [`Bucket::pack`] until [`Bucket::finish`]; the members' gradients are
    /// then libtorch's own until packed, and undefined after.
    pub(crate) fn shard(
        &mut self,
        params: &[(String, Tensor)],
        rank: usize,
        world: usize,
        release: bool,
    ) -> Result<(), TchError> {
        let padded = self.numel.div_ceil(world) * world;
        let device = params[self.members[0]].1.device();
        let flat_params = Tensor::f_zeros([padded as i64], (self.kind, device))?;
        for (&m, &off) in self.members.iter().zip(&self.offsets) {
            let p = &params[m].1;
            let view = flat_params.f_narrow(0, off, p.numel() as i64)?.f_view(p.size().as_slice())?;
            tch::no_grad(|| view.shallow_clone().f_copy_(p))?;
            // Every handle on the parameter (the model's own included) shares its TensorImpl: all see the view.
            p.shallow_clone().f_set_data(&view)?;
        }
        let block = hytrain_comm::block_range(padded, world, rank);
        let grad = if release { Some(Tensor::f_zeros([block.len() as i64], (self.kind, device))?) } else { None };
        self.padded = padded;
        self.flat = Tensor::f_zeros([if release { 0 } else { padded as i64 }], (self.kind, self.flat.device()))?;
        self.shard = Some(Sharding { block, params: flat_params, grad });
        Ok(())
    }

    /// Whether the full gradient buffer is released between reductions (ZeRO-2).
    pub(crate) fn releases_gradients(&self) -> bool {
        self.shard.as_ref().is_some_and(|s| s.grad.is_some())
    }

    /// A sharded bucket's block of the parameters and of the averaged gradient (views), the pair the optimizer
    /// steps; `None` unsharded.
    pub(crate) fn shard_pair(&self) -> Result<Option<(Tensor, Tensor)>, TchError> {
        let Some(shard) = &self.shard else {
            return Ok(None);
        };
        let (start, len) = (shard.block.start as i64, shard.block.len() as i64);
        let params = shard.params.f_narrow(0, start, len)?;
        let grad = match &shard.grad {
            Some(grad) => grad.shallow_clone(),
            None => self.flat.f_narrow(0, start, len)?,
        };
        Ok(Some((params, grad)))
    }

    /// Elements of the flat buffers without padding: the members' elements.
    pub(crate) fn numel(&self) -> usize {
        self.numel
    }

    /// Elements of the flat buffers with padding (a multiple of the world size when sharded).
    pub(crate) fn padded_numel(&self) -> usize {
        self.padded
    }

    /// Where each member's values sit in the flat buffers: `(member, offset)`.
    pub(crate) fn layout(&self) -> impl Iterator<Item = (usize, i64)> + '_ {
        self.members.iter().copied().zip(self.offsets.iter().copied())
    }

    /// This rank's block of the flat buffers, when sharded.
    pub(crate) fn block(&self) -> Option<Range<usize>> {
        self.shard.as_ref().map(|s| s.block.clone())
    }

    /// Indices of the parameters in this bucket, in the order their gradients sit in the buffer.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// Whether `grad` (the gradient of member `member`, an index into the parameters) is the view of this
    /// bucket's buffer at its place.
    #[cfg(test)]
    pub(crate) fn holds_gradient(&self, member: usize, grad: &Tensor) -> bool {
        match self.members.iter().position(|&m| m == member) {
            Some(i) => self.is_view(grad, self.offsets[i]),
            None => false,
        }
    }

    /// Size of the flat buffer in bytes (padding included when sharded).
    pub fn bytes(&self) -> usize {
        self.padded * self.kind.elt_size_in_bytes()
    }

    /// Makes each member's `.grad` a view of its place in the flat buffer, holding the gradient it had (zeros when
    /// it had none). Call again after the buffer moves ([`Bucket::to_device`]).
    ///
    /// A bucket that releases its gradients between reductions (ZeRO-2) has no buffer to view: nothing is done.
    pub fn view_gradients(&self, params: &[(String, Tensor)]) -> Result<(), TchError> {
        if self.releases_gradients() {
            return Ok(());
        }
        for (&m, &off) in self.members.iter().zip(&self.offsets) {
            let p = &params[m].1;
            let view = self.flat.f_narrow(0, off, p.numel() as i64)?.f_view(p.size().as_slice())?;
            let grad = p.grad();
            tch::no_grad(|| {
                if grad.defined() {
                    view.shallow_clone().f_copy_(&grad)
                } else {
                    view.shallow_clone().f_zero_().map(drop)
                }
            })?;
            crate::shim::set_grad(p, &view)?;
        }
        Ok(())
    }

    /// Whether `grad`, the gradient of the member at `offset`, is the view of the flat buffer there.
    fn is_view(&self, grad: &Tensor, offset: i64) -> bool {
        let at = self.flat.data_ptr() as usize + offset as usize * self.kind.elt_size_in_bytes();
        grad.device() == self.flat.device()
            && grad.kind() == self.kind
            && grad.data_ptr() as usize == at
            && grad.is_contiguous()
    }

    /// Copies the members' gradients into the flat buffer, except those that are its views already. Returns the
    /// name of a member without a gradient.
    ///
    /// A bucket that releases its gradients (ZeRO-2) allocates its buffer here, takes an undefined gradient as
    /// zeros (the engine checks separately that every parameter got one at some step, as with views), and
    /// undefines the members' gradients once copied. Its one member's gradient, when it already has the buffer's
    /// shape and layout (contiguous, no padding), becomes the buffer itself: nothing is allocated or copied.
    pub fn pack(&mut self, params: &[(String, Tensor)]) -> Result<Result<(), String>, TchError> {
        let release = self.releases_gradients();
        if release {
            if let Some(grad) = self.reusable_gradient(params)? {
                self.flat = grad;
                crate::shim::set_grad(&params[self.members[0]].1, &Tensor::new())?;
                return Ok(Ok(()));
            }
            self.flat = Tensor::f_zeros([self.padded as i64], (self.kind, self.flat.device()))?;
        }
        for (&m, &off) in self.members.iter().zip(&self.offsets) {
            let (name, p) = &params[m];
            let grad = p.grad();
            if !grad.defined() && release {
                continue;
            }
            if !grad.defined() {
                return Ok(Err(name.clone()));
            }
            if self.is_view(&grad, off) {
                continue;
            }
            let n = p.numel() as i64;
            let mut dst = self.flat.f_narrow(0, off, n)?;
            tch::no_grad(|| dst.f_copy_(&grad.f_reshape([n])?))?;
        }
        if release {
            for &m in &self.members {
                // Backward has finished with these gradients (their hooks fired, or it returned): only the
                // bucket's copy is needed now.
                crate::shim::set_grad(&params[m].1, &Tensor::new())?;
            }
        }
        Ok(Ok(()))
    }

    /// The gradient of a one-member bucket as a flat buffer of `padded` elements, when its memory can be the
    /// bucket's (ZeRO-2 averages it in place and then releases it): contiguous, of the bucket's kind and device,
    /// with no padding to add. Backward made it for this parameter alone (libtorch's gradient accumulation steals
    /// or copies what it is given), and the parameter lets go of it when packed.
    fn reusable_gradient(&self, params: &[(String, Tensor)]) -> Result<Option<Tensor>, TchError> {
        let [member] = self.members[..] else {
            return Ok(None);
        };
        let grad = params[member].1.grad();
        let fits = grad.defined()
            && grad.is_contiguous()
            && grad.numel() == self.padded
            && grad.kind() == self.kind
            && grad.device() == self.flat.device();
        if !fits {
            return Ok(None);
        }
        grad.f_view([self.padded as i64]).map(Some)
    }

    /// Averages the packed buffer over all ranks: one allreduce unsharded; sharded, one reduce-scatter that leaves
    /// this rank's block averaged (bit for bit what the allreduce of the same padded buffer gives there).
    pub(crate) fn reduce(&mut self, comm: &mut dyn Collective) -> Result<(), CommError> {
        if self.shard.is_none() {
            return self.allreduce(comm);
        }
        // SAFETY: as in `allreduce`: `flat` is this bucket's contiguous host buffer of `padded` elements, and no
        // one touches it while it is reduced.
        let buf = unsafe { host_buffer(&self.flat, self.kind, self.padded) };
        comm.reduce_scatter(buf, ReduceOp::Avg)
    }

    /// [`Bucket::reduce`] through a device collective, with the buffer on its GPU.
    pub(crate) fn reduce_on_device(&mut self, comm: &mut dyn DeviceCollective) -> Result<(), CudaError> {
        if self.shard.is_none() {
            return self.allreduce_on_device(comm);
        }
        if self.flat.device() == Device::Cpu && !comm.host_memory() {
            return Err(CudaError::Shape(
                "a gradient bucket in host memory was handed to a GPU collective; move the model to the GPU first"
                    .into(),
            ));
        }
        // SAFETY: `flat` is a contiguous buffer of `padded` elements of `kind` on the collective's device, owned by
        // this bucket and borrowed mutably for the call, which returns once the collective is queued in order.
        let slice = unsafe { DeviceSlice::from_raw(self.flat.data_ptr() as u64, device_dtype(self.kind), self.padded) };
        comm.reduce_scatter(slice, DeviceReduceOp::Avg)
    }

    /// After [`Bucket::reduce`]: unsharded, the averages go back into gradients that are not views
    /// ([`Bucket::unpack`]); sharded, nothing but this rank's block is meaningful, and ZeRO-2 keeps that block and
    /// releases the full buffer.
    pub(crate) fn finish(&mut self, params: &[(String, Tensor)]) -> Result<(), TchError> {
        let Some(shard) = &self.shard else {
            return self.unpack(params);
        };
        if let Some(grad) = &shard.grad {
            let block = self.flat.f_narrow(0, shard.block.start as i64, shard.block.len() as i64)?;
            tch::no_grad(|| grad.shallow_clone().f_copy_(&block))?;
            self.flat = Tensor::f_zeros([0], (self.kind, self.flat.device()))?;
        }
        Ok(())
    }

    /// Copies every rank's block of the flat parameter buffer to every rank (after each rank stepped its own):
    /// the members, views of it, then hold the updated parameters.
    pub(crate) fn allgather_parameters(&mut self, comm: &mut dyn Collective) -> Result<(), CommError> {
        let shard = self.shard.as_ref().expect("called for sharded buckets");
        // SAFETY: the flat parameter buffer is contiguous host memory of `padded` elements owned by this bucket;
        // nothing reads or writes the parameters while the step's allgather runs on this thread.
        let buf = unsafe { host_buffer(&shard.params, self.kind, self.padded) };
        comm.allgather_blocks(buf)
    }

    /// [`Bucket::allgather_parameters`] through a device collective, the parameters on its GPU.
    pub(crate) fn allgather_parameters_on_device(&mut self, comm: &mut dyn DeviceCollective) -> Result<(), CudaError> {
        let shard = self.shard.as_ref().expect("called for sharded buckets");
        if shard.params.device() == Device::Cpu && !comm.host_memory() {
            return Err(CudaError::Shape(
                "the model's parameters are in host memory; move the model to the GPU first".into(),
            ));
        }
        // SAFETY: the flat parameter buffer is a contiguous buffer of `padded` elements of `kind` on the
        // collective's device, owned by this bucket, and nothing else writes it during the call.
        let slice =
            unsafe { DeviceSlice::from_raw(shard.params.data_ptr() as u64, device_dtype(self.kind), self.padded) };
        comm.allgather_blocks(slice)
    }

    /// Averages the flat buffer over all ranks with one allreduce.
    pub fn allreduce(&mut self, comm: &mut dyn Collective) -> Result<(), CommError> {
        if self.numel == 0 {
            return Ok(());
        }
        // SAFETY: `flat` is a contiguous CPU tensor of exactly `numel` elements of `kind`, created and owned by this
        // bucket; the only other handles on its memory are its members' gradients (views), which nothing reads or
        // writes while their bucket is reduced (backward is done with them), so the slice (borrowing `self`) is
        // the only access while it lives.
        let buf = unsafe { host_buffer(&self.flat, self.kind, self.numel) };
        comm.allreduce(buf, ReduceOp::Avg)
    }

    /// Moves the flat buffer to `device`, where the gradients live, so a GPU collective reduces it in place.
    pub fn to_device(&mut self, device: Device) -> Result<(), TchError> {
        self.flat = self.flat.f_to_device(device)?;
        Ok(())
    }

    /// Averages the flat buffer, which must be on the collective's GPU (see [`Bucket::to_device`]), over all ranks
    /// with one device allreduce.
    pub fn allreduce_on_device(&mut self, comm: &mut dyn DeviceCollective) -> Result<(), CudaError> {
        let dtype = device_dtype(self.kind);
        if self.flat.device() == Device::Cpu && !comm.host_memory() {
            return Err(CudaError::Shape(
                "a gradient bucket in host memory was handed to a GPU collective; move the model to the GPU first"
                    .into(),
            ));
        }
        // SAFETY: `flat` is a contiguous tensor of exactly `numel` elements of `kind` on the GPU, owned by this bucket
        // and borrowed mutably for the call, which returns only after the collective completed on the device.
        let slice = unsafe { DeviceSlice::from_raw(self.flat.data_ptr() as u64, dtype, self.numel) };
        comm.allreduce(slice, DeviceReduceOp::Avg)
    }

    /// Copies the averaged values back into the members' gradients, except those that are its views.
    pub fn unpack(&self, params: &[(String, Tensor)]) -> Result<(), TchError> {
        for (&m, &off) in self.members.iter().zip(&self.offsets) {
            let p = &params[m].1;
            let mut grad = p.grad();
            if self.is_view(&grad, off) {
                continue;
            }
            let src = self.flat.f_narrow(0, off, p.numel() as i64)?.f_view(grad.size().as_slice())?;
            tch::no_grad(|| grad.f_copy_(&src))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_walk_parameters_in_reverse_with_a_small_first_bucket() {
        // Four f32 parameters of 1 MiB each and a bias of 4 bytes; caps 1 MiB then 3 MiB.
        let p = [
            (MB / 4, Kind::Float),
            (1, Kind::Float),
            (MB / 4, Kind::Float),
            (MB / 4, Kind::Float),
            (MB / 4, Kind::Float),
        ];
        let b = assign_buckets(&p, MB, 3 * MB, false);
        assert_eq!(b, vec![vec![4], vec![3, 2, 1, 0]]);
    }

    #[test]
    fn every_parameter_lands_in_exactly_one_bucket_and_caps_are_respected() {
        let sizes: Vec<(usize, Kind)> = (1..200).map(|i| ((i * 7919) % 5000 + 1, Kind::Float)).collect();
        let cap = 64 * 1024;
        let first = 4 * 1024;
        let buckets = assign_buckets(&sizes, first, cap, false);
        let mut seen: Vec<usize> = buckets.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..sizes.len()).collect::<Vec<_>>());
        for (i, b) in buckets.iter().enumerate() {
            let bytes: usize = b.iter().map(|&m| sizes[m].0 * 4).sum();
            let without_last: usize = b[..b.len() - 1].iter().map(|&m| sizes[m].0 * 4).sum();
            let c = if i == 0 { first } else { cap };
            // A bucket closes as soon as it reaches its cap, so it is under the cap before its last member.
            assert!(without_last < c, "bucket {i} overfilled: {bytes} bytes");
            // Indices descend inside a bucket: reverse definition order.
            assert!(b.windows(2).all(|w| w[0] > w[1]));
        }
    }

    #[test]
    fn a_parameter_as_large_as_the_cap_gets_a_bucket_of_its_own() {
        // Caps 1 MiB then 3 MiB; parameters in definition order: 2 MiB, a bias, 3 MiB, a bias, 4 bytes.
        let p =
            [(MB / 2, Kind::Float), (8, Kind::Float), (3 * MB / 4, Kind::Float), (8, Kind::Float), (1, Kind::Float)];
        // Walking backwards: the two small ones, then the 3 MiB weight closes them and stands alone; the 2 MiB one
        // (under the 3 MiB cap) shares with the bias before it.
        assert_eq!(assign_buckets(&p, MB, 3 * MB, true), vec![vec![4, 3], vec![2], vec![1, 0]]);
        // As PyTorch DDP groups them: the 3 MiB weight joins the small ones of the first bucket.
        assert_eq!(assign_buckets(&p, MB, 3 * MB, false), vec![vec![4, 3, 2], vec![1, 0]]);
    }

    #[test]
    fn kinds_never_share_a_bucket() {
        let p = [(10, Kind::Float), (10, Kind::Double), (10, Kind::Float), (10, Kind::Double)];
        let b = assign_buckets(&p, MB, MB, false);
        assert_eq!(b, vec![vec![3, 1], vec![2, 0]]);
    }

    #[test]
    fn pack_and_unpack_round_trip_gradients() {
        let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let loss = (&a * 2.0).sum(Kind::Float) + (&b * &b).sum(Kind::Float);
        loss.backward();
        let params = vec![("a".to_string(), a.shallow_clone()), ("b".to_string(), b.shallow_clone())];
        let mut bucket = Bucket::new(vec![1, 0], &params).unwrap();
        assert_eq!(bucket.bytes(), 40);
        bucket.pack(&params).unwrap().unwrap();
        let flat: Vec<f32> = Vec::try_from(&bucket.flat).unwrap();
        assert_eq!(flat, vec![2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
        let _ = tch::no_grad(|| bucket.flat.f_mul_scalar_(0.5)).unwrap();
        bucket.unpack(&params).unwrap();
        assert_eq!(Vec::<f32>::try_from(a.grad().flatten(0, -1)).unwrap(), vec![1.0; 6]);
        assert_eq!(Vec::<f32>::try_from(b.grad()).unwrap(), vec![1.0; 4]);
    }

    #[test]
    fn gradients_as_views_accumulate_into_the_bucket_and_pack_copies_nothing() {
        let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = vec![("a".to_string(), a.shallow_clone()), ("b".to_string(), b.shallow_clone())];
        let mut bucket = Bucket::new(vec![1, 0], &params).unwrap();
        bucket.view_gradients(&params).unwrap();
        assert_eq!(Vec::<f32>::try_from(&bucket.flat).unwrap(), vec![0.0; 10], "views start at zero");
        ((&a * 2.0).sum(Kind::Float) + (&b * &b).sum(Kind::Float)).backward();
        // Backward wrote into the bucket through the views: b's 2.0s first, then a's 2.0s.
        assert_eq!(Vec::<f32>::try_from(&bucket.flat).unwrap(), vec![2.0; 10]);
        bucket.pack(&params).unwrap().unwrap();
        let _ = tch::no_grad(|| bucket.flat.f_mul_scalar_(0.5)).unwrap();
        bucket.unpack(&params).unwrap();
        // Scaling the bucket scaled the gradients themselves: they are its memory.
        assert_eq!(Vec::<f32>::try_from(a.grad().flatten(0, -1)).unwrap(), vec![1.0; 6]);
        assert_eq!(a.grad().data_ptr() as usize, bucket.flat.data_ptr() as usize + 4 * 4);
        // A gradient replaced by another tensor is copied again, so the bucket still carries it.
        crate::shim::set_grad(&b, &Tensor::full([4], 3.0, (Kind::Float, Device::Cpu))).unwrap();
        bucket.pack(&params).unwrap().unwrap();
        assert_eq!(Vec::<f32>::try_from(bucket.flat.narrow(0, 0, 4)).unwrap(), vec![3.0; 4]);
    }

    #[test]
    fn zero2_packs_a_lone_gradient_in_place_and_copies_one_that_needs_padding() {
        // World size 2: a 2x3 weight needs no padding, a 5-element one is padded to 6.
        let w = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let v = Tensor::ones([5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = vec![("w".to_string(), w.shallow_clone()), ("v".to_string(), v.shallow_clone())];
        let mut lone = Bucket::new(vec![0], &params).unwrap();
        let mut padded = Bucket::new(vec![1], &params).unwrap();
        lone.shard(&params, 1, 2, true).unwrap();
        padded.shard(&params, 1, 2, true).unwrap();
        ((&w * 3.0).sum(Kind::Float) + (&v * 2.0).sum(Kind::Float)).backward();
        let (w_grad, v_grad) = (w.grad().data_ptr() as usize, v.grad().data_ptr() as usize);
        lone.pack(&params).unwrap().unwrap();
        padded.pack(&params).unwrap().unwrap();
        assert_eq!(lone.flat.data_ptr() as usize, w_grad, "the gradient's own memory is the bucket's buffer");
        assert_ne!(padded.flat.data_ptr() as usize, v_grad, "a padded bucket gets a buffer of its own");
        assert_eq!(Vec::<f32>::try_from(&lone.flat).unwrap(), vec![3.0; 6]);
        assert_eq!(Vec::<f32>::try_from(&padded.flat).unwrap(), vec![2.0, 2.0, 2.0, 2.0, 2.0, 0.0]);
        assert!(!w.grad().defined() && !v.grad().defined(), "packing releases the parameters' gradients");
        // This rank's block (elements 3..6) is kept; the full buffer goes.
        lone.finish(&params).unwrap();
        assert_eq!(lone.flat.numel(), 0);
        let (_, grad) = lone.shard_pair().unwrap().unwrap();
        assert_eq!(Vec::<f32>::try_from(&grad).unwrap(), vec![3.0; 3]);
    }

    #[test]
    fn pack_names_a_parameter_without_gradient() {
        let a = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = vec![("unused.weight".to_string(), a)];
        let mut bucket = Bucket::new(vec![0], &params).unwrap();
        assert_eq!(bucket.pack(&params).unwrap(), Err("unused.weight".to_string()));
    }
}

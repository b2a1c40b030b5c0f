//! The exactness cases every [`Collective`] backend must pass, against a sequential reference. One file, included
//! by the conformance test (`tests/conformance/main.rs`: ring, shm, in-process, world size 1, the trait's default
//! methods, shm across processes), by the MPI example that `mpirun` runs, and by the ring's and shm's unit tests
//! (which run them with tiny segments and slots).
//!
//! What "exact" means here:
//! - allreduce, reduce_scatter (Sum and Avg; f32, f64, bf16): integer-valued inputs whose sums are exact in every
//!   type and order, so every backend must give the reference's bits (`sum as T / world as T`, bf16 summed in
//!   f32 and rounded once).
//! - Arbitrary floats (sums then depend on the order of addition): allreduce within `world * eps * sum |x|` of
//!   the reference (plus bf16's final rounding), the same values on every rank (checked through a broadcast
//!   from rank 0), and reduce_scatter's own block bit for bit the allreduce's (or, for a backend whose library
//!   chooses its own order, MPI, within the same bound).
//! - broadcast from every root, allgather, allgather_blocks: bytes, exact.
//! - reduce_scatter and allgather_blocks of a length that is no multiple of world_size: refused, naming the
//!   padding, and the backend still works.

// Each file that includes this one uses one of the two orders.
#![allow(dead_code)]

use half::bf16;
use hytrain_comm::{block_range, Buffer, Collective, CommError, ReduceOp};

/// The buffer lengths the cases use.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// allreduce lengths, none divisible by 2, 3 or 4.
    pub lens: &'static [usize],
    /// Block lengths for reduce_scatter and allgather_blocks (times world_size).
    pub blocks: &'static [usize],
}

/// Up to 1 MiB of f32, several ring segments of the default 512 KiB and a shm slot of the default size.
pub const FULL: Sizes = Sizes { lens: &[0, 1, 7, 4099, 262_147], blocks: &[0, 1, 5, 2053, 65_537] };
/// For tiny segments and slots, where every kilobyte is many rounds.
pub const SMALL: Sizes = Sizes { lens: &[0, 1, 7, 1001], blocks: &[0, 1, 5, 251] };

/// What a backend promises beyond the exact cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// reduce_scatter's blocks are allreduce's bit for bit (ring, shm, in-process, the trait defaults).
    SameAsAllreduce,
    /// The library picks the order of each collective (MPI): within the rounding bound only.
    Library,
}

/// Integer values: sums are exact in f32, f64 and bf16 (at most 4 ranks x 16 < 256).
fn value(i: usize, rank: usize) -> f64 {
    ((i * 7 + rank * 3) % 17) as f64
}

/// Arbitrary floats in [-1, 1) with every mantissa bit in use, the same on every backend.
fn noise(i: usize, rank: usize) -> f64 {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// The three element types, built from `f` (f64 values) and read back as f64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DType {
    F32,
    F64,
    Bf16,
}

const DTYPES: [DType; 3] = [DType::F32, DType::F64, DType::Bf16];

enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bf16(Vec<bf16>),
}

impl Values {
    fn new(dtype: DType, len: usize, f: impl Fn(usize) -> f64) -> Values {
        match dtype {
            DType::F32 => Values::F32((0..len).map(|i| f(i) as f32).collect()),
            DType::F64 => Values::F64((0..len).map(f).collect()),
            DType::Bf16 => Values::Bf16((0..len).map(|i| bf16::from_f64(f(i))).collect()),
        }
    }

    fn buffer(&mut self) -> Buffer<'_> {
        match self {
            Values::F32(v) => Buffer::F32(v),
            Values::F64(v) => Buffer::F64(v),
            Values::Bf16(v) => Buffer::Bf16(v),
        }
    }

    fn get(&self, i: usize) -> f64 {
        match self {
            Values::F32(v) => v[i] as f64,
            Values::F64(v) => v[i],
            Values::Bf16(v) => v[i].to_f64(),
        }
    }

    fn bits(&self, i: usize) -> u64 {
        match self {
            Values::F32(v) => v[i].to_bits() as u64,
            Values::F64(v) => v[i].to_bits(),
            Values::Bf16(v) => v[i].to_bits() as u64,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Values::F32(v) => bytemuck::cast_slice(v).to_vec(),
            Values::F64(v) => bytemuck::cast_slice(v).to_vec(),
            Values::Bf16(v) => bytemuck::cast_slice(v).to_vec(),
        }
    }
}

/// `x` as the element type holds it.
fn held(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::F64 => x,
        DType::Bf16 => bf16::from_f64(x).to_f64(),
    }
}

/// The relative precision of sums in `dtype` (bf16 is summed in f32).
fn eps(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::Bf16 => f32::EPSILON as f64,
        DType::F64 => f64::EPSILON,
    }
}

/// How far two sums of the same `world` values in different orders may be apart: `world` roundings of at most
/// `sum |x|` each, plus one bf16 rounding of the result for bf16.
fn bound(dtype: DType, world: usize, magnitude: f64, result: f64) -> f64 {
    let rounding = if dtype == DType::Bf16 { result.abs() / 128.0 } else { 0.0 };
    world as f64 * eps(dtype) * magnitude + rounding
}

/// The reference result of reducing `f` over `world` ranks at element `i`, as the element type computes it.
fn reference(dtype: DType, world: usize, op: ReduceOp, f: impl Fn(usize, usize) -> f64, i: usize) -> u64 {
    let sum: f64 = (0..world).map(|r| f(i, r)).sum();
    let n = if op == ReduceOp::Avg { world } else { 1 };
    match dtype {
        DType::F32 => (sum as f32 / n as f32).to_bits() as u64,
        DType::F64 => (sum / n as f64).to_bits(),
        DType::Bf16 => bf16::from_f32(sum as f32 / n as f32).to_bits() as u64,
    }
}

/// Runs every case on `c` (every rank of the job must call this at once) and returns what failed.
pub fn run(c: &mut dyn Collective, order: Order, sizes: Sizes) -> Vec<String> {
    let mut bad = Vec::new();
    let mut check = |what: String, ok: Result<bool, CommError>| match ok {
        Ok(true) => {}
        Ok(false) => bad.push(what),
        Err(e) => bad.push(format!("{what}: {e}")),
    };
    for &len in sizes.lens {
        for dtype in DTYPES {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                check(format!("allreduce {dtype:?} {op:?} len {len}"), allreduce_exact(c, dtype, op, len));
            }
        }
    }
    for &block in sizes.blocks {
        for dtype in DTYPES {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                check(
                    format!("reduce_scatter {dtype:?} {op:?} block {block}"),
                    reduce_scatter_exact(c, dtype, op, block),
                );
                check(
                    format!("reduce_scatter {dtype:?} {op:?} block {block} vs allreduce on arbitrary floats"),
                    reduce_scatter_as_allreduce(c, dtype, op, block, order),
                );
            }
            check(format!("allgather_blocks {dtype:?} block {block}"), allgather_blocks_exact(c, dtype, block));
        }
    }
    for &len in &[0, 1, 7, sizes.lens[sizes.lens.len() - 1]] {
        for root in 0..c.world_size() {
            check(format!("broadcast of {len} bytes from {root}"), broadcast_exact(c, len, root));
        }
        check(format!("allgather of {len} bytes"), allgather_exact(c, len));
    }
    check("barrier".into(), c.barrier().map(|()| true));
    check("refusals of lengths that are no multiple of world_size".into(), refusals(c));
    bad
}

fn allreduce_exact(c: &mut dyn Collective, dtype: DType, op: ReduceOp, len: usize) -> Result<bool, CommError> {
    let (rank, world) = (c.rank(), c.world_size());
    let mut v = Values::new(dtype, len, |i| value(i, rank));
    c.allreduce(v.buffer(), op)?;
    if !(0..len).all(|i| v.bits(i) == reference(dtype, world, op, value, i)) {
        return Ok(false);
    }
    // Arbitrary floats: close to the reference, and the same bits on every rank.
    let mut v = Values::new(dtype, len, |i| noise(i, rank));
    c.allreduce(v.buffer(), op)?;
    let n = if op == ReduceOp::Avg { world as f64 } else { 1.0 };
    let close = (0..len).all(|i| {
        let exact: f64 = (0..world).map(|r| held(dtype, noise(i, r))).sum::<f64>() / n;
        let magnitude: f64 = (0..world).map(|r| noise(i, r).abs()).sum::<f64>() / n;
        (v.get(i) - exact).abs() <= bound(dtype, world, magnitude, exact)
    });
    let mut mine = v.bytes();
    let mut first = mine.clone();
    c.broadcast(&mut first, 0)?;
    mine.truncate(first.len());
    Ok(close && mine == first)
}

fn reduce_scatter_exact(c: &mut dyn Collective, dtype: DType, op: ReduceOp, block: usize) -> Result<bool, CommError> {
    let (rank, world) = (c.rank(), c.world_size());
    let len = block * world;
    let mut v = Values::new(dtype, len, |i| value(i, rank));
    c.reduce_scatter(v.buffer(), op)?;
    Ok(block_range(len, world, rank).all(|i| v.bits(i) == reference(dtype, world, op, value, i)))
}

fn reduce_scatter_as_allreduce(
    c: &mut dyn Collective,
    dtype: DType,
    op: ReduceOp,
    block: usize,
    order: Order,
) -> Result<bool, CommError> {
    let (rank, world) = (c.rank(), c.world_size());
    let len = block * world;
    let mut all = Values::new(dtype, len, |i| noise(i, rank));
    c.allreduce(all.buffer(), op)?;
    let mut scattered = Values::new(dtype, len, |i| noise(i, rank));
    c.reduce_scatter(scattered.buffer(), op)?;
    Ok(block_range(len, world, rank).all(|i| match order {
        Order::SameAsAllreduce => scattered.bits(i) == all.bits(i),
        Order::Library => {
            let n = if op == ReduceOp::Avg { world as f64 } else { 1.0 };
            let magnitude: f64 = (0..world).map(|r| noise(i, r).abs()).sum::<f64>() / n;
            (scattered.get(i) - all.get(i)).abs() <= 2.0 * bound(dtype, world, magnitude, all.get(i))
        }
    }))
}

fn allgather_blocks_exact(c: &mut dyn Collective, dtype: DType, block: usize) -> Result<bool, CommError> {
    let (rank, world) = (c.rank(), c.world_size());
    let len = block * world;
    let mine = block_range(len, world, rank);
    // Other blocks start as values no rank sends, so a block that did not arrive shows.
    let mut v = Values::new(dtype, len, |i| if mine.contains(&i) { noise(i, rank) } else { -7.0 });
    c.allgather_blocks(v.buffer())?;
    let expect = Values::new(dtype, len, |i| noise(i, i / block.max(1)));
    Ok((0..len).all(|i| v.bits(i) == expect.bits(i)))
}

fn broadcast_exact(c: &mut dyn Collective, len: usize, root: usize) -> Result<bool, CommError> {
    let rank = c.rank();
    let mut b: Vec<u8> = (0..len).map(|i| if rank == root { (i * 31 + root) as u8 } else { 0xEE }).collect();
    c.broadcast(&mut b, root)?;
    Ok(b.iter().enumerate().all(|(i, v)| *v == (i * 31 + root) as u8))
}

fn allgather_exact(c: &mut dyn Collective, len: usize) -> Result<bool, CommError> {
    let (rank, world) = (c.rank(), c.world_size());
    let input: Vec<u8> = (0..len).map(|i| (i + rank * 100) as u8).collect();
    let mut out = vec![0xEEu8; len * world];
    c.allgather(&input, &mut out)?;
    Ok(out.iter().enumerate().all(|(k, v)| *v == (k % len.max(1) + (k / len.max(1)) * 100) as u8))
}

/// A length that is no multiple of world_size is refused with the padding named, before any data moves (so every
/// rank refuses and none waits), and the backend still works afterwards.
fn refusals(c: &mut dyn Collective) -> Result<bool, CommError> {
    let world = c.world_size();
    if world == 1 {
        return Ok(true);
    }
    let mut odd = vec![1.0f32; world + 1];
    let rs = c.reduce_scatter(Buffer::F32(&mut odd), ReduceOp::Sum);
    let ag = c.allgather_blocks(Buffer::F32(&mut odd));
    let refused = |r: Result<(), CommError>, op: &str| match r {
        Err(CommError::InvalidArgument { op: o, detail }) => {
            o == op
                && detail.contains(&format!("{} f32 elements do not split into {world} equal blocks", world + 1))
                && detail.contains(&format!("pads the buffer to a multiple of world_size ({} elements)", 2 * world))
        }
        _ => false,
    };
    let ok = refused(rs, "reduce_scatter") && refused(ag, "allgather_blocks");
    let mut v = vec![1.0f64; world];
    c.reduce_scatter(Buffer::F64(&mut v), ReduceOp::Sum)?;
    Ok(ok && v[c.rank()] == world as f64)
}

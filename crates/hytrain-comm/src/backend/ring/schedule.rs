//! Which bytes each rank sends and receives at each step of a ring collective.
//!
//! A plan is a list of steps; at step `t` a rank sends the element range `send` to its next rank and receives the
//! range `recv` from its previous rank, reducing into or overwriting its buffer. Ranges are cut into segments so
//! that sending and receiving overlap. The plans keep one invariant the pipelined engine relies on: from step 1 on,
//! a non-empty `send` range is exactly the previous step's `recv` range, so segment `j` of step `t` may leave as
//! soon as segment `j` of step `t - 1` has arrived.

use std::ops::Range;

/// What to do with a received segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Add it to the local values.
    Reduce,
    /// Overwrite the local values.
    Copy,
}

/// One step of a ring collective on one rank (element ranges; an empty range means nothing moves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub send: Range<usize>,
    pub recv: Range<usize>,
    pub action: Action,
}

/// Elements of chunk `c` when `len` elements are split into `world` chunks as evenly as possible (the first
/// `len % world` chunks are one longer).
pub(crate) fn chunk(len: usize, world: usize, c: usize) -> Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = c * base + c.min(extra);
    start..start + base + usize::from(c < extra)
}

/// How many segments of at most `seg` elements cover `r`.
pub(crate) fn segment_count(r: &Range<usize>, seg: usize) -> usize {
    r.len().div_ceil(seg)
}

/// Segment `j` of `r`.
pub(crate) fn segment(r: &Range<usize>, seg: usize, j: usize) -> Range<usize> {
    let start = r.start + j * seg;
    start..(start + seg).min(r.end)
}

fn ring_index(rank: usize, back: usize, world: usize) -> usize {
    (rank + world - back % world) % world
}

/// The reduce-scatter half of a ring allreduce over the chunks `chunk(0..world)` (disjoint element ranges):
/// after `world - 1` steps rank `r` holds chunk `r` reduced over all ranks. Chunk `c` starts at rank `c + 1`
/// and gathers one rank's values per step, so its sum is `x[c+1] + x[c+2] + ... + x[c]` in that order on every
/// plan that uses these steps: a reduce-scatter leaves exactly the values an allreduce computes for that chunk.
fn reduce_scatter_steps(world: usize, rank: usize, chunk: impl Fn(usize) -> Range<usize>, out: &mut Vec<Step>) {
    for t in 0..world - 1 {
        out.push(Step {
            send: chunk(ring_index(rank, t + 1, world)),
            recv: chunk(ring_index(rank, t + 2, world)),
            action: Action::Reduce,
        });
    }
}

/// The allgather half: rank `r` starts with chunk `r` and passes on what it received, so after `world - 1` steps
/// every rank holds every chunk. Its first send is the chunk the reduce-scatter half received last, which keeps
/// the pipelining invariant across the two halves.
fn allgather_steps(world: usize, rank: usize, chunk: impl Fn(usize) -> Range<usize>, out: &mut Vec<Step>) {
    for t in 0..world - 1 {
        out.push(Step {
            send: chunk(ring_index(rank, t, world)),
            recv: chunk(ring_index(rank, t + 1, world)),
            action: Action::Copy,
        });
    }
}

/// Reduce-scatter then allgather: after `2 (world - 1)` steps every rank holds the reduction of every chunk.
pub(crate) fn allreduce(len: usize, world: usize, rank: usize, out: &mut Vec<Step>) {
    allreduce_chunks(world, rank, |c| chunk(len, world, c), out);
}

/// [`allreduce`] over chunks of the caller's choosing (disjoint ranges, one per rank).
pub(crate) fn allreduce_chunks(world: usize, rank: usize, chunk: impl Fn(usize) -> Range<usize>, out: &mut Vec<Step>) {
    out.clear();
    reduce_scatter_steps(world, rank, &chunk, out);
    allgather_steps(world, rank, &chunk, out);
}

/// The first half of [`allreduce_chunks`] alone: rank `r` ends with chunk `r` reduced.
pub(crate) fn reduce_scatter_chunks(
    world: usize,
    rank: usize,
    chunk: impl Fn(usize) -> Range<usize>,
    out: &mut Vec<Step>,
) {
    out.clear();
    reduce_scatter_steps(world, rank, chunk, out);
}

/// The second half of [`allreduce_chunks`] alone: every rank contributes chunk `rank` and receives the others.
pub(crate) fn allgather_chunks(world: usize, rank: usize, chunk: impl Fn(usize) -> Range<usize>, out: &mut Vec<Step>) {
    out.clear();
    allgather_steps(world, rank, chunk, out);
}

/// Every rank contributes block `rank` (of `block` elements) and receives the others' blocks.
pub(crate) fn allgather(block: usize, world: usize, rank: usize, out: &mut Vec<Step>) {
    allgather_chunks(world, rank, |b| b * block..(b + 1) * block, out);
}

/// The root's buffer travels around the ring, each rank forwarding segments as they arrive.
pub(crate) fn broadcast(len: usize, world: usize, rank: usize, root: usize, out: &mut Vec<Step>) {
    out.clear();
    let pos = ring_index(rank, root, world); // 0 = root, world - 1 = last rank on the chain
    let all = 0..len;
    let none = 0..0;
    out.push(Step {
        send: if pos == 0 && world > 1 { all.clone() } else { none.clone() },
        recv: if pos == 0 { none.clone() } else { all.clone() },
        action: Action::Copy,
    });
    out.push(Step {
        send: if pos > 0 && pos < world - 1 { all } else { none.clone() },
        recv: none,
        action: Action::Copy,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs one plan for every rank in memory the way the engine does: each link is a FIFO of segments, a rank's
    /// sends follow its plan order and wait on the same dependency the sender thread waits on (segment `j` of step
    /// `t` after receiving segment `j` of step `t - 1`), receives take segments off the link in plan order and
    /// check their length. Fails on a deadlock or a length mismatch; returns every rank's final buffer.
    fn simulate<T: Clone + PartialEq + std::fmt::Debug>(
        mut bufs: Vec<Vec<T>>,
        seg: usize,
        plan: impl Fn(usize, &mut Vec<Step>),
        add: fn(&T, &T) -> T,
    ) -> Result<Vec<Vec<T>>, TestCaseError> {
        use std::collections::VecDeque;
        let world = bufs.len();
        struct Items {
            sends: Vec<(Range<usize>, usize)>,
            recvs: Vec<(Range<usize>, Action)>,
        }
        let mut items = Vec::new();
        for r in 0..world {
            let mut p = Vec::new();
            plan(r, &mut p);
            for t in 1..p.len() {
                if !p[t].send.is_empty() {
                    prop_assert_eq!(&p[t].send, &p[t - 1].recv, "pipelining invariant");
                }
            }
            let mut it = Items { sends: Vec::new(), recvs: Vec::new() };
            let mut recv_before = vec![0usize; p.len() + 1];
            for (t, s) in p.iter().enumerate() {
                recv_before[t + 1] = recv_before[t] + segment_count(&s.recv, seg);
            }
            for (t, s) in p.iter().enumerate() {
                for j in 0..segment_count(&s.send, seg) {
                    let need = if t == 0 { 0 } else { recv_before[t - 1] + j + 1 };
                    it.sends.push((segment(&s.send, seg, j), need));
                }
                for j in 0..segment_count(&s.recv, seg) {
                    it.recvs.push((segment(&s.recv, seg, j), s.action));
                }
            }
            items.push(it);
        }
        let mut links: Vec<VecDeque<Vec<T>>> = vec![VecDeque::new(); world]; // links[r]: r -> r + 1
        let (mut sent, mut recvd) = (vec![0usize; world], vec![0usize; world]);
        loop {
            let mut progress = false;
            for r in 0..world {
                while sent[r] < items[r].sends.len() && items[r].sends[sent[r]].1 <= recvd[r] {
                    let range = items[r].sends[sent[r]].0.clone();
                    links[r].push_back(bufs[r][range].to_vec());
                    sent[r] += 1;
                    progress = true;
                }
                let prev = (r + world - 1) % world;
                while recvd[r] < items[r].recvs.len() {
                    let Some(data) = links[prev].pop_front() else {
                        break;
                    };
                    let (range, action) = items[r].recvs[recvd[r]].clone();
                    prop_assert_eq!(data.len(), range.len(), "segment length from rank {} to rank {}", prev, r);
                    for (k, v) in range.zip(data) {
                        match action {
                            Action::Reduce => bufs[r][k] = add(&bufs[r][k], &v),
                            Action::Copy => bufs[r][k] = v,
                        }
                    }
                    recvd[r] += 1;
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
        for r in 0..world {
            prop_assert_eq!(sent[r], items[r].sends.len(), "rank {} stuck sending", r);
            prop_assert_eq!(recvd[r], items[r].recvs.len(), "rank {} stuck receiving", r);
            prop_assert!(links[r].is_empty(), "rank {} sent more than rank {} received", r, (r + 1) % world);
        }
        Ok(bufs)
    }

    fn add(a: &i64, b: &i64) -> i64 {
        a + b
    }

    /// The sum as an expression, local value first as the ring's reduction computes it, so two plans give the
    /// same string only if they add the same values in the same order (float results then agree bit for bit).
    fn add_expr(local: &String, received: &String) -> String {
        format!("({local}+{received})")
    }

    fn covers_exactly_once(ranges: impl Iterator<Item = Range<usize>>, len: usize) -> Result<(), TestCaseError> {
        let mut seen = vec![0u32; len];
        for r in ranges {
            prop_assert!(r.end <= len);
            for i in r {
                seen[i] += 1;
            }
        }
        prop_assert!(seen.iter().all(|&c| c == 1), "coverage {:?}", seen);
        Ok(())
    }

    proptest! {
        #[test]
        fn chunks_and_segments_cover_every_element_exactly_once(len in 0usize..5000, world in 1usize..17, seg in 1usize..700) {
            covers_exactly_once((0..world).map(|c| chunk(len, world, c)), len)?;
            let segs = (0..world).flat_map(|c| {
                let r = chunk(len, world, c);
                (0..segment_count(&r, seg)).map(move |j| segment(&r, seg, j))
            });
            let segs: Vec<_> = segs.collect();
            prop_assert!(segs.iter().all(|s| !s.is_empty() && s.len() <= seg));
            covers_exactly_once(segs.into_iter(), len)?;
            let sizes: Vec<usize> = (0..world).map(|c| chunk(len, world, c).len()).collect();
            prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }

        #[test]
        fn ring_allreduce_plan_gives_every_rank_the_sum(len in 0usize..300, world in 1usize..9, seg in 1usize..40) {
            let bufs: Vec<Vec<i64>> = (0..world).map(|r| (0..len).map(|i| (i * 31 + r * 7) as i64 % 101).collect()).collect();
            let expect: Vec<i64> = (0..len).map(|i| bufs.iter().map(|b| b[i]).sum()).collect();
            let out = simulate(bufs, seg, |r, v| allreduce(len, world, r, v), add)?;
            for b in out {
                prop_assert_eq!(&b, &expect);
            }
        }

        #[test]
        fn ring_allgather_plan_gives_every_rank_all_blocks(block in 0usize..50, world in 1usize..9, seg in 1usize..20) {
            let bufs: Vec<Vec<i64>> = (0..world)
                .map(|r| (0..block * world).map(|i| if i / block.max(1) == r { (r * 1000 + i) as i64 } else { -1 }).collect())
                .collect();
            let expect: Vec<i64> = (0..block * world).map(|i| ((i / block.max(1)) * 1000 + i) as i64).collect();
            let out = simulate(bufs, seg, |r, v| allgather(block, world, r, v), add)?;
            for b in out {
                prop_assert_eq!(&b, &expect);
            }
        }

        #[test]
        fn ring_reduce_scatter_plan_leaves_each_rank_its_blocks_sum(block in 0usize..60, world in 1usize..9, seg in 1usize..25) {
            let len = block * world;
            let bufs: Vec<Vec<i64>> = (0..world).map(|r| (0..len).map(|i| (i * 31 + r * 7) as i64 % 101).collect()).collect();
            let expect: Vec<i64> = (0..len).map(|i| bufs.iter().map(|b| b[i]).sum()).collect();
            let out = simulate(bufs, seg, |r, v| reduce_scatter_chunks(world, r, |c| c * block..(c + 1) * block, v), add)?;
            for (r, b) in out.iter().enumerate() {
                let mine = r * block..(r + 1) * block;
                prop_assert_eq!(&b[mine.clone()], &expect[mine]);
            }
        }

        #[test]
        fn ring_reduce_scatter_adds_each_block_in_the_order_allreduce_does(block in 0usize..12, world in 1usize..8, seg in 1usize..7) {
            let len = block * world;
            let bufs: Vec<Vec<String>> = (0..world).map(|r| (0..len).map(|i| format!("x{r}_{i}")).collect()).collect();
            let all = simulate(bufs.clone(), seg, |r, v| allreduce(len, world, r, v), add_expr)?;
            let scattered = simulate(bufs, seg, |r, v| reduce_scatter_chunks(world, r, |c| chunk(len, world, c), v), add_expr)?;
            for r in 0..world {
                let mine = r * block..(r + 1) * block;
                prop_assert_eq!(chunk(len, world, r), mine.clone());
                prop_assert_eq!(&scattered[r][mine.clone()], &all[r][mine]);
            }
        }

        #[test]
        fn ring_allreduce_over_chosen_chunks_reduces_every_chunk(world in 1usize..7, sizes in proptest::collection::vec(0usize..20, 7), gap in 0usize..3, seg in 1usize..9) {
            // Chunks of unequal sizes with untouched gaps between them, as the node leaders' pieces are.
            let starts: Vec<usize> = sizes.iter().take(world).scan(0, |at, n| { let s = *at; *at += n + gap; Some(s) }).collect();
            let chunk_of = |c: usize| starts[c]..starts[c] + sizes[c];
            let len = starts[world - 1] + sizes[world - 1] + gap;
            let bufs: Vec<Vec<i64>> = (0..world).map(|r| (0..len).map(|i| (i * 13 + r * 5) as i64 % 97).collect()).collect();
            let inside = |i: usize| (0..world).any(|c| chunk_of(c).contains(&i));
            let expect: Vec<Vec<i64>> = (0..world)
                .map(|r| (0..len).map(|i| if inside(i) { bufs.iter().map(|b| b[i]).sum() } else { bufs[r][i] }).collect())
                .collect();
            let out = simulate(bufs.clone(), seg, |r, v| allreduce_chunks(world, r, chunk_of, v), add)?;
            prop_assert_eq!(&out, &expect);
            let gathered = simulate(out, seg, |r, v| allgather_chunks(world, r, chunk_of, v), add)?;
            prop_assert_eq!(gathered, expect);
        }

        #[test]
        fn ring_broadcast_plan_gives_every_rank_the_roots_buffer(len in 0usize..100, world in 1usize..9, root_pick in 0usize..100, seg in 1usize..30) {
            let root = root_pick % world;
            let bufs: Vec<Vec<i64>> = (0..world).map(|r| (0..len).map(|i| (r * 1000 + i) as i64).collect()).collect();
            let expect = bufs[root].clone();
            let out = simulate(bufs, seg, |r, v| broadcast(len, world, r, root, v), add)?;
            for b in out {
                prop_assert_eq!(&b, &expect);
            }
        }
    }
}

//! Carrying on after the ranks changed (`hytrain_train::elastic`): every rank of the new set takes global rank 0's
//! optimizer state and place, whatever its own were, and a sharded engine is refused.

use crate::common::{on_ranks, seeded};
use hytrain_data::{Readers, Regroup};
use hytrain_train::elastic::{catch_up, take_rank0_state, Carried, CatchUp};
use hytrain_train::{
    model, AdamWConfig, Ddp, DdpOptions, LrPlan, OptimizerConfig, Progress, Schedule, ShardMode, Start, TrainError,
};
use tch::{Device, Kind, Tensor};

fn ddp(comm: Box<dyn hytrain_train::Collective>, shard: ShardMode) -> Ddp {
    let net = seeded(7, || model::build("mlp", 3, &[1, 4, 4], Device::Cpu).unwrap());
    Ddp::new(net, comm, DdpOptions { shard, ..DdpOptions::default() }).unwrap()
}

fn adamw() -> OptimizerConfig {
    OptimizerConfig::AdamW(AdamWConfig::default())
}

#[test]
fn every_rank_takes_rank_0s_optimizer_state_and_place_whatever_its_own() {
    let results = on_ranks(3, |rank, comm| {
        let mut ddp = ddp(comm, ShardMode::None);
        // One real step gives every optimizer its moments; then each rank's state is made its own.
        let mut old = ddp.build_optimizer(&adamw()).unwrap();
        let xs = seeded(rank as i64, || Tensor::randn([4, 1, 4, 4], (Kind::Float, Device::Cpu)));
        let ys = Tensor::from_slice(&[0i64, 1, 2, 0]);
        ddp.train_step(&[(xs, ys)], old.as_mut(), 0.01).unwrap();
        let mut state = old.state();
        for (_, t) in &state {
            let _ = t.shallow_clone().fill_(rank as f64 + 1.0);
        }
        if rank == 1 {
            // A rank that had never stepped has no state at all.
            state.clear();
        }
        let progress =
            Progress { step: 7 + rank as u64, epoch: 2, batches: 5 + rank as u64, epoch_batches: 20, regroup: None };
        // Each rank's own plan; rank 0's is the one every rank continues.
        let lr = LrPlan { schedule: Schedule::parse(&format!("cosine:{}", 100 + rank)).unwrap(), end: 100 };
        let mut fresh = ddp.build_optimizer(&adamw()).unwrap();
        let carried = Carried { state: &state, progress: &progress, world_size: 4, lr: Some(&lr) };
        let start = take_rank0_state(&mut ddp, fresh.as_mut(), carried, 8).unwrap();
        let values: Vec<(String, f64)> = fresh
            .state()
            .iter()
            .map(|(n, t)| (n.clone(), t.to_kind(Kind::Double).mean(Kind::Double).double_value(&[])))
            .collect();
        (start, values)
    });
    let expected = Start {
        step: 7,
        epoch: 2,
        regroup: Some(Regroup { epoch: 2, before: vec![Readers { world_size: 4, consumed: 40 }] }),
        lr: Some(LrPlan { schedule: Schedule::parse("cosine:100").unwrap(), end: 100 }),
    };
    for (rank, (start, values)) in results.iter().enumerate() {
        assert_eq!(*start, expected, "rank {rank} continues from rank 0's place");
        assert!(!values.is_empty(), "rank {rank} has no optimizer state");
        for (name, v) in values {
            assert_eq!(*v, 1.0, "rank {rank}'s {name} is not rank 0's");
        }
    }
}

#[test]
fn a_sharded_engine_cannot_carry_on_its_lost_ranks_part_of_the_optimizer_state_and_continues_from_its_checkpoint() {
    let results = on_ranks(2, |rank, comm| {
        let mut ddp = ddp(comm, ShardMode::Optimizer);
        let mut optimizer = ddp.build_optimizer(&adamw()).unwrap();
        let progress = Progress::default();
        let carried = Carried { state: &[], progress: &progress, world_size: 3, lr: None };
        // Rank 1 is a node that joins: it carries nothing, and reloads the checkpoint like the rank that does.
        let caught_up = catch_up(&mut ddp, optimizer.as_mut(), (rank == 0).then_some(carried), 8).unwrap();
        (caught_up, take_rank0_state(&mut ddp, optimizer.as_mut(), carried, 8).unwrap_err())
    });
    for (caught_up, e) in results {
        assert_eq!(caught_up, CatchUp::FromCheckpoint);
        let text = e.to_string();
        assert!(matches!(e, TrainError::InvalidOption { .. }), "{text}");
        assert!(text.contains("a lost rank's part is gone"), "{text}");
    }
}

#[test]
fn the_next_start_regroups_an_unfinished_epoch_and_moves_past_a_finished_one() {
    let mid = Progress { step: 30, epoch: 1, batches: 10, epoch_batches: 45, regroup: None };
    let first = Readers { world_size: 4, consumed: 80 };
    assert_eq!(
        mid.next_start(4, 8),
        Start { step: 30, epoch: 1, regroup: Some(Regroup { epoch: 1, before: vec![first] }), lr: None }
    );
    // A second change in the same epoch adds the readers since the first.
    let again = Progress { batches: 3, regroup: Some(Regroup { epoch: 1, before: vec![first] }), ..mid.clone() };
    let second = Readers { world_size: 3, consumed: 24 };
    assert_eq!(again.next_start(3, 8).regroup.unwrap().before, vec![first, second]);
    // A regroup of an earlier epoch is history: this epoch starts its own.
    let later = Progress { epoch: 2, regroup: Some(Regroup { epoch: 1, before: vec![first] }), ..mid.clone() };
    assert_eq!(later.next_start(4, 8).regroup.unwrap().before, vec![first]);
    let done = Progress { batches: 45, ..mid };
    assert_eq!(done.next_start(4, 8), Start { step: 30, epoch: 2, regroup: None, lr: None });
}

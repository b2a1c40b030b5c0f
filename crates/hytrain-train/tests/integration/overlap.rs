//! Allreduces overlapped with backward (gradient hooks through the C++ shim, a communication thread per step) give
//! bit-for-bit the weights of allreducing after backward, on 2 and 3 real ranks, with gradient accumulation and
//! with parameters that take no part in some steps.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{deep_copy, identical, on_ranks, seeded};
use hytrain_train::model::{self, LayerBuilder, Model};
use hytrain_train::{Ddp, DdpOptions, OptimizerConfig, SgdConfig, TrainError};
use tch::{Device, Kind, TchError, Tensor};

const STEPS: usize = 4;
const B: i64 = 4;

/// Small buckets so every model has several (LeNet 5, a two-layer MLP 3), launched in their fixed order.
fn options(overlap: bool, grad_accum: usize) -> DdpOptions {
    DdpOptions { bucket_mb: 0.005, first_bucket_mb: 0.001, grad_accum, overlap, ..Default::default() }
}

/// Per rank, per step, `accum` micro-batches; every rank gets different data so averaging matters.
fn data(world: usize, accum: usize, input: &[i64]) -> Vec<Vec<Vec<(Tensor, Tensor)>>> {
    seeded(99, || {
        (0..world)
            .map(|_| {
                (0..STEPS)
                    .map(|_| {
                        (0..accum)
                            .map(|_| {
                                let mut shape = vec![B];
                                shape.extend_from_slice(input);
                                (
                                    Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)),
                                    Tensor::randint(10, [B], (Kind::Int64, Device::Cpu)),
                                )
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    })
}

/// Trains `model_name` on `world` ranks and returns each rank's final weights and its engine statistics.
fn train(
    model_name: &str,
    input: &[i64],
    world: usize,
    overlap: bool,
    accum: usize,
) -> Vec<(Vec<(String, Tensor)>, hytrain_train::DdpStats)> {
    let batches = Mutex::new(data(world, accum, input).into_iter().map(Some).collect::<Vec<_>>());
    on_ranks(world, |rank, comm| {
        let steps = batches.lock().unwrap()[rank].take().unwrap();
        let m = seeded(5 + rank as i64, || model::build(model_name, 10, input, Device::Cpu).unwrap());
        let mut ddp = Ddp::new(m, comm, options(overlap, accum)).unwrap();
        let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, weight_decay: 1e-4, ..Default::default() });
        let mut optimizer = sgd.build(ddp.parameters()).unwrap();
        for micro in &steps {
            ddp.train_step(micro, optimizer.as_mut(), 0.05).unwrap();
        }
        (deep_copy(&model::state_tensors(ddp.model())), ddp.stats().clone())
    })
}

fn check_bit_identical(model_name: &str, input: &[i64], world: usize, accum: usize) {
    let with = train(model_name, input, world, true, accum);
    let without = train(model_name, input, world, false, accum);
    let what = format!("{model_name} on {world} ranks, grad_accum {accum}");
    for rank in 0..world {
        assert!(identical(&with[rank].0, &without[rank].0), "{what}: rank {rank}'s weights differ with overlap");
        assert!(identical(&with[rank].0, &with[0].0), "{what}: ranks disagree with overlap");
    }
    let buckets = {
        let m = seeded(1, || model::build(model_name, 10, input, Device::Cpu).unwrap());
        Ddp::single(m, options(true, accum)).unwrap().bucket_layout().len() as u64
    };
    assert!(buckets >= 3, "{what}: only {buckets} buckets, the ordering is barely exercised");
    // Every parameter takes part, so every bucket of every step starts inside backward; without overlap none.
    assert_eq!(with[0].1.buckets_launched_in_backward, buckets * STEPS as u64, "{what}");
    assert_eq!(without[0].1.buckets_launched_in_backward, 0, "{what}");
    assert_eq!(with[0].1.allreduce_bytes, without[0].1.allreduce_bytes, "{what}");
    assert_eq!(with[0].1.syncs, STEPS as u64, "{what}");
}

#[test]
fn overlapped_allreduces_give_bit_identical_weights_on_two_ranks() {
    check_bit_identical("lenet", &[3, 32, 32], 2, 1);
}

#[test]
fn overlapped_allreduces_give_bit_identical_weights_on_three_ranks() {
    check_bit_identical("mlp:64,32", &[1, 8, 8], 3, 1);
}

#[test]
fn overlap_with_grad_accum_is_bit_identical_and_reduces_only_on_the_last_micro_batch() {
    check_bit_identical("lenet", &[3, 32, 32], 2, 3);
    // By hand: the non-final backward passes reduce nothing and launch nothing.
    let stats = on_ranks(2, |_, comm| {
        let m = seeded(1, || model::build("mlp:16", 10, &[8], Device::Cpu).unwrap());
        let mut ddp = Ddp::new(m, comm, options(true, 2)).unwrap();
        let (xs, ys) =
            (Tensor::ones([2, 8], (Kind::Float, Device::Cpu)), Tensor::zeros([2], (Kind::Int64, Device::Cpu)));
        let loss = hytrain_train::cross_entropy(&ddp.forward_t(&xs, true).unwrap(), &ys).unwrap();
        let first = ddp.backward(&loss).unwrap();
        let after_first = ddp.stats().clone();
        let loss = hytrain_train::cross_entropy(&ddp.forward_t(&xs, true).unwrap(), &ys).unwrap();
        let second = ddp.backward(&loss).unwrap();
        (first, after_first, second, ddp.stats().clone())
    });
    for (first, after_first, second, after_second) in stats {
        assert!(!first && second, "only the second micro-batch synchronises");
        assert_eq!(
            (after_first.allreduce_bytes, after_first.buckets_launched_in_backward, after_first.syncs),
            (0, 0, 0)
        );
        assert!(after_second.allreduce_bytes > 0 && after_second.buckets_launched_in_backward > 0);
    }
}

/// An MLP with a second head that forward uses only while `use_aux` is set: on steps without it, the aux
/// parameters' hooks never fire, so their bucket must be launched after backward.
struct SometimesAux {
    trunk: model::Linear,
    head: model::Linear,
    aux: model::Linear,
    use_aux: Arc<AtomicBool>,
    params: Vec<(String, Tensor)>,
}

impl SometimesAux {
    fn new(use_aux: Arc<AtomicBool>) -> Self {
        let mut b = LayerBuilder::new(Device::Cpu);
        let trunk = b.linear("trunk", 16, 64).unwrap();
        let aux = b.linear("aux", 64, 10).unwrap();
        let head = b.linear("head", 64, 10).unwrap();
        let (params, _) = b.finish();
        SometimesAux { trunk, head, aux, use_aux, params }
    }
}

impl Model for SometimesAux {
    fn name(&self) -> &str {
        "sometimes-aux"
    }
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        let h = self.trunk.forward(xs)?.f_relu()?;
        let out = self.head.forward(&h)?;
        if self.use_aux.load(Ordering::SeqCst) {
            out.f_add(&self.aux.forward(&h)?)
        } else {
            Ok(out)
        }
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

#[test]
fn a_parameter_unused_in_some_steps_is_reduced_after_backward_bit_identically() {
    let run = |overlap: bool| {
        on_ranks(2, |rank, comm| {
            let use_aux = Arc::new(AtomicBool::new(true));
            let m = seeded(11 + rank as i64, || SometimesAux::new(use_aux.clone()));
            let opts = DdpOptions { bucket_mb: 0.001, first_bucket_mb: 0.001, overlap, ..Default::default() };
            let mut ddp = Ddp::new(Box::new(m), comm, opts).unwrap();
            let buckets = ddp.bucket_layout();
            let mut sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.5, ..Default::default() })
                .build(ddp.parameters())
                .unwrap();
            let mut launched = Vec::new();
            for step in 0..6i64 {
                // Same on every rank: steps 1, 3 and 5 leave the aux head out.
                use_aux.store(step % 2 == 0, Ordering::SeqCst);
                let (xs, ys) = seeded(100 + 10 * step + rank as i64, || {
                    (
                        Tensor::randn([B, 16], (Kind::Float, Device::Cpu)),
                        Tensor::randint(10, [B], (Kind::Int64, Device::Cpu)),
                    )
                });
                let before = ddp.stats().buckets_launched_in_backward;
                ddp.train_step(&[(xs, ys)], sgd.as_mut(), 0.1).unwrap();
                launched.push(ddp.stats().buckets_launched_in_backward - before);
            }
            (deep_copy(&ddp.model().named_parameters()), launched, buckets)
        })
    };
    let with = run(true);
    let without = run(false);
    for rank in 0..2 {
        assert!(identical(&with[rank].0, &without[rank].0), "rank {rank}'s weights differ with overlap");
    }
    assert!(identical(&with[0].0, &with[1].0));
    let layout = &with[0].2;
    assert_eq!(layout.len(), 3, "{layout:?}");
    // Buckets in reverse definition order: head, aux, trunk. Without aux, the head bucket still starts in backward,
    // aux (no hooks) and trunk (behind aux in the order) only after it.
    assert!(layout[1].params.iter().all(|p| p.starts_with("aux")), "{layout:?}");
    assert_eq!(with[0].1, vec![3, 1, 3, 1, 3, 1]);
}

#[test]
fn a_parameter_that_never_gets_a_gradient_is_named_with_overlap_on() {
    let errors = on_ranks(3, |_, comm| {
        let use_aux = Arc::new(AtomicBool::new(false));
        let m = seeded(1, || SometimesAux::new(use_aux));
        let mut ddp = Ddp::new(Box::new(m), comm, options(true, 1)).unwrap();
        let mut sgd = OptimizerConfig::Sgd(SgdConfig::default()).build(ddp.parameters()).unwrap();
        let batch = (Tensor::ones([2, 16], (Kind::Float, Device::Cpu)), Tensor::zeros([2], (Kind::Int64, Device::Cpu)));
        let e = ddp.train_step(&[batch], sgd.as_mut(), 0.1).unwrap_err();
        // The engine stays usable for collectives afterwards: every rank reaches this barrier.
        ddp.collective().barrier().unwrap();
        e
    });
    for e in errors {
        assert!(matches!(&e, TrainError::MissingGradient(n) if n.starts_with("aux.")), "{e}");
    }
}

#[test]
fn a_model_given_back_by_into_parts_trains_again_with_overlap_after_a_plain_backward() {
    let results = on_ranks(2, |rank, comm| {
        let m = seeded(3 + rank as i64, || model::build("mlp:32", 10, &[8], Device::Cpu).unwrap());
        let (xs, ys) = seeded(40 + rank as i64, || {
            (Tensor::randn([B, 8], (Kind::Float, Device::Cpu)), Tensor::randint(10, [B], (Kind::Int64, Device::Cpu)))
        });
        let sgd = OptimizerConfig::Sgd(SgdConfig::default());
        let mut ddp = Ddp::new(m, comm, options(true, 1)).unwrap();
        let mut opt = sgd.build(ddp.parameters()).unwrap();
        ddp.train_step(&[(xs.shallow_clone(), ys.shallow_clone())], opt.as_mut(), 0.1).unwrap();
        let (m, comm) = ddp.into_parts();
        // Without an engine (its hooks are gone), a plain backward pass on the model is just that.
        let loss = hytrain_train::cross_entropy(&m.forward_t(&xs, true).unwrap(), &ys).unwrap();
        loss.backward();
        let mut ddp = Ddp::new(m, comm, options(true, 1)).unwrap();
        let mut opt = sgd.build(ddp.parameters()).unwrap();
        ddp.train_step(&[(xs, ys)], opt.as_mut(), 0.1).unwrap();
        (deep_copy(&ddp.model().named_parameters()), ddp.stats().buckets_launched_in_backward)
    });
    assert!(identical(&results[0].0, &results[1].0));
    assert!(results[0].1 > 0, "the second engine's hooks fired");
}

/// A model whose "parameter" is computed from a leaf: autograd never accumulates into it, so no hook can be set.
struct NonLeaf {
    weight: Tensor,
}

impl Model for NonLeaf {
    fn name(&self) -> &str {
        "non-leaf"
    }
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        xs.f_matmul(&self.weight)
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        vec![("scaled.weight".into(), self.weight.shallow_clone())]
    }
}

#[test]
fn a_parameter_that_is_no_leaf_is_refused_naming_it_and_the_way_out() {
    let errors = on_ranks(2, |_, comm| {
        let leaf = Tensor::ones([4, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let m = NonLeaf { weight: &leaf * 2.0 };
        Ddp::new(Box::new(m), comm, options(true, 1)).unwrap_err().to_string()
    });
    for e in errors {
        assert!(e.contains("parameter scaled.weight") && e.contains("not a leaf"), "{e}");
        assert!(e.contains("--overlap false") && !e.contains('\n'), "{e}");
    }
}

#[test]
fn a_failing_backward_returns_its_error_and_leaves_the_collective_usable() {
    let errors = on_ranks(2, |_, comm| {
        let m = seeded(1, || model::build("mlp:16", 10, &[8], Device::Cpu).unwrap());
        let mut ddp = Ddp::new(m, comm, options(true, 1)).unwrap();
        let constant = Tensor::ones([], (Kind::Float, Device::Cpu));
        let e = ddp.backward(&constant).unwrap_err().to_string();
        ddp.collective().barrier().unwrap();
        e
    });
    for e in errors {
        assert!(e.starts_with("backward: ") && e.contains("does not require grad"), "{e}");
    }
}

#[test]
fn a_rank_leaving_mid_step_fails_the_overlapped_allreduce_naming_the_bucket() {
    let results = on_ranks(2, |rank, comm| {
        let m = seeded(1, || model::build("mlp:16", 10, &[8], Device::Cpu).unwrap());
        let mut ddp = Ddp::new(m, comm, options(true, 1)).unwrap();
        if rank == 1 {
            // Leaves: its sockets close, as when the process dies.
            return None;
        }
        let mut sgd = OptimizerConfig::Sgd(SgdConfig::default()).build(ddp.parameters()).unwrap();
        let batch = (Tensor::ones([2, 8], (Kind::Float, Device::Cpu)), Tensor::zeros([2], (Kind::Int64, Device::Cpu)));
        Some(ddp.train_step(&[batch], sgd.as_mut(), 0.1).unwrap_err())
    });
    let e = results[0].as_ref().unwrap();
    assert!(matches!(e, TrainError::Comm { .. }), "{e}");
    assert!(e.to_string().starts_with("gradient allreduce of bucket 0 ("), "{e}");
}

//! Where a resumed run continues: the checkpoint's data position (epoch, batches consumed) mapped onto this job's
//! shape.
//!
//! The sampler gives each rank a contiguous block of the epoch's order (or every world-size-th sample, with a stream
//! window), cut by the world size and drawn by the seed and the stream window, and the loader cuts a rank's block
//! into batches. So a mid-epoch position carries over as it is when the world size and seed are unchanged and a
//! step takes as many samples per rank (`batch size x grad-accum`, hence the same global batch): the samples
//! consumed are then a whole number of this job's batches. Under another world size or batch size (same seed and
//! stream window) the epoch is regrouped, as when the ranks change in memory ([`hytrain_data::Regroup`]): the
//! checkpoint's ranks are recorded as the epoch's earlier readers and this job's ranks share what they left. A
//! position at the end of an epoch carries over to any shape (the next epoch starts from its beginning). A
//! mid-epoch position under another seed or stream window (another order of the epoch) is refused, unless
//! `--restart-epoch-on-change` says to start that epoch over.

use std::path::Path;

use crate::checkpoint::CheckpointMeta;
use crate::{Result, TrainError};

/// What decides which samples a rank reads at which step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub world_size: u64,
    pub batch_size: u64,
    pub grad_accum: u64,
    pub seed: u64,
    /// The sampler's stream window, 0 for none.
    pub stream_window: u64,
    /// Batches per rank and epoch that whole steps take.
    pub batches_per_epoch: u64,
}

impl Shape {
    /// The fields a checkpoint's data position records besides the position itself.
    pub fn record(&self, position: &mut serde_json::Map<String, serde_json::Value>) {
        position.insert("world_size".into(), self.world_size.into());
        position.insert("batch_size".into(), self.batch_size.into());
        position.insert("grad_accum".into(), self.grad_accum.into());
        position.insert("batches_per_epoch".into(), self.batches_per_epoch.into());
        position.insert("stream_window".into(), self.stream_window.into());
    }

    /// The shape a checkpoint was written by; `None` for one written before hytrain recorded it.
    fn saved(meta: &CheckpointMeta) -> Option<Shape> {
        let pos = &meta.data_position;
        let get = |k: &str| pos.get(k).and_then(|v| v.as_u64());
        Some(Shape {
            world_size: get("world_size")?,
            batch_size: get("batch_size")?,
            grad_accum: get("grad_accum")?,
            seed: meta.rng.seed,
            // Checkpoints from before the stream window read their data in the full shuffle.
            stream_window: get("stream_window").unwrap_or(0),
            batches_per_epoch: get("batches_per_epoch")?,
        })
    }

    /// What differs from `now`, as `world size 2, this job 1` items.
    fn changes(&self, now: &Shape) -> Vec<String> {
        let window = |w: u64| if w == 0 { "off".to_owned() } else { w.to_string() };
        [
            ("world size", self.world_size.to_string(), now.world_size.to_string()),
            ("batch size", self.batch_size.to_string(), now.batch_size.to_string()),
            ("grad-accum", self.grad_accum.to_string(), now.grad_accum.to_string()),
            ("seed", self.seed.to_string(), now.seed.to_string()),
            ("stream window", window(self.stream_window), window(now.stream_window)),
        ]
        .into_iter()
        .filter(|(_, was, is)| was != is)
        .map(|(name, was, is)| format!("{name} {was}, this job {is}"))
        .collect()
    }
}

/// Where to continue: steps done, the epoch (0-based) and the batch of it to start at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Continue {
    pub step: u64,
    pub epoch: u64,
    pub start_batch: u64,
    /// The epoch's regroup, when the job that wrote the checkpoint had changed ranks part-way through it.
    pub regroup: Option<hytrain_data::Regroup>,
}

/// Maps the position of the checkpoint at `path` onto the shape `now`; see the module documentation. Every rank
/// calls it with the same checkpoint and shape, so every rank decides alike.
pub(crate) fn continue_from(meta: &CheckpointMeta, path: &Path, now: &Shape, restart_epoch: bool) -> Result<Continue> {
    let pos = &meta.data_position;
    let epoch = pos.get("epoch").and_then(|v| v.as_u64()).unwrap_or(meta.epoch);
    let batches = pos.get("batches").and_then(|v| v.as_u64()).unwrap_or(0);
    let step = meta.step;
    let next_epoch = Continue { step, epoch: epoch + 1, start_batch: 0, regroup: None };
    let regroup: Option<hytrain_data::Regroup> = match pos.get("regroup") {
        Some(value) => Some(serde_json::from_value(value.clone()).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            detail: format!("its data position's regroup does not parse: {e}"),
        })?),
        None => None,
    }
    .filter(|r: &hytrain_data::Regroup| r.epoch == epoch);
    let Some(saved) = Shape::saved(meta) else {
        // Written before hytrain recorded the shape: trusted as it always was.
        return Ok(if batches >= now.batches_per_epoch {
            next_epoch
        } else {
            Continue { step, epoch, start_batch: batches, regroup: None }
        });
    };
    let changes = saved.changes(now);
    let same_order = saved.seed == now.seed && saved.stream_window == now.stream_window;
    if regroup.is_some() {
        // The ranks changed part-way through this epoch: the same shape continues its share, another one regroups
        // what is left once more.
        if changes.is_empty() {
            return Ok(Continue { step, epoch, start_batch: batches, regroup });
        }
        let at = format!("batch {batches} of what is left of epoch {}", epoch + 1);
        if same_order {
            return Ok(regrouped(step, epoch, regroup, &saved, batches, &changes, &at));
        }
        return unmappable(path, step, epoch, &changes, &at, restart_epoch);
    }
    if batches >= saved.batches_per_epoch {
        if !changes.is_empty() {
            tracing::info!(
                "the checkpoint's job differs ({}); it ends epoch {}, so epoch {} starts from its beginning",
                changes.join("; "),
                epoch + 1,
                epoch + 2
            );
        }
        return Ok(next_epoch);
    }
    if changes.is_empty() || batches == 0 {
        return Ok(Continue { step, epoch, start_batch: batches, regroup: None });
    }
    let same_step = saved.batch_size * saved.grad_accum == now.batch_size * now.grad_accum;
    let samples = batches * saved.batch_size;
    if saved.world_size == now.world_size
        && saved.seed == now.seed
        && saved.stream_window == now.stream_window
        && same_step
        && samples.is_multiple_of(now.batch_size)
    {
        let start_batch = samples / now.batch_size;
        tracing::info!(
            "the checkpoint's job differs ({}) but takes as many samples per step and rank: continuing epoch {} at \
             batch {start_batch} of {}",
            changes.join("; "),
            epoch + 1,
            now.batches_per_epoch
        );
        return Ok(Continue { step, epoch, start_batch, regroup: None });
    }
    let at = format!("batch {batches} of {} in epoch {}", saved.batches_per_epoch, epoch + 1);
    if same_order {
        return Ok(regrouped(step, epoch, None, &saved, batches, &changes, &at));
    }
    unmappable(path, step, epoch, &changes, &at, restart_epoch)
}

/// Continues epoch `epoch` regrouped: the checkpoint's `saved.world_size` ranks, `batches` batches into their
/// share (after the readers of `earlier`, when the epoch was regrouped already), are its latest readers, and this
/// job's ranks share what is left.
fn regrouped(
    step: u64,
    epoch: u64,
    earlier: Option<hytrain_data::Regroup>,
    saved: &Shape,
    batches: u64,
    changes: &[String],
    at: &str,
) -> Continue {
    let mut before = earlier.map_or(Vec::new(), |r| r.before);
    let consumed = (batches * saved.batch_size) as usize;
    before.push(hytrain_data::Readers { world_size: saved.world_size as usize, consumed });
    tracing::info!(
        "the checkpoint's job differs ({}); continuing epoch {} after its position ({at}), this job's ranks \
         sharing what the checkpoint's {} left of it",
        changes.join("; "),
        epoch + 1,
        saved.world_size
    );
    Continue { step, epoch, start_batch: 0, regroup: Some(hytrain_data::Regroup { epoch, before }) }
}

/// A mid-epoch position at `at` that this job's shape cannot continue: the epoch starts over with
/// `--restart-epoch-on-change`, else an error says what changed and what to do.
fn unmappable(
    path: &Path,
    step: u64,
    epoch: u64,
    changes: &[String],
    at: &str,
    restart_epoch: bool,
) -> Result<Continue> {
    if restart_epoch {
        tracing::warn!(
            "the checkpoint's job differs ({}) and its position ({at}) cannot be mapped onto this job: starting \
             epoch {} over from its first batch at step {step} (--restart-epoch-on-change); the samples of it \
             trained on before the checkpoint are seen again",
            changes.join("; "),
            epoch + 1
        );
        return Ok(Continue { step, epoch, start_batch: 0, regroup: None });
    }
    Err(TrainError::Checkpoint {
        path: path.to_path_buf(),
        detail: format!(
            "written by a job of another shape ({}) at {at}, a position that cannot be mapped onto this job (the seed \
             and the stream window decide the epoch's order of samples); run with the checkpoint's seed and stream \
             window to continue exactly, pass --restart-epoch-on-change to start epoch {} over with this shape, or \
             --no-resume to start afresh",
            changes.join("; "),
            epoch + 1
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::RngState;
    use crate::schedule::Schedule;

    fn shape(world_size: u64, batch_size: u64, grad_accum: u64, batches_per_epoch: u64) -> Shape {
        Shape { world_size, batch_size, grad_accum, seed: 1, stream_window: 0, batches_per_epoch }
    }

    fn meta(saved: &Shape, epoch: u64, batches: u64) -> CheckpointMeta {
        let mut pos = serde_json::Map::new();
        pos.insert("epoch".into(), epoch.into());
        pos.insert("batches".into(), batches.into());
        saved.record(&mut pos);
        CheckpointMeta {
            step: 40,
            epoch,
            data_position: pos.into(),
            rng: RngState { seed: saved.seed, state: serde_json::Value::Null },
            config: serde_json::Value::Null,
            schedule: Schedule::Constant,
            model: "mlp".into(),
            optimizer: "sgd".into(),
            grad_scaler: None,
        }
    }

    fn at(m: &CheckpointMeta, now: &Shape, restart: bool) -> Result<Continue> {
        continue_from(m, Path::new("/ckpt/ckpt-40"), now, restart)
    }

    #[test]
    fn the_same_shape_continues_where_it_stopped() {
        let s = shape(2, 32, 1, 23);
        assert_eq!(
            at(&meta(&s, 1, 17), &s, false).unwrap(),
            Continue { step: 40, epoch: 1, start_batch: 17, regroup: None }
        );
    }

    #[test]
    fn the_same_samples_per_step_map_to_this_jobs_batches() {
        let m = meta(&shape(2, 32, 1, 23), 0, 6);
        assert_eq!(at(&m, &shape(2, 16, 2, 44), false).unwrap().start_batch, 12);
        // Twice the batch: the two ranks share what 6 batches of 32 each left.
        let readers = vec![hytrain_data::Readers { world_size: 2, consumed: 192 }];
        let regroup = Some(hytrain_data::Regroup { epoch: 0, before: readers });
        assert_eq!(
            at(&m, &shape(2, 64, 1, 11), false).unwrap(),
            Continue { step: 40, epoch: 0, start_batch: 0, regroup }
        );
        let m = meta(&shape(2, 8, 4, 88), 0, 8);
        assert_eq!(at(&m, &shape(2, 32, 1, 23), false).unwrap().start_batch, 2);
    }

    #[test]
    fn a_changed_world_size_mid_epoch_regroups_what_the_checkpoints_ranks_left() {
        let m = meta(&shape(2, 32, 1, 23), 3, 5);
        let readers = vec![hytrain_data::Readers { world_size: 2, consumed: 160 }];
        assert_eq!(
            at(&m, &shape(3, 16, 1, 30), false).unwrap(),
            Continue {
                step: 40,
                epoch: 3,
                start_batch: 0,
                regroup: Some(hytrain_data::Regroup { epoch: 3, before: readers })
            }
        );
    }

    #[test]
    fn a_changed_seed_or_stream_window_mid_epoch_is_refused_or_restarts_the_epoch() {
        let m = meta(&shape(2, 32, 1, 23), 3, 5);
        let reseeded = Shape { seed: 2, ..shape(1, 64, 1, 23) };
        let e = at(&m, &reseeded, false).unwrap_err().to_string();
        assert!(
            e.contains("world size 2, this job 1; batch size 32, this job 64; seed 1, this job 2")
                && e.contains("batch 5 of 23 in epoch 4"),
            "{e}"
        );
        assert!(e.contains("--restart-epoch-on-change to start epoch 4 over") && e.contains("--no-resume"), "{e}");
        assert_eq!(at(&m, &reseeded, true).unwrap(), Continue { step: 40, epoch: 3, start_batch: 0, regroup: None });
        let streamed = Shape { stream_window: 16, ..shape(2, 32, 1, 23) };
        assert!(at(&m, &streamed, false).unwrap_err().to_string().contains("stream window off, this job 16"));
    }

    #[test]
    fn an_epoch_end_or_start_carries_over_to_any_shape() {
        let m = meta(&shape(2, 32, 1, 23), 0, 23);
        assert_eq!(
            at(&m, &shape(1, 32, 1, 45), false).unwrap(),
            Continue { step: 40, epoch: 1, start_batch: 0, regroup: None }
        );
        let m = meta(&shape(2, 32, 1, 23), 2, 0);
        assert_eq!(
            at(&m, &shape(3, 7, 3, 21), false).unwrap(),
            Continue { step: 40, epoch: 2, start_batch: 0, regroup: None }
        );
    }

    #[test]
    fn a_checkpoint_without_a_recorded_shape_is_trusted_as_before() {
        let mut m = meta(&shape(2, 32, 1, 23), 0, 5);
        m.data_position = serde_json::json!({ "epoch": 0, "batches": 5, "batches_per_epoch": 23 });
        assert_eq!(at(&m, &shape(1, 32, 1, 45), false).unwrap().start_batch, 5);
    }

    #[test]
    fn a_regrouped_epoch_continues_its_share_with_the_same_shape_and_is_regrouped_again_with_another() {
        let s = shape(3, 16, 1, 20);
        let mut m = meta(&s, 1, 4);
        let regroup =
            hytrain_data::Regroup { epoch: 1, before: vec![hytrain_data::Readers { world_size: 4, consumed: 80 }] };
        m.data_position["regroup"] = serde_json::to_value(&regroup).unwrap();
        let got = at(&m, &s, false).unwrap();
        assert_eq!(got, Continue { step: 40, epoch: 1, start_batch: 4, regroup: Some(regroup.clone()) });
        // Another world size: the checkpoint's three ranks, 4 batches of 16 into their share, read after the four.
        let mut again = regroup.clone();
        again.before.push(hytrain_data::Readers { world_size: 3, consumed: 64 });
        let got = at(&m, &shape(2, 24, 1, 30), false).unwrap();
        assert_eq!(got, Continue { step: 40, epoch: 1, start_batch: 0, regroup: Some(again) });
        // Another seed cannot continue it: the epoch starts over with the flag, else an error.
        let reseeded = Shape { seed: 9, ..shape(2, 24, 1, 30) };
        let e = at(&m, &reseeded, false).unwrap_err().to_string();
        assert!(e.contains("batch 4 of what is left of epoch 2") && e.contains("--restart-epoch-on-change"), "{e}");
        let restarted = at(&m, &reseeded, true).unwrap();
        assert_eq!(restarted, Continue { step: 40, epoch: 1, start_batch: 0, regroup: None });
        // A regroup of an earlier epoch does not apply.
        m.data_position["regroup"]["epoch"] = 0.into();
        assert_eq!(at(&m, &s, false).unwrap().regroup, None);
        m.data_position["regroup"] = "4x5".into();
        let e = at(&m, &s, false).unwrap_err().to_string();
        assert!(e.contains("its data position's regroup does not parse"), "{e}");
    }
}

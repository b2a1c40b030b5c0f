//! [`Summary`]: what a run did, as rank 0 prints it at the end and the model's metadata records it.

use std::path::PathBuf;

use super::Value;

/// What a run did. Every rank gets the same numbers except the time split, which is this rank's.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Optimizer steps completed, counting those before a resume.
    pub steps: u64,
    /// Optimizer steps taken by this run.
    pub steps_run: u64,
    /// Epochs completed, counting those before a resume.
    pub epochs: u64,
    /// Training samples processed by this run over all ranks.
    pub samples: u64,
    /// `samples` over the run's wall time.
    pub samples_per_sec: f64,
    /// Wall time of the run in seconds.
    pub elapsed_secs: f64,
    /// Seconds this rank waited for batches.
    pub data_wait_secs: f64,
    /// Seconds this rank spent in forward, backward and update, allreduce excluded.
    pub compute_secs: f64,
    /// Seconds this rank spent in gradient allreduces.
    pub allreduce_secs: f64,
    /// Mean training loss over all ranks of the last logging window.
    pub train_loss: Option<f64>,
    /// Mean validation cross-entropy of the last evaluation.
    pub val_loss: Option<f64>,
    /// Validation accuracy of the last evaluation, as a fraction.
    pub val_accuracy: Option<f64>,
    /// Validation samples counted in the last evaluation, over all ranks.
    pub val_samples: u64,
    /// The run stopped early on request (SIGTERM) after writing a checkpoint.
    pub stopped: bool,
    /// The checkpoint the run resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The last checkpoint this run wrote (rank 0 only).
    pub last_checkpoint: Option<PathBuf>,
    /// Seconds the step loop was held by checkpoints: host copies of the state, and waits for a previous
    /// background write still running (rank 0 only; the other ranks never wait for a checkpoint). With `--shard`,
    /// the whole synchronous sharded write, which every rank waits for.
    pub checkpoint_secs: f64,
    /// Where the model was exported (rank 0 only): the model folder, or for an `s3://` one the local folder to
    /// upload from.
    pub exported_to: Option<PathBuf>,
    /// Optimizer steps of this run skipped because the fp16 gradients overflowed.
    pub skipped_steps: u64,
    /// Each rank's peak resident host memory in bytes over its whole process so far (the kernel's high-water mark,
    /// `ru_maxrss`), in rank order; empty where the kernel does not report it.
    pub peak_host_bytes: Vec<u64>,
    /// The fp16 loss scale at the end (`None` for fp32 and bf16).
    pub loss_scale: Option<f64>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |s: f64| if self.elapsed_secs > 0.0 { 100.0 * s / self.elapsed_secs } else { 0.0 };
        writeln!(f, "steps            {} ({} this run), epochs {}", self.steps, self.steps_run, self.epochs)?;
        if let Some(scale) = self.loss_scale {
            writeln!(
                f,
                "fp16 loss scale  {} at the end, {} steps skipped on inf/NaN gradients",
                Value::Lr(scale).text(),
                self.skipped_steps
            )?;
        }
        writeln!(
            f,
            "samples          {} at {:.1}/s over {:.1} s",
            self.samples, self.samples_per_sec, self.elapsed_secs
        )?;
        writeln!(f, "data wait        {:>9.2} s  {:5.1}%", self.data_wait_secs, pct(self.data_wait_secs))?;
        writeln!(f, "compute          {:>9.2} s  {:5.1}%", self.compute_secs, pct(self.compute_secs))?;
        writeln!(f, "allreduce        {:>9.2} s  {:5.1}%", self.allreduce_secs, pct(self.allreduce_secs))?;
        if let Some((rank, peak)) = self.peak_host_bytes.iter().enumerate().max_by_key(|(_, b)| **b) {
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            let all: Vec<String> = self.peak_host_bytes.iter().map(|b| format!("{:.0}", mib(*b))).collect();
            writeln!(f, "peak host memory {:>9.1} MiB on rank {rank} (MiB by rank: {})", mib(*peak), all.join(" "))?;
        }
        if let Some(path) = &self.last_checkpoint {
            writeln!(
                f,
                "checkpoints      {:>9.2} s  {:5.1}%  (training held for host copies and waits; last {})",
                self.checkpoint_secs,
                pct(self.checkpoint_secs),
                path.display()
            )?;
        }
        writeln!(
            f,
            "validation       loss {} accuracy {} on {} samples{}",
            opt(self.val_loss, 4),
            opt(self.val_accuracy, 4),
            self.val_samples,
            if self.stopped { " (stopped early)" } else { "" }
        )?;
        write!(
            f,
            "steps={} train_loss={} val_loss={} val_accuracy={} samples_per_sec={:.1}",
            self.steps,
            opt(self.train_loss, 4),
            opt(self.val_loss, 4),
            opt(self.val_accuracy, 4),
            self.samples_per_sec
        )
    }
}

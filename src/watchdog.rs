//! The worker's liveness watchdog: when the job loses a rank, this rank stops within seconds with one line naming
//! the lost rank, whatever it was doing; a collective in progress already fails by itself (the ring is aborted),
//! and a rank that is loading data, computing or writing a checkpoint is ended here after a short grace.

use std::path::PathBuf;
use std::time::Duration;

use crate::comm::recorder::FlightRecorder;
use crate::comm::Liveness;

/// How long the main thread gets to fail on its own (with its fuller error) before the watchdog ends the process.
/// A checkpoint write cut short here loses nothing: checkpoints are written aside and renamed into place.
pub const GRACE: Duration = Duration::from_secs(2);

/// Watches the job for a lost rank while a command runs. Call [`Watchdog::finish`] when this rank is done; dropped
/// without it (the command failed), it tells the other ranks at once that this rank gave up.
#[derive(Debug)]
pub struct Watchdog {
    live: Option<Liveness>,
}

impl Watchdog {
    /// Starts watching `live` (`None`, a job of one rank or an MPI job, watches nothing). On a loss the process
    /// dumps `recorder` (the collectives it was in), prints `hytrain: error: lost rank N on HOST: CAUSE`, writes
    /// it to `failure_file` (SageMaker's FailureReason) and exits 1, unless the main thread ended it first. With
    /// `carry_on` (the ranks left continue without the lost one) it only dumps the recorder: the loss reaches the
    /// main thread at its next collective.
    pub fn start(
        live: Option<Liveness>,
        failure_file: Option<PathBuf>,
        recorder: FlightRecorder,
        carry_on: bool,
    ) -> Watchdog {
        if let Some(live) = live.clone() {
            let spawned = std::thread::Builder::new().name("hytrain-watchdog".into()).spawn(move || {
                let Some(lost) = live.wait_lost(None) else {
                    return;
                };
                if carry_on {
                    recorder.dump(&lost.to_string());
                    return;
                }
                tracing::error!("{lost}; stopping this rank");
                // First, before anything can end the process: the dump is what tells a hang from a crash.
                recorder.dump(&lost.to_string());
                std::thread::sleep(GRACE);
                eprintln!("hytrain: error: {lost}");
                if let Some(path) = &failure_file {
                    let _ = std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new(".")));
                    let _ = std::fs::write(path, format!("{lost}\n"));
                }
                std::process::exit(1);
            });
            if let Err(e) = spawned {
                tracing::warn!(
                    "cannot start the liveness watchdog: {e}; a lost rank is noticed at the next collective"
                );
            }
        }
        Watchdog { live }
    }

    /// The ranks changed and this watch's round is over: stop watching it, telling the old round nothing.
    pub fn forget(&mut self) {
        self.live = None;
    }

    /// This rank is done: it says goodbye, so its exit is not taken for a loss (rank 0 waits for the others first).
    pub fn finish(mut self) {
        if let Some(live) = self.live.take() {
            live.leave();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            live.abandon();
        }
    }
}

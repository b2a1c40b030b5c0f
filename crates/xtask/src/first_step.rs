//! Launch to first step: wall time from starting a launcher (`hytrain launch`, `torchrun`) to the first training
//! step's metrics line on rank 0's stdout. Both sides print the same `epoch=1 step=1 ...` line, flushed, and the
//! clock stops when this process reads it from the pipe, so both are observed the same way.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The line both sides print after their first completed step starts with this.
pub const MARKER: &str = "epoch=1 step=1 ";

/// Runs `command` until it exits (killing its whole process group after `limit`) and returns the time from
/// spawning it to reading a stdout line that starts with `marker`.
pub fn time_to_marker(command: &mut Command, marker: &str, limit: Duration) -> Result<Duration> {
    let shown = crate::show(command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout can end the launcher and every worker it started.
        .process_group(0);
    let started = Instant::now();
    let mut child = command.spawn().with_context(|| format!("cannot run `{shown}`"))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let (tx, rx) = mpsc::channel();
    let wanted = marker.to_string();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with(&wanted) {
                let _ = tx.send(started.elapsed());
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = started + limit;
    let seen = rx.recv_timeout(limit).ok();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reader.join();
    let stderr = errors.join().unwrap_or_default();
    let last = stderr.lines().last().unwrap_or("(nothing on stderr)").to_string();
    match (seen, status) {
        (Some(t), Some(s)) if s.success() => Ok(t),
        (_, None) => bail!("`{shown}` still ran after {} s; last stderr line: {last}", limit.as_secs()),
        (None, Some(s)) => {
            bail!("`{shown}` exited ({s}) without printing '{}'; last stderr line: {last}", marker.trim())
        }
        (Some(_), Some(s)) => {
            bail!("`{shown}` failed ({s}) after its first step; last stderr line: {last}")
        }
    }
}

/// The middle value (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_stops_at_the_marker_line_not_at_exit() {
        let t = time_to_marker(
            Command::new("sh").args(["-c", "echo warming up; echo 'epoch=1 step=1 train_loss=2.3'; sleep 1"]),
            MARKER,
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(t < Duration::from_millis(900), "{t:?}");
    }

    #[test]
    fn a_run_without_the_marker_or_that_fails_says_so_with_its_last_stderr_line() {
        let e = time_to_marker(
            Command::new("sh").args(["-c", "echo 'epoch=1 step=2 x'; echo 'no data' >&2"]),
            MARKER,
            Duration::from_secs(30),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("without printing 'epoch=1 step=1'") && e.contains("no data"), "{e}");
        let e = time_to_marker(
            Command::new("sh").args(["-c", "echo 'epoch=1 step=1 x'; echo boom >&2; exit 3"]),
            MARKER,
            Duration::from_secs(30),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("failed") && e.contains("boom"), "{e}");
    }

    #[test]
    fn a_run_past_the_limit_is_killed_with_its_children() {
        let started = Instant::now();
        let e =
            time_to_marker(Command::new("sh").args(["-c", "sleep 30 & sleep 30"]), MARKER, Duration::from_millis(300))
                .unwrap_err()
                .to_string();
        assert!(e.contains("still ran after"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

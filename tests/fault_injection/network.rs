//! Network faults: a cut rendezvous connection, a stalled (SIGSTOPped) peer, unauthenticated clients.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;
use crate::harness::*;
use crate::{PEER_TIMEOUT, RUN_LIMIT, SLACK, STALL_PEER_TIMEOUT, WORLD};

/// A TCP relay for one rank's rendezvous connections that the test can cut, as a network fault would.
pub(crate) struct Relay {
    port: u16,
    links: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub(crate) fn start(to: u16) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let links = Arc::new(Mutex::new(Vec::new()));
        let kept = links.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                kept.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, links }
    }

    pub(crate) fn cut(&self) {
        for s in self.links.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A rank's connections to the rendezvous store are cut while it trains; the store takes it for lost.
pub(crate) fn dropped_rendezvous_connection(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[1, 2]);
    let step = rng.pick(3, 30);
    let mut job = Job::new(dir);
    let relay = Relay::start(job.port);
    for rank in 0..WORLD {
        job.start(rank, TRAIN, PEER_TIMEOUT, (rank == victim).then_some(relay.port));
    }
    job.at_step(step)?;
    let fault = Instant::now();
    relay.cut();
    let others: Vec<usize> = (0..WORLD).filter(|&r| r != victim).collect();
    let took = job.survivors_name(&others, victim, fault, PEER_TIMEOUT)?;
    // The cut-off rank cannot tell a dead master from a dead link; it must stop too, blaming rank 0.
    job.survivors_name(&[victim], 0, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!("cut rank {victim}'s rendezvous connections at step {step}; {state}"),
        detection: Some(took),
    })
}

/// A rank is stopped (SIGSTOP): alive, connected, silent. The others must give up within the peer timeout.
pub(crate) fn stalled_peer(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1, 2]);
    let step = rng.pick(3, 30);
    let mut job = Job::new(dir);
    job.start_all(TRAIN, STALL_PEER_TIMEOUT);
    job.at_step(step)?;
    let fault = Instant::now();
    job.signal(victim, libc::SIGSTOP);
    let survivors: Vec<usize> = (0..WORLD).filter(|&r| r != victim).collect();
    let result = job.survivors_name(&survivors, victim, fault, STALL_PEER_TIMEOUT + SLACK);
    job.signal(victim, libc::SIGCONT);
    job.kill(victim);
    let took = result?;
    if took < STALL_PEER_TIMEOUT.mul_f64(0.8) {
        return Err(format!("the stopped rank was declared lost after {took:?}, before the peer timeout"));
    }
    flight_recorder_names(&job, dir, &survivors, victim)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!("SIGSTOP rank {victim} at step {step} (peer timeout {STALL_PEER_TIMEOUT:?}); {state}"),
        detection: Some(took),
    })
}

/// The survivors dumped their flight recorders (stderr and `output/flight-recorder/rank-N.json`), and
/// `hytrain flight-recorder` over the output folder names the stopped rank (which may have dumped too, woken by
/// SIGCONT before its SIGKILL).
fn flight_recorder_names(job: &Job, dir: &Path, survivors: &[usize], victim: usize) -> Result<(), String> {
    for &s in survivors {
        let stderr = job.stderr(s);
        if !stderr.contains(&format!("flight recorder of rank {s} of {WORLD}")) {
            return Err(format!("rank {s} printed no flight recorder account:\n{stderr}"));
        }
    }
    let out = common::command(&["flight-recorder", dir.join("output").to_str().unwrap()], &[])
        .output()
        .map_err(|e| format!("cannot run hytrain flight-recorder: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The survivors' dumps were written for the liveness verdict, which names the stopped rank.
    let verdict = text.lines().last().unwrap_or_default();
    let named = verdict.starts_with(&format!("the job lost rank {victim} "))
        && survivors.iter().all(|s| text.contains(&format!("rank {s} on ")));
    if !out.status.success() || !named {
        return Err(format!(
            "hytrain flight-recorder did not name the stopped rank {victim}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Whether the server closed `s` within 30 s.
pub(crate) fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Clients without the job token at the rendezvous port, while the job trains: garbage, a forged proof, and a
/// real hytrain process with the wrong token claiming rank 1. All are refused; the job finishes.
pub(crate) fn unauthenticated_clients(dir: &Path, _rng: &mut Rng) -> Result<Outcome, String> {
    let mut job = Job::new(dir);
    // Long enough that the job is still training when the last client has been refused.
    job.start_all(&["--max-steps", "400", "--validation", "none", "--checkpoint-every", "50"], PEER_TIMEOUT);
    job.at_step(3)?;
    let fault = Instant::now();
    let mut garbage = TcpStream::connect(("127.0.0.1", job.port)).map_err(|e| e.to_string())?;
    garbage.write_all(&[0xAB; 4096]).unwrap();
    if !closed_by_server(&mut garbage) {
        return Err("garbage at the rendezvous port was not dropped".into());
    }
    let mut forger = TcpStream::connect(("127.0.0.1", job.port)).map_err(|e| e.to_string())?;
    let mut hello = b"HYTSTOR3".to_vec();
    hello.extend_from_slice(&7u64.to_le_bytes());
    hello.extend_from_slice(b"hytrain");
    hello.extend_from_slice(&[7u8; 32]);
    forger.write_all(&hello).unwrap();
    forger.write_all(&[0u8; 32]).unwrap();
    if !closed_by_server(&mut forger) {
        return Err("a forged proof was not dropped".into());
    }
    let impostor = common::command(
        &base_args(dir, &["--max-steps", "400", "--validation", "none", "--checkpoint-dir", "none"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &rank_env(1, job.port, PEER_TIMEOUT)
            .into_iter()
            .map(|(k, v)| (k, if k == "HYTRAIN_JOB_TOKEN" { "not-the-job-token-0123".to_string() } else { v }))
            .collect::<Vec<_>>(),
    )
    .current_dir(dir)
    .spawn()
    .unwrap();
    let impostor = common::wait(impostor, Duration::from_secs(60), "the wrong-token rank");
    let said = String::from_utf8_lossy(&impostor.stderr);
    if impostor.status.success() || !said.contains("job token mismatch") {
        return Err(format!("the wrong-token process was not refused:\n{said}"));
    }
    let refused_in = fault.elapsed();
    let all: Vec<usize> = (0..WORLD).collect();
    job.wait_exits(&all, fault, RUN_LIMIT)?;
    for r in 0..WORLD {
        if !job.exits[r].unwrap().0.success() {
            return Err(format!("the job failed on rank {r} after unauthenticated clients:\n{}", job.logs()));
        }
    }
    if !job.stdout(0).contains("steps=400 ") || !job.stderr(0).contains("refused a rendezvous connection") {
        return Err(format!("the job did not finish 60 steps or log the refusal:\n{}", job.logs()));
    }
    Ok(Outcome {
        detail: "garbage, a forged proof and a wrong-token rank refused; the job finished 400 steps".into(),
        detection: Some(refused_in),
    })
}

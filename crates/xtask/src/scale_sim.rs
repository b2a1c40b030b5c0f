//! `cargo xtask scale-sim`: 1, 2 and 4 "nodes" as network namespaces on one machine, joined by veth pairs to a
//! bridge, one `hytrain train` process per node (ResNet-18 on a small random CIFAR-10-shaped dataset), with and
//! without a 1 Gbit/s token-bucket limit on every node's link (tc tbf on both ends of each veth; no added delay:
//! the kernels this runs on here have no sch_netem). Reports rank 0's step time and the scaling
//! efficiency (one node's step time over n nodes' at the same batch per rank).
//!
//! Every namespace, veth and bridge is named `hys<pid>...`, so runs never collide, and is removed when the run
//! ends, also on failure; leftovers of a run that was killed (its pid gone) are removed at the next start.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::first_step::median;

const SUBNET: &str = "10.99.0";
const MASTER_PORT: u16 = 29500;
/// Records of the random dataset: enough for one epoch of the longest run at 4 nodes.
const TRAIN_RECORDS: usize = 1024;
const RECORD: usize = 1 + 3 * 32 * 32;

/// The namespaces, links and bridge of one run; dropping it removes them all.
struct Network {
    prefix: String,
    nodes: usize,
    created: Vec<Vec<String>>,
}

/// Runs `ip ARGS` (or another command), failing with its stderr.
fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}: is iproute2 installed?"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Network {
    fn namespace(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    fn host_end(&self, i: usize) -> String {
        format!("{}v{i}", self.prefix)
    }

    fn node_end(&self, i: usize) -> String {
        format!("{}p{i}", self.prefix)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// Node `i`'s address.
    fn addr(i: usize) -> String {
        format!("{SUBNET}.{}", i + 1)
    }

    fn create(nodes: usize) -> Result<Network> {
        let mut net = Network { prefix: format!("hys{}", std::process::id()), nodes, created: Vec::new() };
        let br = net.bridge();
        net.step(&["link", "add", &br, "type", "bridge"], vec!["link".into(), "del".into(), br.clone()])?;
        net.step(&["link", "set", &br, "up"], vec![])?;
        for i in 0..nodes {
            let (ns, host, node) = (net.namespace(i), net.host_end(i), net.node_end(i));
            net.step(&["netns", "add", &ns], vec!["netns".into(), "del".into(), ns.clone()])?;
            net.step(
                &["link", "add", &host, "type", "veth", "peer", "name", &node],
                vec!["link".into(), "del".into(), host.clone()],
            )?;
            net.step(&["link", "set", &node, "netns", &ns], vec![])?;
            net.step(&["link", "set", &host, "master", &br], vec![])?;
            net.step(&["link", "set", &host, "up"], vec![])?;
            let cidr = format!("{}/24", Network::addr(i));
            net.step(&["-n", &ns, "addr", "add", &cidr, "dev", &node], vec![])?;
            net.step(&["-n", &ns, "link", "set", &node, "up"], vec![])?;
            net.step(&["-n", &ns, "link", "set", "lo", "up"], vec![])?;
        }
        Ok(net)
    }

    /// Runs `ip ARGS` and remembers how to undo it.
    fn step(&mut self, args: &[&str], undo: Vec<String>) -> Result<()> {
        sh("ip", args)?;
        if !undo.is_empty() {
            self.created.push(undo);
        }
        Ok(())
    }

    /// Puts a 1 Gbit/s token bucket on both ends of every node's link, or removes it.
    fn limit(&self, on: bool) -> Result<()> {
        for i in 0..self.nodes {
            let ns = self.namespace(i);
            for (netns, dev) in [(None, self.host_end(i)), (Some(ns.as_str()), self.node_end(i))] {
                let mut args: Vec<&str> = Vec::new();
                if let Some(n) = netns {
                    args.extend(["netns", "exec", n, "tc"]);
                }
                let tail: &[&str] = if on {
                    &[
                        "qdisc", "replace", "dev", &dev, "root", "tbf", "rate", "1gbit", "burst", "512kb", "latency",
                        "20ms",
                    ]
                } else {
                    &["qdisc", "del", "dev", &dev, "root"]
                };
                args.extend(tail);
                let result = match netns {
                    Some(_) => sh("ip", &args),
                    None => sh("tc", tail),
                };
                // Removing a limit that is not there fails harmlessly.
                if on {
                    result?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for undo in self.created.drain(..).rev() {
            let args: Vec<&str> = undo.iter().map(String::as_str).collect();
            if let Err(e) = sh("ip", &args) {
                eprintln!("scale-sim: cleanup: {e:#}");
            }
        }
    }
}

/// Removes namespaces and links of earlier runs whose process is gone (a run killed before its cleanup).
fn remove_leftovers() {
    let alive = |name: &str| {
        let digits: String = name.trim_start_matches("hys").chars().take_while(char::is_ascii_digit).collect();
        !digits.is_empty() && Path::new(&format!("/proc/{digits}")).exists()
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with("hys") && name.contains("-n") && !alive(name) {
                let _ = sh("ip", &["netns", "del", name]);
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(':').nth(1).unwrap_or_default().trim();
            let name = name.split('@').next().unwrap_or_default();
            let ours = name.ends_with("br") || name.contains('v');
            if name.starts_with("hys") && ours && !alive(name) {
                let _ = sh("ip", &["link", "del", name]);
            }
        }
    }
}

/// A CIFAR-10 binary-layout folder of random images (label byte + 3072 pixel bytes per record).
fn random_cifar(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let records = |n: usize, bytes: &mut dyn FnMut(usize) -> Vec<u8>| {
        let mut out = Vec::with_capacity(n * RECORD);
        for i in 0..n {
            out.push((i % 10) as u8);
            out.extend(bytes(RECORD - 1));
        }
        out
    };
    fs::write(dir.join("data_batch_1.bin"), records(TRAIN_RECORDS, &mut bytes))?;
    fs::write(dir.join("test_batch.bin"), records(64, &mut bytes))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
/// One run: `nodes` ranks, one per namespace; returns rank 0's median step time after the warm-up steps.
fn run_job(
    net: &Network,
    hytrain: &Path,
    data: &Path,
    scratch: &Path,
    nodes: usize,
    steps: usize,
    batch: usize,
    extra: &[String],
) -> Result<f64> {
    let token = format!("scale-sim-{}-{}", std::process::id(), nodes);
    let mut children: Vec<Child> = Vec::new();
    let result = (|| {
        for rank in 0..nodes {
            let out = scratch.join(format!("rank{rank}"));
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &net.namespace(rank)])
                .arg(hytrain)
                .args(["train", "--model", "resnet18", "--data"])
                .arg(data)
                .args(["--validation", "none", "--no-resume", "--log-interval", "1"])
                .args(["--max-steps", &steps.to_string(), "--batch-size", &batch.to_string()])
                .args(["--lr", "0.01", "--momentum", "0.5", "--num-classes", "10"])
                .arg("--model-dir")
                .arg(out.join("model"))
                .arg("--checkpoint-dir")
                .arg(out.join("checkpoints"))
                .arg("--output-dir")
                .arg(out.join("output"))
                .args(extra)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                // torchrun's variables: one process per node, the node rank is the rank.
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", nodes.to_string())
                .env("LOCAL_RANK", "0")
                .env("LOCAL_WORLD_SIZE", "1")
                .env("GROUP_RANK", rank.to_string())
                .env("MASTER_ADDR", Network::addr(0))
                .env("MASTER_PORT", MASTER_PORT.to_string())
                .env("HYTRAIN_JOB_TOKEN", &token)
                .env("HYTRAIN_RENDEZVOUS_TIMEOUT", "120")
                .env("HYTRAIN_COLLECTIVE_TIMEOUT", "120")
                .env("OMP_NUM_THREADS", "1")
                .stdin(Stdio::null())
                .stdout(if rank == 0 { Stdio::piped() } else { Stdio::null() })
                .stderr(Stdio::piped());
            children.push(c.spawn().context("cannot start `ip netns exec ... hytrain train`")?);
        }
        let stdout = children[0].stdout.take().context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if line.starts_with("epoch=") && line.contains(" step=") {
                    let _ = tx.send(Instant::now());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut stamps = Vec::new();
        while stamps.len() < steps {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(t) => stamps.push(t),
                Err(_) => break,
            }
        }
        if stamps.len() < steps {
            bail!("rank 0 printed {} of {steps} step lines", stamps.len());
        }
        // The first steps build the graph and fill caches; the rest are the steady state.
        let warm = 2.min(steps - 2);
        let gaps: Vec<f64> = stamps[warm..].windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect();
        Ok(median(&gaps))
    })();
    let mut failures = Vec::new();
    for (rank, mut c) in children.into_iter().enumerate() {
        let done = (0..600).any(|_| {
            let exited = matches!(c.try_wait(), Ok(Some(_)));
            if !exited {
                std::thread::sleep(Duration::from_millis(100));
            }
            exited
        });
        if !done {
            let _ = c.kill();
        }
        let status = c.wait()?;
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = c.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            failures.push(format!("rank {rank} ({status}): {}", err.lines().last().unwrap_or("(no stderr)")));
        }
    }
    match result {
        Ok(ms) if failures.is_empty() => Ok(ms),
        Ok(_) => bail!("{nodes} nodes: {}", failures.join("; ")),
        Err(e) => bail!("{nodes} nodes: {e:#}; {}", failures.join("; ")),
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// `cargo xtask scale-sim [-- TRAIN ARGS]`: every job runs with `--overlap true` and `--overlap false`; TRAIN ARGS
/// are added to every `hytrain train`.
pub fn scale_sim(hytrain: &Path, extra: &[String]) -> Result<u8> {
    if !crate::setup::is_root() {
        bail!("scale-sim needs root for network namespaces (ip netns); run it as root");
    }
    remove_leftovers();
    let env_usize =
        |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let steps = env_usize("HYTRAIN_SCALE_SIM_STEPS", 8).max(4);
    let batch = env_usize("HYTRAIN_SCALE_SIM_BATCH", 16).max(1);
    let scratch = std::env::temp_dir().join(format!("hytrain-scale-sim-{}", std::process::id()));
    let data = scratch.join("cifar-10-batches-bin");
    random_cifar(&data)?;
    let net = Network::create(4).context(
        "cannot build the simulated nodes (network namespaces, veth, a bridge); does this machine allow them?",
    )?;
    println!(
        "scale-sim: ResNet-18, batch {batch} per rank, {steps} steps (median step time after 2 warm-up steps), \
         one process with one thread per node; nodes {SUBNET}.1-4 in namespaces {}-n0..3",
        net.prefix
    );
    // (nodes, link, overlap, ms): every job runs with and without overlap of backward and allreduce.
    let mut rows: Vec<(usize, &str, bool, f64)> = Vec::new();
    let result = (|| -> Result<()> {
        for limited in [false, true] {
            net.limit(limited)?;
            let link = if limited { "1 Gbit/s (tbf)" } else { "unlimited" };
            for overlap in [true, false] {
                for nodes in [1, 2, 4] {
                    let run_dir = scratch.join(format!("{nodes}-{limited}-{overlap}"));
                    let mut args = vec!["--overlap".to_string(), overlap.to_string()];
                    args.extend(extra.iter().cloned());
                    let ms = run_job(&net, hytrain, &data, &run_dir, nodes, steps, batch, &args)?;
                    let _ = fs::remove_dir_all(&run_dir);
                    println!("scale-sim: {nodes} node(s), {link}, overlap {}: {ms:.0} ms per step", on_off(overlap));
                    rows.push((nodes, link, overlap, ms));
                }
            }
        }
        Ok(())
    })();
    net.limit(false).ok();
    drop(net);
    let _ = fs::remove_dir_all(&scratch);
    result?;
    println!("\n| nodes | link | overlap | step ms | scaling efficiency |\n|---:|---|---|---:|---:|");
    let find = |nodes: usize, link: &str, overlap: bool| {
        rows.iter().find(|r| r.0 == nodes && r.1 == link && r.2 == overlap).map(|r| r.3)
    };
    for (nodes, link, overlap, ms) in &rows {
        let one = find(1, link, *overlap).unwrap_or(f64::NAN);
        println!("| {nodes} | {link} | {} | {ms:.0} | {:.0}% |", on_off(*overlap), one / ms * 100.0);
    }
    for overlap in [true, false] {
        if let (Some(limited), Some(free)) = (find(4, "1 Gbit/s (tbf)", overlap), find(4, "unlimited", overlap)) {
            println!(
                "4 nodes, overlap {}: limited / unlimited step time {:.2}x (issue 8's target with overlap: <= 1.2x)",
                on_off(overlap),
                limited / free
            );
        }
    }
    Ok(0)
}

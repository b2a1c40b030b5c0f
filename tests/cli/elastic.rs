//! A job whose node count is a range (`--nnodes MIN:MAX`) against a standalone store carries on when it loses a
//! node: the nodes left meet again at the store, take global rank 0's state and share what is left of the epoch,
//! in the same processes. Each is checked against what a user can see: exit codes, the log, the accuracy, and the
//! digests of the batches each rank trained (`--digest-trained`) against `hytrain data digest --regroup`.

use std::collections::BTreeMap;
use std::path::Path;

use super::standalone_store::{store, store_at, Proc, TOKEN};
use crate::common::{self, digits};

const BATCH: &str = "8";
const SEED: &str = "3";
const EPOCHS: &str = "10";

/// `hytrain train`'s flags for node `host` of a job of `nnodes` on the store at `endpoint`, with `extra`: the MLP on
/// the digits, its model and output under `dir/host`.
fn train_args(dir: &Path, host: &str, nnodes: &str, endpoint: &str, extra: &[&str]) -> Vec<String> {
    let data = digits();
    let (test, model, output) = (data.join("test"), dir.join(host).join("model"), dir.join(host).join("output"));
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let mut args: Vec<String> = ["train", "--model", "mlp", "--data"].map(String::from).to_vec();
    args.extend([path(&data), "--validation".into(), path(&test), "--model-dir".into(), path(&model)]);
    args.extend(["--output-dir".into(), path(&output)]);
    let rest = ["--batch-size", BATCH, "--seed", SEED, "--epochs", EPOCHS, "--lr", "0.1", "--momentum", "0.9"];
    args.extend(
        rest.iter()
            .chain(&["--log-interval", "1", "--nnodes", nnodes, "--rendezvous-endpoint", endpoint])
            .map(|a| a.to_string()),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Node `host` of a job of 3 to 4 nodes on the store at `endpoint`, with `env` besides the job token.
fn node(dir: &Path, host: &str, endpoint: &str, env: &[(&str, &str)]) -> Proc {
    let extra = ["--checkpoint-dir", "none", "--digest-trained", "--last-call-timeout", "2"];
    let args = train_args(dir, host, "3:4", endpoint, &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vars =
        vec![("HOSTNAME", host.to_string()), ("HYTRAIN_JOB_TOKEN", TOKEN.into()), ("OMP_NUM_THREADS", "1".into())];
    vars.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    Proc::spawn(common::command(&args, &vars), dir, host)
}

/// Starts `hosts` as nodes and waits until global rank `rank` is at step 10 (rank 0 prints the metrics; the others
/// are timed by it); returns the nodes and the index of the one that is rank `rank`.
fn at_step_10(dir: &Path, endpoint: &str, hosts: &[&str], env: &[(&str, &str)], rank: usize) -> (Vec<Proc>, usize) {
    let mut nodes: Vec<Proc> = hosts.iter().map(|h| node(dir, h, endpoint, env)).collect();
    let world = hosts.len();
    let find =
        |nodes: &[Proc], r: usize| nodes.iter().position(|p| p.stderr().contains(&format!("[rank {r}/{world} ")));
    let (zero, which) = loop {
        if let (Some(zero), Some(which)) = (find(&nodes, 0), find(&nodes, rank)) {
            break (zero, which);
        }
        assert!(nodes.iter_mut().all(|p| p.child.try_wait().unwrap().is_none()), "a node exited before training");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    nodes[zero].wait_for("step 10", |p| p.stdout().contains(" step=10 "));
    (nodes, which)
}

/// The value after `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(&format!(" {key}=")).unwrap_or_else(|| panic!("no {key} in {line}")) + key.len() + 2;
    line[start..].split_whitespace().next().unwrap()
}

#[test]
fn a_job_that_loses_global_rank_0_mid_epoch_finishes_on_the_rest_having_trained_what_was_left_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, endpoint) = store(dir.path());
    // Global rank 0 is killed at step 10 of the first epoch's 45.
    let hosts = ["node-a", "node-b", "node-c", "node-d"];
    let (mut nodes, zero) = at_step_10(dir.path(), &endpoint, &hosts, &[], 0);
    nodes[zero].child.kill().unwrap();
    nodes[zero].child.wait().unwrap();
    let victim = nodes.remove(zero);

    let mut regroups = Vec::new();
    for p in nodes.iter_mut() {
        let status = p.exit();
        let (out, err) = (p.stdout(), p.stderr());
        assert!(status.success(), "a node left failed:\n{out}{err}");
        assert!(err.contains("lost rank 0 on 127.0.0.1") && err.contains("carrying on without it"), "{err}");
        let line = err
            .lines()
            .find(|l| l.contains("continuing with the ranks of the new round"))
            .unwrap_or_else(|| panic!("{err}"));
        assert_eq!(field(line, "world_size"), "3", "{line}");
        regroups.push(field(line, "regroup").to_string());
    }
    assert!(regroups.iter().all(|r| *r == regroups[0]), "the ranks left disagree on the regroup: {regroups:?}");
    assert!(regroups[0].starts_with("1:4x"), "the loss was not in the first epoch: {}", regroups[0]);
    drop((victim, store));
    // What each rank left trained after the loss (its last digest) is what the sampler shares out of what the four
    // left of the epoch, and the epochs after it at three ranks.
    let trained = last_digests(&nodes, 3);
    assert_eq!(trained.keys().copied().collect::<Vec<_>>(), [0, 1, 2], "the ranks left are 0, 1 and 2 of 3");
    let expected = expected_digests(3, &regroups[0], 1);
    assert_eq!(trained, expected, "the batches trained after the loss are not the rest of the epoch, shared");

    // One of them is rank 0 now: it reports and exports, with the demo's promised accuracy.
    let accuracy = exported_accuracy(&nodes);
    assert!(accuracy >= 0.93, "accuracy {accuracy} after carrying on");
}

#[test]
fn a_stopped_rank_is_dropped_after_the_peer_timeout_and_the_rest_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, endpoint) = store(dir.path());
    let hosts = ["node-a", "node-b", "node-c", "node-d"];
    let (mut nodes, stopped) = at_step_10(dir.path(), &endpoint, &hosts, &[("HYTRAIN_PEER_TIMEOUT", "3")], 2);
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    unsafe { libc::kill(nodes[stopped].child.id() as i32, libc::SIGSTOP) };
    let frozen = nodes.remove(stopped);
    for p in nodes.iter_mut() {
        let status = p.exit();
        let err = p.stderr();
        assert!(status.success(), "a node left failed:\n{}{err}", p.stdout());
        assert!(err.contains("lost rank 2 on 127.0.0.1: no heartbeat for 3 s"), "{err}");
        assert!(err.contains("continuing with the ranks of the new round") && err.contains(" world_size=3 "), "{err}");
    }
    assert_eq!(nodes.iter().filter(|p| p.stdout().contains("model written to")).count(), 1);
    drop(frozen);
}

#[test]
fn a_job_whose_store_is_killed_waits_for_it_to_start_again_and_carries_on_in_its_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, endpoint) = store(dir.path());
    let hosts = ["node-a", "node-b", "node-c", "node-d"];
    let (mut nodes, _) = at_step_10(dir.path(), &endpoint, &hosts, &[], 0);
    store.child.kill().unwrap();
    store.child.wait().unwrap();
    // The store's Deployment restarting its pod: a new, empty store at the same address.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _again = store_at(dir.path(), &endpoint, "store-again");
    let mut regroups = Vec::new();
    for p in nodes.iter_mut() {
        let status = p.exit();
        let err = p.stderr();
        assert!(status.success(), "a node failed:\n{}{err}", p.stdout());
        assert!(err.contains(&format!("lost the rendezvous store at {endpoint}")), "{err}");
        assert!(err.contains("waiting for it to come back at the same address"), "{err}");
        let line = err
            .lines()
            .find(|l| l.contains("continuing with the ranks of the new round"))
            .unwrap_or_else(|| panic!("{err}"));
        assert_eq!(field(line, "world_size"), "4", "{line}");
        regroups.push(field(line, "regroup").to_string());
    }
    assert!(regroups.iter().all(|r| *r == regroups[0]), "the ranks disagree on the regroup: {regroups:?}");
    let (epoch, readers) = regroups[0].split_once(':').unwrap();
    assert!(readers.starts_with("4x"), "{}", regroups[0]);
    let trained = last_digests(&nodes, 4);
    assert_eq!(trained, expected_digests(4, &regroups[0], epoch.parse().unwrap()), "not the rest of the epoch");
    let accuracy = exported_accuracy(&nodes);
    assert!(accuracy >= 0.93, "accuracy {accuracy} after the store came back");
}

#[test]
fn the_ranks_left_below_min_wait_out_the_rendezvous_timeout_and_fail_naming_how_many_came() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, endpoint) = store(dir.path());
    let hosts = ["node-a", "node-b", "node-c"];
    let (mut nodes, victim) = at_step_10(dir.path(), &endpoint, &hosts, &[("HYTRAIN_RENDEZVOUS_TIMEOUT", "6")], 1);
    nodes[victim].child.kill().unwrap();
    nodes[victim].child.wait().unwrap();
    nodes.remove(victim);
    for p in nodes.iter_mut() {
        assert!(!p.exit().success(), "a node went on below MIN:\n{}", p.stderr());
        let err = p.stderr();
        let error = &err[err.find("hytrain: error:").unwrap_or_else(|| panic!("no error line:\n{err}"))..];
        assert!(error.starts_with("hytrain: error: the ranks left could not meet again"), "{error}");
        // Each counts the nodes still waiting when its own wait ended: 2, or 1 once the other gave up first.
        let tail = format!(
            " of the at least 3 nodes the job needs (--nnodes 3:4) came to the rendezvous store at {endpoint} within 6 s"
        );
        assert!(error.contains("only 2") || error.contains("only 1"), "{error}");
        assert!(error.contains(&tail), "{error}");
    }
}

/// Each rank's digest of what it trained in the last round (its last `trained digest` line), by its rank in it.
fn last_digests(nodes: &[Proc], world: usize) -> BTreeMap<usize, String> {
    let mut trained = BTreeMap::new();
    for p in nodes {
        let err = p.stderr();
        let line = err.lines().rev().find(|l| l.contains("trained digest: rank ")).unwrap_or_else(|| panic!("{err}"));
        let rank: usize =
            line.split("trained digest: rank ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert!(line.contains(&format!("rank {rank} of {world} trained ")), "{line}");
        trained.insert(rank, line.rsplit(' ').next().unwrap().to_string());
    }
    trained
}

/// `hytrain data digest`'s digests of `world` ranks after `regroup`, in epoch `first` (from 1) and those after it,
/// by rank.
fn expected_digests(world: usize, regroup: &str, first: u64) -> BTreeMap<usize, String> {
    let data = digits();
    let world = world.to_string();
    let epochs = (EPOCHS.parse::<u64>().unwrap() + 1 - first).to_string();
    let first = first.to_string();
    let mut args = vec!["data", "digest", "--data", data.to_str().unwrap(), "--world-size", world.as_str()];
    args.extend(["--first-epoch", first.as_str(), "--epochs", epochs.as_str()]);
    args.extend(["--batch-size", BATCH, "--seed", SEED, "--regroup", regroup]);
    let out = common::run(&args, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (rank, hex) = l.strip_prefix("rank ").unwrap().split_once(": ").unwrap();
            (rank.parse().unwrap(), hex.to_string())
        })
        .collect()
}

#[test]
fn a_node_that_comes_mid_epoch_is_made_room_for_and_the_job_ends_on_four_having_trained_what_was_left_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, endpoint) = store(dir.path());
    let (mut nodes, _) = at_step_10(dir.path(), &endpoint, &["node-a", "node-b", "node-c"], &[], 0);
    nodes.push(node(dir.path(), "node-d", &endpoint, &[]));
    let mut regroups = Vec::new();
    for p in nodes.iter_mut() {
        let status = p.exit();
        let err = p.stderr();
        assert!(status.success(), "a node failed:\n{}{err}", p.stdout());
        let mark = if err.contains("[rank ? ]") || err.contains("joining the job in progress") {
            "joining the job in progress"
        } else {
            assert!(err.contains("nodes wait to join (--nnodes 3:4): making room for them after step "), "{err}");
            "continuing with the ranks of the new round"
        };
        let line = err.lines().find(|l| l.contains(mark)).unwrap_or_else(|| panic!("no '{mark}':\n{err}"));
        regroups.push(field(line, "regroup").to_string());
    }
    assert!(nodes[3].stderr().contains("joining the job in progress"), "{}", nodes[3].stderr());
    assert!(regroups.iter().all(|r| *r == regroups[0]), "the nodes disagree on the regroup: {regroups:?}");
    // The newcomer starts (loading libtorch) while the three train on: the join lands in some epoch.
    let (epoch, readers) = regroups[0].split_once(':').unwrap();
    assert!(readers.starts_with("3x"), "{}", regroups[0]);
    let trained = last_digests(&nodes, 4);
    assert_eq!(trained.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    let expected = expected_digests(4, &regroups[0], epoch.parse().unwrap());
    assert_eq!(trained, expected, "the batches trained after the join are not the rest, shared");
    let reporters: Vec<&Proc> = nodes.iter().filter(|p| p.stdout().contains("model written to")).collect();
    assert_eq!(reporters.len(), 1, "exactly one rank 0 exports");
    assert!(!nodes[3].stdout().contains("model written to"), "the newcomer became rank 0");
}

/// A node of two processes started by `hytrain launch` on host `host` (restarting them once), of a job of 1 to 2
/// such nodes on the store at `endpoint`.
fn launched_node(dir: &Path, host: &str, endpoint: &str) -> Proc {
    // The first round closes as soon as both nodes are in (MAX), so the last call only matters if one is late.
    let extra = ["--checkpoint-dir", "none", "--digest-trained", "--last-call-timeout", "30"];
    let train = train_args(dir, host, "1:2", endpoint, &extra);
    let mut args = vec!["launch", "--nproc-per-node", "2", "--max-restarts", "1", "--", common::hytrain()];
    args.extend(train.iter().map(String::as_str));
    let vars = [("HOSTNAME", host.to_string()), ("HYTRAIN_JOB_TOKEN", TOKEN.into())];
    Proc::spawn(common::command(&args, &vars), dir, host)
}

/// The process id of the worker of `launcher` whose LOCAL_RANK is `local_rank`.
fn worker_of(launcher: &Proc, local_rank: usize) -> i32 {
    let pid = launcher.child.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let want = format!("LOCAL_RANK={local_rank}");
    children
        .split_whitespace()
        .find(|c| {
            let environ = std::fs::read(format!("/proc/{c}/environ")).unwrap_or_default();
            environ.split(|b| *b == 0).any(|v| v == want.as_bytes())
        })
        .unwrap_or_else(|| panic!("launcher {pid} has no worker of local rank {local_rank}: {children}"))
        .parse()
        .unwrap()
}

/// The digest each rank of the job's last round of `world` ranks logged last, over every node's log (the lines
/// begin with their time, so the latest of a rank wins wherever it ran).
fn final_digests(nodes: &[Proc], world: usize) -> BTreeMap<usize, String> {
    let mut latest: BTreeMap<usize, (String, String)> = BTreeMap::new();
    for p in nodes {
        for line in p.stderr().lines().filter(|l| l.contains(&format!(" of {world} trained "))) {
            let Some(rest) = line.split("trained digest: rank ").nth(1) else { continue };
            let rank: usize = rest.split(' ').next().unwrap().parse().unwrap();
            let time = line.split_whitespace().next().unwrap().to_string();
            let hex = line.rsplit(' ').next().unwrap().to_string();
            if latest.get(&rank).is_none_or(|(t, _)| *t < time) {
                latest.insert(rank, (time, hex));
            }
        }
    }
    latest.into_iter().map(|(rank, (_, hex))| (rank, hex)).collect()
}

#[test]
fn nodes_of_two_processes_carry_on_when_one_loses_a_process_and_it_comes_back_whole_through_its_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, endpoint) = store(dir.path());
    let mut nodes =
        vec![launched_node(dir.path(), "node-a", &endpoint), launched_node(dir.path(), "node-b", &endpoint)];
    // Wait for step 10 of the job of 4 ranks, then kill global rank 3, a process of node rank 1.
    let (victim, survivor) = loop {
        let at_10 = nodes.iter().any(|p| p.stdout().contains(" step=10 "));
        let of_rank_3 = nodes.iter().position(|p| p.stderr().contains("[rank 3/4 "));
        if let (true, Some(v)) = (at_10, of_rank_3) {
            break (v, 1 - v);
        }
        assert!(nodes.iter_mut().all(|p| p.child.try_wait().unwrap().is_none()), "a node exited before step 10");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let worker = worker_of(&nodes[victim], 1);
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);

    for p in nodes.iter_mut() {
        let status = p.exit();
        assert!(status.success(), "a node failed:\n{}{}", p.stdout(), p.stderr());
    }
    let (left, back) = (nodes[survivor].stderr(), nodes[victim].stderr());
    // The node that lost a process leaves whole, and its launcher starts both again as a new node that joins.
    assert!(back.contains("lost rank 3 on 127.0.0.1") && back.contains("a process of this node"), "{back}");
    assert!(back.contains("restarting the 2 workers of this node (restart 1 of 1"), "{back}");
    assert_eq!(back.matches("joining the job in progress").count(), 2, "{back}");
    // The other node's two processes carry on as a job of 2, through their own shared memory, then make room.
    assert_eq!(left.matches("carrying on without it (--nnodes 1:2)").count(), 2, "{left}");
    let rounds: Vec<&str> = left.lines().filter(|l| l.contains("continuing with the ranks of the new round")).collect();
    assert_eq!(rounds.len(), 4, "two rounds of two ranks each:\n{left}");
    assert!(rounds[..2].iter().all(|l| field(l, "world_size") == "2"), "{rounds:?}");
    assert!(rounds[2..].iter().all(|l| field(l, "world_size") == "4"), "{rounds:?}");
    let note = "the job's ranks changed 2 time(s) while this process trained: the summary's samples, rates and times \
                are those of the last round, 4 rank(s) from step ";
    assert_eq!(left.matches(note).count(), 2, "{left}");
    // The ranks of the last round trained the rest of the epoch they met in, shared, and whole epochs after it.
    let regroup = field(rounds[3], "regroup").to_string();
    assert!(rounds.iter().skip(2).all(|l| field(l, "regroup") == regroup), "{rounds:?}");
    let (epoch, readers) = regroup.split_once(':').unwrap();
    // The newcomers start (libtorch loads) while the two train on: the join lands in some epoch, after two ranks.
    assert!(readers.rsplit(',').next().unwrap().starts_with("2x"), "{regroup}");
    let trained = final_digests(&nodes, 4);
    assert_eq!(trained.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(trained, expected_digests(4, &regroup, epoch.parse().unwrap()), "not the rest of the epoch, shared");
    let accuracy = exported_accuracy(&nodes);
    assert!(accuracy >= 0.93, "accuracy {accuracy} after a node lost a process and came back");
}

#[test]
fn a_lone_process_of_an_elastic_pod_that_asks_for_two_is_refused_before_it_asks_the_store() {
    let data = digits();
    let vars = [
        ("PET_NNODES", "1:3".to_string()),
        ("PET_RDZV_ENDPOINT", "hytrain-rdzv:29400".to_string()),
        ("PET_NPROC_PER_NODE", "2".to_string()),
        ("HOSTNAME", "job-worker-0".to_string()),
        ("HYTRAIN_JOB_TOKEN", TOKEN.into()),
    ];
    let out = common::run(&["train", "--model", "mlp", "--data", data.to_str().unwrap()], &vars);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "hytrain: error: PET_NNODES=1:3: the platform asks for 2 processes per node, which must be started as one \
             node by `hytrain launch`"
        ),
        "{err}"
    );
}

/// Node `host` of a sharded job (`--shard optimizer`) of 2 to 3 nodes on the store at `endpoint`, checkpointing
/// every 7 steps into the folder `checkpoints` they share.
fn sharded_node(dir: &Path, host: &str, endpoint: &str, checkpoints: &Path) -> Proc {
    let extra = ["--shard", "optimizer", "--checkpoint-every", "7", "--last-call-timeout", "2", "--checkpoint-dir"];
    let mut args = train_args(dir, host, "2:3", endpoint, &extra);
    args.push(checkpoints.to_str().unwrap().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vars = [("HOSTNAME", host.to_string()), ("HYTRAIN_JOB_TOKEN", TOKEN.into()), ("OMP_NUM_THREADS", "1".into())];
    Proc::spawn(common::command(&args, &vars), dir, host)
}

#[test]
fn a_sharded_job_that_loses_a_node_continues_from_its_last_checkpoint_in_process_and_takes_in_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, endpoint) = store(dir.path());
    let checkpoints = dir.path().join("checkpoints");
    let mut nodes: Vec<Proc> =
        ["node-a", "node-b", "node-c"].iter().map(|h| sharded_node(dir.path(), h, &endpoint, &checkpoints)).collect();
    let (victim, _) = loop {
        let at_10 = nodes.iter().any(|p| p.stdout().contains(" step=10 "));
        if let (true, Some(v)) = (at_10, nodes.iter().position(|p| p.stderr().contains("[rank 2/3 "))) {
            break (v, ());
        }
        assert!(nodes.iter_mut().all(|p| p.child.try_wait().unwrap().is_none()), "a node exited before step 10");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    nodes[victim].child.kill().unwrap();
    nodes[victim].child.wait().unwrap();
    nodes.remove(victim);
    // A new node comes: admitted with the two left, or made room for at a step boundary after a checkpoint.
    nodes.push(sharded_node(dir.path(), "node-d", &endpoint, &checkpoints));
    for p in nodes.iter_mut() {
        let status = p.exit();
        assert!(status.success(), "a node failed:\n{}{}", p.stdout(), p.stderr());
    }
    let newcomer = nodes[2].stderr();
    assert!(
        newcomer.contains("joining the job in progress, from its last checkpoint (--shard optimizer)"),
        "{newcomer}"
    );
    for p in &nodes[..2] {
        let err = p.stderr();
        assert!(err.contains("lost rank 2 on 127.0.0.1") && err.contains("carrying on without it"), "{err}");
        let rounds: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("continuing with the ranks of the new round, from the job's last checkpoint"))
            .collect();
        assert!(!rounds.is_empty() && field(rounds.last().unwrap(), "world_size") == "3", "{err}");
        // The checkpoint read at another world size shares what its ranks left of the epoch.
        assert!(err.contains("this job's ranks sharing what the checkpoint's "), "{err}");
    }
    let accuracy = exported_accuracy(&nodes);
    assert!(accuracy >= 0.93, "accuracy {accuracy} after continuing from checkpoints");
}

/// The final validation accuracy of the one node whose rank 0 exported the model.
fn exported_accuracy(nodes: &[Proc]) -> f64 {
    let reporters: Vec<&Proc> = nodes.iter().filter(|p| p.stdout().contains("model written to")).collect();
    assert_eq!(reporters.len(), 1, "exactly one rank 0 exports");
    let summary = reporters[0].stdout();
    summary
        .lines()
        .rev()
        .find_map(|l| l.split("val_accuracy=").nth(1).and_then(|v| v.split_whitespace().next()?.parse().ok()))
        .unwrap_or_else(|| panic!("no val_accuracy:\n{summary}"))
}

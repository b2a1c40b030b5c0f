//! `hytrain rendezvous`: a 2-rank `hytrain train` job against a store in a process of its own. The store outlives a
//! SIGKILLed global rank 0, the other rank exits naming rank 0 as lost (not the store as unreachable), and the next
//! run of the job rendezvouses on the same store process and finishes. A job whose node count is a range
//! (`--nnodes MIN:MAX`) is admitted by the store: node ranks in the order nodes came, or, below MIN, an error
//! naming how many came.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::common::{self, digits};

pub(super) const TOKEN: &str = "standalone-store-test-token";
const LIMIT: Duration = Duration::from_secs(90);

/// A process whose stdout and stderr go to files in `dir`, killed if the test ends while it runs.
pub(super) struct Proc {
    pub(super) child: Child,
    out: std::path::PathBuf,
    err: std::path::PathBuf,
}

impl Proc {
    pub(super) fn spawn(mut c: Command, dir: &Path, name: &str) -> Proc {
        let (out, err) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        c.current_dir(dir).stdout(fs::File::create(&out).unwrap()).stderr(fs::File::create(&err).unwrap());
        Proc { child: c.spawn().unwrap(), out, err }
    }

    pub(super) fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub(super) fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits until `ready` holds for the process's output; fails if it exits first or `LIMIT` passes.
    pub(super) fn wait_for(&mut self, what: &str, ready: impl Fn(&Proc) -> bool) {
        let start = Instant::now();
        while !ready(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("exited ({status}) before {what}:\n{}{}", self.stdout(), self.stderr());
            }
            assert!(start.elapsed() < LIMIT, "no {what} within {LIMIT:?}:\n{}{}", self.stdout(), self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < LIMIT, "still running after {LIMIT:?}:\n{}{}", self.stdout(), self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rank `rank` of 2, torchrun-style env with no master: the store is reached through `endpoint` (the variable) or,
/// when `endpoint` is `None`, through the flag in `extra`.
fn rank(dir: &Path, rank: usize, endpoint: Option<&str>, extra: &[&str]) -> Proc {
    let data = digits();
    let run = dir.join(format!("rank{rank}"));
    let mut args = vec!["train", "--model", "mlp", "--data", data.to_str().unwrap(), "--batch-size", "32"];
    args.extend(["--log-interval", "1", "--validation", "none", "--checkpoint-dir", "none"]);
    let (model, output) = (run.join("model"), run.join("output"));
    args.extend(["--model-dir", model.to_str().unwrap(), "--output-dir", output.to_str().unwrap()]);
    args.extend(extra);
    let mut env = vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", "2".to_string()),
        ("LOCAL_RANK", "0".into()),
        ("LOCAL_WORLD_SIZE", "1".into()),
        ("HYTRAIN_JOB_TOKEN", TOKEN.into()),
        ("HYTRAIN_RENDEZVOUS_TIMEOUT", "60".into()),
        ("OMP_NUM_THREADS", "1".into()),
    ];
    if let Some(endpoint) = endpoint {
        env.push(("HYTRAIN_RENDEZVOUS_ENDPOINT", endpoint.into()));
    }
    Proc::spawn(common::command(&args, &env), dir, &format!("run-rank{rank}"))
}

#[test]
fn a_standalone_store_outlives_rank_0_names_it_lost_to_the_other_rank_and_serves_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let listen = ["rendezvous", "--listen", endpoint.as_str()];
    let env = [("HYTRAIN_JOB_TOKEN", TOKEN.to_string()), ("HOSTNAME", "rdzv".to_string())];
    let mut store = Proc::spawn(common::command(&listen, &env), dir.path(), "store");
    store.wait_for("the store listening", |p| p.stderr().contains(&format!("listening on {endpoint}")));

    // Run 1: rank 0 is SIGKILLed mid-training.
    let run1 = dir.path().join("run1");
    fs::create_dir_all(&run1).unwrap();
    let mut rank0 = rank(&run1, 0, Some(&endpoint), &["--epochs", "100"]);
    let mut rank1 = rank(&run1, 1, Some(&endpoint), &["--epochs", "100"]);
    rank0.wait_for("step 2", |p| p.stdout().contains(" step=2 "));
    rank0.child.kill().unwrap();
    rank0.child.wait().unwrap();
    let status = rank1.exit();
    let err = rank1.stderr();
    assert!(!status.success(), "rank 1 exited 0 after rank 0 was lost:\n{err}");
    let error = &err[err.find("hytrain: error:").unwrap_or_else(|| panic!("no error line:\n{err}"))..];
    // Whether the watchdog or the allreduce in flight reports it first, the loss is rank 0's.
    assert!(error.lines().next().unwrap().contains("lost rank 0 on 127.0.0.1: "), "{error}");
    assert!(
        !error.contains("lost the rendezvous store") && !error.contains("could not reach"),
        "the store was blamed:\n{error}"
    );
    assert!(store.child.try_wait().unwrap().is_none(), "the store died with rank 0:\n{}", store.stderr());

    // Run 2 of the job on the same store process, through the flag this time: it finishes.
    let run2 = dir.path().join("run2");
    fs::create_dir_all(&run2).unwrap();
    let flags = ["--epochs", "1", "--max-samples", "256", "--rendezvous-endpoint", endpoint.as_str()];
    let mut ranks = [rank(&run2, 0, None, &flags), rank(&run2, 1, None, &flags)];
    for (r, p) in ranks.iter_mut().enumerate() {
        let status = p.exit();
        assert!(status.success(), "rank {r} of the second run failed:\n{}{}", p.stdout(), p.stderr());
    }
    assert!(ranks[0].stdout().contains("model written to"), "{}", ranks[0].stdout());

    // SIGTERM ends the store cleanly; it served two rounds.
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    unsafe { libc::kill(store.child.id() as i32, libc::SIGTERM) };
    assert!(store.exit().success(), "{}", store.stderr());
    let log = store.stderr();
    assert_eq!(log.matches("a new round begins").count(), 2, "{log}");
    assert!(log.contains("lost rank 0"), "{log}");
}

/// A store process on a free loopback port, and its endpoint.
pub(super) fn store(dir: &Path) -> (Proc, String) {
    let endpoint = format!("127.0.0.1:{}", common::free_port());
    (store_at(dir, &endpoint, "store"), endpoint)
}

/// A standalone store listening on `endpoint` (a store started again where one ran), its output named `name`.
pub(super) fn store_at(dir: &Path, endpoint: &str, name: &str) -> Proc {
    let env = [("HYTRAIN_JOB_TOKEN", TOKEN.to_string()), ("HOSTNAME", "rdzv".to_string())];
    let mut store = Proc::spawn(common::command(&["rendezvous", "--listen", endpoint], &env), dir, name);
    store.wait_for("the store listening", |p| p.stderr().contains(&format!("listening on {endpoint}")));
    store
}

/// A process the platform starts directly on host `host` (no rank given), with `extra` flags.
fn node(dir: &Path, host: &str, extra: &[&str], env: &[(&str, String)]) -> Proc {
    let data = digits();
    let (model, output) = (dir.join(host).join("model"), dir.join(host).join("output"));
    let mut args = vec!["train", "--model", "mlp", "--data", data.to_str().unwrap(), "--batch-size", "32"];
    args.extend(["--validation", "none", "--checkpoint-dir", "none", "--epochs", "1", "--max-samples", "256"]);
    args.extend(["--model-dir", model.to_str().unwrap(), "--output-dir", output.to_str().unwrap()]);
    args.extend(extra);
    let mut vars =
        vec![("HOSTNAME", host.to_string()), ("HYTRAIN_JOB_TOKEN", TOKEN.into()), ("OMP_NUM_THREADS", "1".into())];
    vars.extend(env.iter().cloned());
    Proc::spawn(common::command(&args, &vars), dir, host)
}

#[test]
fn nodes_of_a_range_are_admitted_in_the_order_they_came_and_train_as_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, endpoint) = store(dir.path());
    let flags = ["--nnodes", "1:3", "--last-call-timeout", "3", "--rendezvous-endpoint", endpoint.as_str()];
    let mut nodes = [node(dir.path(), "node-a", &flags, &[]), node(dir.path(), "node-b", &flags, &[])];
    let mut ranks = Vec::new();
    for p in nodes.iter_mut() {
        let status = p.exit();
        let err = p.stderr();
        assert!(status.success(), "{}{err}", p.stdout());
        assert!(err.contains("admitted to the rendezvous"), "{err}");
        ranks.push(["rank 0/2 ", "rank 1/2 "].iter().position(|tag| err.contains(tag)).expect("a rank of 2"));
    }
    ranks.sort();
    assert_eq!(ranks, [0, 1], "the two nodes took one rank each");
    let exported = nodes.iter().filter(|p| p.stdout().contains("model written to")).count();
    assert_eq!(exported, 1, "only rank 0 writes the model");
}

#[test]
fn a_job_below_min_waits_out_the_rendezvous_timeout_and_names_how_many_nodes_came() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, endpoint) = store(dir.path());
    let flags = ["--nnodes", "2:3", "--rendezvous-endpoint", endpoint.as_str()];
    let mut alone = node(dir.path(), "node-a", &flags, &[("HYTRAIN_RENDEZVOUS_TIMEOUT", "2".into())]);
    assert!(!alone.exit().success());
    let err = alone.stderr();
    assert!(
        err.contains(&format!(
            "hytrain: error: this node was not admitted to the job: only 1 of the at least 2 nodes the job needs \
             (--nnodes 2:3) came to the rendezvous store at {endpoint} within 2 s; start more nodes or lower MIN"
        )),
        "{err}"
    );
}

#[test]
fn a_standalone_store_without_the_workers_token_or_run_id_refuses_to_start() {
    let out = common::run(&["rendezvous", "--listen", "127.0.0.1:0"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("hytrain: error: hytrain rendezvous cannot start: HYTRAIN_JOB_TOKEN is not set; the rendezvous store must hold the workers' job token"),
        "{err}"
    );
}

#[test]
fn bad_store_addresses_are_refused_naming_the_flag() {
    let out = common::run(&["rendezvous", "--listen", "nowhere"], &[("PET_RDZV_ID", "job".into())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("'nowhere' is not an address to listen on") && err.contains("expected HOST:PORT"), "{err}");
    let out = common::run(&["train", "--rendezvous-endpoint", "a:b:c", "--epochs", "1"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.starts_with("hytrain: error: --rendezvous-endpoint='a:b:c' is not a host name"), "{err}");
    let out = common::run(&["train", "--nnodes", "1:2", "--epochs", "1"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("hytrain: error: --nnodes=1:2: a range of nodes needs a standalone rendezvous store"),
        "{err}"
    );
}

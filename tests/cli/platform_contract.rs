//! Contract tests of the deployment artifacts in containers/: jobs shaped exactly like a SageMaker training job and
//! a Kubeflow PyTorchJob (and Trainer v2 TrainJob) run the real `hytrain` binary as separate processes, with the
//! files and environment each platform gives its containers, on the handwritten digits `cargo xtask test` packs.
//!
//! Each job runs in a network namespace of its own when the kernel allows one (root, or user namespaces), so the
//! platforms' fixed ports (23456 for the training operator, 29500 for hytrain on SageMaker and for Trainer v2) are
//! free whatever else runs on the machine; otherwise jobs take turns on the machine's loopback. Host names (algo-1,
//! <job>-master-0) reach loopback through `HYTRAIN_HOST_ALIASES`, the documented stand-in for the platforms' DNS.

use crate::common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(240);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The digits shards `cargo xtask test` writes (and names in HYTRAIN_DEMO_DATA).
fn digits() -> PathBuf {
    let path =
        std::env::var_os("HYTRAIN_DEMO_DATA").map(PathBuf::from).unwrap_or_else(|| repo().join(".cache/demo/digits"));
    assert!(
        path.join("train").is_dir() && path.join("test").is_dir(),
        "{} holds no digits shards: run the tests through `cargo xtask test`, which packs them",
        path.display()
    );
    path
}

/// Copies a folder tree, as SageMaker copies a File-mode channel's S3 prefix onto the instance.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(outputs: &[Output]) -> String {
    outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            format!("--- process {i} ({})\nstdout:\n{}\nstderr:\n{}", o.status, text(&o.stdout), text(&o.stderr))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------ network

/// Jobs on the machine's own loopback take turns: they all use the same fixed ports.
static HOST_LOOPBACK: Mutex<()> = Mutex::new(());

/// Where a job's processes talk to each other: a fresh network namespace (its own loopback, every port free),
/// held open by a sleeping process, or the machine's loopback, held exclusively.
enum JobNetwork {
    Namespace { holder: Child, ns: File },
    Host(#[allow(dead_code)] MutexGuard<'static, ()>),
}

/// Brings up `lo`, which a new network namespace has down. Runs between fork and exec: only syscalls.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain syscalls on a zeroed ifreq naming "lo"; the socket is closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req as *mut libc::ifreq);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req as *const libc::ifreq);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

impl JobNetwork {
    fn new() -> JobNetwork {
        let mut holder = Command::new("sleep");
        holder.arg("600").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: unshare, socket and ioctl only, in the child between fork and exec.
        unsafe {
            holder.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                loopback_up()
            });
        }
        match holder.spawn() {
            Ok(holder) => {
                let ns = File::open(format!("/proc/{}/ns/net", holder.id())).unwrap();
                JobNetwork::Namespace { holder, ns }
            }
            // No namespaces here (an unprivileged container): share the machine's loopback, one job at a time.
            Err(e) => {
                eprintln!("no network namespace for the job ({e}): using the machine's loopback, one job at a time");
                JobNetwork::Host(HOST_LOOPBACK.lock().unwrap_or_else(|e| e.into_inner()))
            }
        }
    }

    /// Makes `command` start inside this network.
    fn enter(&self, command: &mut Command) {
        if let JobNetwork::Namespace { ns, .. } = self {
            let fd = ns.as_raw_fd();
            // SAFETY: setns only, in the child between fork and exec; the descriptor stays open until drop.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
}

impl Drop for JobNetwork {
    fn drop(&mut self) {
        if let JobNetwork::Namespace { holder, .. } = self {
            let _ = holder.kill();
            let _ = holder.wait();
        }
    }
}

/// One process of a job: its arguments, its environment and its working directory.
type Process<'a> = (Vec<String>, Vec<(&'a str, String)>, Option<PathBuf>);

/// Starts one process per environment (the first one first), all in `net`, and waits for every one.
fn run_job(net: &JobNetwork, procs: Vec<Process>) -> Vec<Output> {
    let children: Vec<Child> = procs
        .iter()
        .map(|(args, env, cwd)| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut c = common::command(&args, env);
            if let Some(dir) = cwd {
                c.current_dir(dir);
            }
            net.enter(&mut c);
            c.spawn().unwrap()
        })
        .collect();
    children.into_iter().enumerate().map(|(i, c)| common::wait(c, LIMIT, &format!("job process {i}"))).collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ------------------------------------------------------------------------------------------------ outputs

/// The `key=value` metrics lines of a stdout (what SageMaker's metric regexes read).
fn metric_lines(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("epoch=")).collect()
}

/// A field of the final summary line (`steps=... val_accuracy=...`).
fn summary(stdout: &str, key: &str) -> f64 {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("steps="))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key} in {line}"))
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_model(dir: &Path) {
    for file in ["model.safetensors", "metadata.json"] {
        assert!(
            dir.join(file).is_file(),
            "{} has no {file}: {:?}",
            dir.display(),
            std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>())
        );
    }
}

fn has_checkpoint(dir: &Path) -> bool {
    matches!(hytrain::train::latest_valid(dir), Ok(Some(_)))
}

// ------------------------------------------------------------------------------------------------ SageMaker

const SM_HOSTS: [&str; 2] = ["algo-1", "algo-2"];

/// hyperparameters.json as the SageMaker Python SDK writes it: every value JSON-encoded into a string.
fn sdk_hyperparameters(hps: &Value) -> String {
    let encoded: serde_json::Map<String, Value> =
        hps.as_object().unwrap().iter().map(|(k, v)| (k.clone(), Value::String(v.to_string()))).collect();
    Value::Object(encoded).to_string()
}

/// One host's /opt/ml as SageMaker lays it out for a job with a File-mode channel `train` (a copy of the digits)
/// and a checkpoint configuration, with no training toolkit in the image.
fn sagemaker_host(root: &Path, host: &str, hyperparameters: &Value) {
    let hosts = json!(SM_HOSTS);
    let config = root.join("input/config");
    common::write(
        &config.join("resourceconfig.json"),
        &json!({
            "current_host": host,
            "current_instance_type": "ml.c5.xlarge",
            "current_group_name": "homogeneousCluster",
            "hosts": hosts,
            "instance_groups": [{
                "instance_group_name": "homogeneousCluster",
                "instance_type": "ml.c5.xlarge",
                "hosts": hosts,
            }],
            "network_interface_name": "eth0",
        })
        .to_string(),
    );
    common::write(
        &config.join("inputdataconfig.json"),
        &json!({"train": {
            "TrainingInputMode": "File",
            "S3DistributionType": "FullyReplicated",
            "RecordWrapperType": "None",
        }})
        .to_string(),
    );
    common::write(&config.join("hyperparameters.json"), &sdk_hyperparameters(hyperparameters));
    common::write(
        &config.join("checkpointconfig.json"),
        &json!({
            "LocalPath": root.join("checkpoints"),
            "S3Uri": "s3://hytrain-contract/checkpoints/job",
        })
        .to_string(),
    );
    copy_tree(&digits(), &root.join("input/data/train"));
    for dir in ["model", "output/data", "checkpoints"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
}

/// `docker run IMAGE train` on every host: the image's ENTRYPOINT is `hytrain`, so each container runs `hytrain
/// train` with the platform's variables and nothing else (no SM_*, no MASTER_*).
fn sagemaker_job(roots: &[PathBuf]) -> Vec<Output> {
    let net = JobNetwork::new();
    let procs = roots
        .iter()
        .map(|root| {
            let env = vec![
                ("HYTRAIN_SM_ROOT", root.display().to_string()),
                ("HYTRAIN_HOST_ALIASES", "algo-1=127.0.0.1,algo-2=127.0.0.1".to_string()),
                ("TRAINING_JOB_NAME", "hytrain-contract".to_string()),
                (
                    "TRAINING_JOB_ARN",
                    "arn:aws:sagemaker:us-west-2:111122223333:training-job/hytrain-contract".to_string(),
                ),
                ("OMP_NUM_THREADS", "1".to_string()),
            ];
            (strings(&["train"]), env, Some(root.clone()))
        })
        .collect();
    run_job(&net, procs)
}

fn sagemaker_roots(dir: &Path, hyperparameters: &Value) -> Vec<PathBuf> {
    SM_HOSTS
        .iter()
        .map(|host| {
            let root = dir.join(host).join("opt/ml");
            sagemaker_host(&root, host, hyperparameters);
            root
        })
        .collect()
}

/// containers/sagemaker/metric_definitions.json, the definitions the launcher hands SageMaker.
fn metric_definitions() -> Vec<(String, regex::Regex)> {
    let path = repo().join("containers/sagemaker/metric_definitions.json");
    let defs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    defs.iter()
        .map(|d| {
            let name = d["Name"].as_str().unwrap().to_string();
            let re = regex::Regex::new(d["Regex"].as_str().unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(re.captures_len(), 2, "{name}: SageMaker takes exactly one capture group");
            (name, re)
        })
        .collect()
}

/// Every metric definition charts a value hytrain recorded: on each metrics line of rank 0's stdout a regex that
/// matches captures one whole `key=value` field, equal to that line's record in metrics.jsonl; every definition
/// matches some line, every numeric field hytrain records is charted by some definition, and no other rank's
/// output matches at all (SageMaker reads every host's log).
fn assert_metric_definitions_chart_the_run(rank0_stdout: &str, others: &[&str], metrics: &[Value]) {
    let defs = metric_definitions();
    let lines = metric_lines(rank0_stdout);
    assert_eq!(lines.len(), metrics.len(), "stdout metrics lines and metrics.jsonl records differ:\n{rank0_stdout}");
    let mut matched = vec![0usize; defs.len()];
    let mut charted = std::collections::BTreeSet::new();
    for (line, record) in lines.iter().zip(metrics) {
        for (i, (name, re)) in defs.iter().enumerate() {
            let Some(caps) = re.captures(line) else {
                continue;
            };
            let value = caps.get(1).unwrap();
            let key_start = line[..value.start()].rfind(' ').map_or(0, |p| p + 1);
            let key = line[key_start..value.start()]
                .strip_suffix('=')
                .unwrap_or_else(|| panic!("{name} captured {:?}, not a whole field value, in {line}", value.as_str()));
            let field_end = line[value.start()..].find(' ').map_or(line.len(), |p| value.start() + p);
            assert_eq!(value.end(), field_end, "{name} captured part of {key}'s value in {line}");
            let number: f64 = value.as_str().parse().unwrap_or_else(|_| panic!("{name}: {value:?}"));
            let recorded = record[key].as_f64().unwrap_or_else(|| panic!("{key} not in {record}"));
            // The line shows the recorded value rounded to the digits it prints (samples_per_sec to 0.1, losses to
            // 1e-4): they agree within half a unit of the last digit shown.
            let decimals = value.as_str().split_once('.').map_or(0, |(_, f)| f.len());
            let half_unit = 0.5 * 10f64.powi(-(decimals as i32));
            assert!(
                (number - recorded).abs() <= half_unit * (1.0 + 1e-9) + 1e-12 * recorded.abs(),
                "{name} charts {number} where metrics.jsonl has {key}={recorded}"
            );
            matched[i] += 1;
            charted.insert(key.to_string());
        }
    }
    for ((name, _), n) in defs.iter().zip(&matched) {
        assert!(*n > 0, "metric definition {name} matches no line of:\n{rank0_stdout}");
    }
    for record in metrics {
        for (key, v) in record.as_object().unwrap() {
            if v.is_number() {
                assert!(charted.contains(key), "no metric definition charts {key}");
            }
        }
    }
    for other in others {
        for (name, re) in &defs {
            assert!(other.lines().all(|l| !re.is_match(l)), "{name} matches a line of another rank's output:\n{other}");
        }
    }
}

#[test]
fn sagemaker_two_host_job_trains_exports_from_algo1_and_its_metric_definitions_chart_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // The SDK's json.dumps of each value: "\"mlp\"", "\"15\"" for the string "15", "0.1" for the number 0.1.
    let roots = sagemaker_roots(
        dir.path(),
        &json!({
            "model": "mlp",
            "epochs": "15",
            "batch-size": 32,
            "lr": 0.1,
            "momentum": 0.9,
            "seed": 3,
            "log-interval": 5,
        }),
    );
    let outputs = sagemaker_job(&roots);
    for out in &outputs {
        assert!(out.status.success(), "{}", show(&outputs));
    }
    let (algo1, algo2) = (&roots[0], &roots[1]);

    // algo-1 is global rank 0: the model, the checkpoints (checkpointconfig.json's LocalPath) and metrics.jsonl
    // (output/data, uploaded as output.tar.gz) are there; algo-2 writes none of them.
    assert_model(&algo1.join("model"));
    assert!(has_checkpoint(&algo1.join("checkpoints")), "no checkpoint on algo-1");
    assert!(!algo2.join("model/model.safetensors").exists(), "algo-2 exported a model too");
    assert!(!has_checkpoint(&algo2.join("checkpoints")), "algo-2 wrote checkpoints");
    for root in &roots {
        assert!(!root.join("output/failure").exists(), "a successful job left a failure file");
        assert!(root.join("output/success").is_file(), "a host that finished wrote no success file");
    }
    let stdout1 = text(&outputs[0].stdout);
    assert!(stdout1.contains(&format!("model written to {}", algo1.join("model").display())), "{stdout1}");
    assert!(summary(&stdout1, "val_accuracy") >= 0.9, "the job did not learn the digits:\n{stdout1}");
    // 15 epochs came from hyperparameters.json's "\"15\"", decoded.
    let metrics = jsonl(&algo1.join("output/data/metrics.jsonl"));
    assert_eq!(metrics.last().unwrap()["epoch"], 15, "{:?}", metrics.last());
    assert!(!algo2.join("output/data/metrics.jsonl").exists());

    let stdout2 = text(&outputs[1].stdout);
    let stderr: Vec<String> = outputs.iter().map(|o| text(&o.stderr)).collect();
    assert_metric_definitions_chart_the_run(&stdout1, &[stdout2.as_str(), stderr[1].as_str()], &metrics);
}

#[test]
fn sagemaker_bad_hyperparameter_fails_every_host_with_the_reason_in_its_failure_file() {
    let dir = tempfile::tempdir().unwrap();
    let roots = sagemaker_roots(dir.path(), &json!({"model": "mlp", "epochs": 1, "lr": "fast"}));
    let outputs = sagemaker_job(&roots);
    for (root, out) in roots.iter().zip(&outputs) {
        assert!(!out.status.success(), "{}", show(&outputs));
        let failure = std::fs::read_to_string(root.join("output/failure"))
            .unwrap_or_else(|e| panic!("no failure file under {}: {e}\n{}", root.display(), show(&outputs)));
        assert!(!root.join("output/success").exists(), "a failed host wrote a success file");
        assert!(
            failure.contains("lr") && failure.contains("'fast'"),
            "the failure file does not say what was wrong: {failure}"
        );
        assert!(!text(&out.stderr).contains("panicked"), "{}", show(&outputs));
        assert!(!root.join("model/model.safetensors").exists());
    }

    // A hyperparameter hytrain does not know (a typo) is a failure too, named in FailureReason.
    let dir = tempfile::tempdir().unwrap();
    let roots = sagemaker_roots(dir.path(), &json!({"model": "mlp", "epoch": 3}));
    let outputs = sagemaker_job(&roots);
    for (root, out) in roots.iter().zip(&outputs) {
        assert!(!out.status.success(), "{}", show(&outputs));
        let failure = std::fs::read_to_string(root.join("output/failure")).unwrap();
        assert!(failure.contains("'epoch'"), "{failure}");
    }
}

#[test]
fn sagemaker_configuration_that_cannot_be_read_is_reported_in_the_failure_file() {
    // Detection itself fails here, before any plan exists; SageMaker must still show why, not a bare
    // "AlgorithmError".
    let dir = tempfile::tempdir().unwrap();
    let roots = sagemaker_roots(dir.path(), &json!({"model": "mlp", "epochs": 1}));
    for root in &roots {
        std::fs::write(root.join("input/config/hyperparameters.json"), "{\"epochs\": \"1\"").unwrap();
    }
    let outputs = sagemaker_job(&roots);
    for (root, out) in roots.iter().zip(&outputs) {
        assert!(!out.status.success(), "{}", show(&outputs));
        let failure = std::fs::read_to_string(root.join("output/failure"))
            .unwrap_or_else(|e| panic!("no failure file under {}: {e}\n{}", root.display(), show(&outputs)));
        assert!(
            failure.contains("hyperparameters.json"),
            "the failure file does not name the file that was wrong: {failure}"
        );
        assert_eq!(
            failure.trim(),
            text(&out.stderr).lines().find(|l| l.starts_with("hytrain: error:")).unwrap()["hytrain: error: ".len()..]
                .trim(),
            "the failure file and the printed error differ"
        );
    }
}

// ------------------------------------------------------------------------------------------------ Kubeflow

/// The training operator's (release 1.9) port for a PyTorchJob whose container names no pytorchjob-port.
const OPERATOR_PORT: u16 = 23456;

/// A pod of a PyTorchJob with a Master and `workers` Workers, with exactly the variables training-operator 1.9
/// injects (envvar.go, master.go) plus what kubelet sets (HOSTNAME, the API service).
fn pytorchjob_pod(
    job: &str,
    index: usize,
    workers: usize,
    nproc_per_node: Option<usize>,
) -> Vec<(&'static str, String)> {
    let pods = 1 + workers;
    let master = format!("{job}-master-0");
    let hostname = if index == 0 { master.clone() } else { format!("{job}-worker-{}", index - 1) };
    let mut env = vec![
        ("PYTHONUNBUFFERED", "1".to_string()),
        ("MASTER_PORT", OPERATOR_PORT.to_string()),
        ("PET_MASTER_PORT", OPERATOR_PORT.to_string()),
        ("MASTER_ADDR", master.clone()),
        ("PET_MASTER_ADDR", master.clone()),
        ("WORLD_SIZE", (pods * nproc_per_node.unwrap_or(1)).to_string()),
        ("RANK", index.to_string()),
        ("PET_NODE_RANK", index.to_string()),
    ];
    if let Some(n) = nproc_per_node {
        env.push(("PET_NPROC_PER_NODE", n.to_string()));
    }
    env.extend([
        ("PET_NNODES", pods.to_string()),
        ("HOSTNAME", hostname),
        ("KUBERNETES_SERVICE_HOST", "10.100.0.1".to_string()),
        ("KUBERNETES_SERVICE_PORT", "443".to_string()),
        ("HYTRAIN_HOST_ALIASES", format!("{master}=127.0.0.1")),
        ("OMP_NUM_THREADS", "1".to_string()),
    ]);
    env
}

/// The container command of containers/kubeflow's jobs, with the EFS claim at `efs`.
fn efs_train_args(efs: &Path, job: &str) -> Vec<String> {
    let shared = efs.join("hytrain").join(job);
    vec![
        "--model=mlp".into(),
        format!("--data={}", efs.join("digits-dataset").display()),
        "--epochs=8".into(),
        "--seed=7".into(),
        "--log-interval=10".into(),
        "--batch-size=32".into(),
        "--lr=0.1".into(),
        "--momentum=0.9".into(),
        format!("--checkpoint-dir={}", shared.join("checkpoints").display()),
        format!("--model-dir={}", shared.join("model").display()),
        format!("--output-dir={}", shared.join("output").display()),
    ]
}

fn efs_volume(dir: &Path) -> PathBuf {
    let efs = dir.join("efs-sc-claim");
    copy_tree(&digits(), &efs.join("digits-dataset"));
    efs
}

/// Checks the outputs of a job that wrote to the EFS claim under hytrain/<job>, with `world` ranks in all.
fn assert_efs_job(outputs: &[Output], efs: &Path, job: &str, world: usize) {
    for out in outputs {
        assert!(out.status.success(), "{}", show(outputs));
    }
    let shared = efs.join("hytrain").join(job);
    assert_model(&shared.join("model"));
    assert!(has_checkpoint(&shared.join("checkpoints")), "no checkpoint on the claim");
    let metrics = jsonl(&shared.join("output/metrics.jsonl"));
    assert!(metrics.iter().any(|m| m.get("val_accuracy").is_some()));
    // Exactly one process, global rank 0 in the master pod, prints the metrics and the summary.
    let master = text(&outputs[0].stdout);
    assert!(summary(&master, "val_accuracy") >= 0.8, "{master}");
    assert_eq!(metric_lines(&master).len(), metrics.len());
    for out in &outputs[1..] {
        assert!(metric_lines(&text(&out.stdout)).is_empty(), "{}", show(outputs));
    }
    let stderr = text(&outputs[0].stderr);
    assert!(stderr.contains(&format!("world_size={world}")), "rank 0 did not train with {world} ranks:\n{stderr}");
}

#[test]
fn kubeflow_pytorchjob_master_and_two_workers_train_on_the_shared_efs_claim() {
    let dir = tempfile::tempdir().unwrap();
    let efs = efs_volume(dir.path());
    let job = "hytrain-cifar10";
    let net = JobNetwork::new();
    let procs = (0..3)
        .map(|i| {
            let mut args = strings(&["train"]);
            args.extend(efs_train_args(&efs, job));
            (args, pytorchjob_pod(job, i, 2, None), None)
        })
        .collect();
    let outputs = run_job(&net, procs);
    assert_efs_job(&outputs, &efs, job, 3);
}

#[test]
fn kubeflow_pytorchjob_with_nproc_per_node_2_runs_six_ranks_through_hytrain_launch() {
    // nprocPerNode "2": WORLD_SIZE=6 counts processes while RANK is the pod index; the pod command is
    // `hytrain launch --nproc-per-node auto -- hytrain train ...` (containers/kubeflow/pytorchjob-gpu-*.yaml).
    let dir = tempfile::tempdir().unwrap();
    let efs = efs_volume(dir.path());
    let job = "hytrain-cifar10-gpu";
    let net = JobNetwork::new();
    let procs = (0..3)
        .map(|i| {
            let mut args = strings(&["launch", "--nproc-per-node", "auto", "--", common::hytrain(), "train"]);
            args.extend(efs_train_args(&efs, job));
            (args, pytorchjob_pod(job, i, 2, Some(2)), None)
        })
        .collect();
    let outputs = run_job(&net, procs);
    assert_efs_job(&outputs, &efs, job, 6);
}

#[test]
fn kubeflow_trainjob_three_nodes_train_through_hytrain_launch() {
    // Trainer v2's torch plugin sets only PET_* (no RANK, WORLD_SIZE or MASTER_ADDR), the master is
    // <trainjob>-node-0-0.<trainjob>:29500, and containers/kubeflow/trainjob.yaml runs `hytrain launch`.
    let dir = tempfile::tempdir().unwrap();
    let efs = efs_volume(dir.path());
    let job = "hytrain-cifar10-v2";
    let master = format!("{job}-node-0-0.{job}");
    let net = JobNetwork::new();
    let procs = (0..3)
        .map(|i| {
            let mut args = strings(&["launch", "--nproc-per-node", "auto", "--", common::hytrain(), "train"]);
            args.extend(efs_train_args(&efs, job));
            let env = vec![
                ("PET_NNODES", "3".to_string()),
                ("PET_NPROC_PER_NODE", "1".to_string()),
                ("PET_NODE_RANK", i.to_string()),
                ("PET_MASTER_ADDR", master.clone()),
                ("PET_MASTER_PORT", "29500".to_string()),
                ("HOSTNAME", format!("{job}-node-0-{i}")),
                ("KUBERNETES_SERVICE_HOST", "10.100.0.1".to_string()),
                ("KUBERNETES_SERVICE_PORT", "443".to_string()),
                ("HYTRAIN_HOST_ALIASES", format!("{master}=127.0.0.1")),
                ("OMP_NUM_THREADS", "1".to_string()),
            ];
            (args, env, None)
        })
        .collect();
    let outputs = run_job(&net, procs);
    assert_efs_job(&outputs, &efs, job, 3);
}

/// The Dockerfile passes hadolint, installed by `cargo xtask test` into the test venv beside its Python.
#[test]
fn the_dockerfile_passes_hadolint() {
    let python = std::env::var_os("HYTRAIN_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/bench-venv/bin/python"));
    let hadolint = python.with_file_name("hadolint");
    assert!(hadolint.is_file(), "{} is missing: run the tests through `cargo xtask test`", hadolint.display());
    let dockerfile = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("containers/Dockerfile");
    let out = std::process::Command::new(&hadolint).arg(&dockerfile).output().unwrap();
    assert!(
        out.status.success(),
        "hadolint found problems in {}:\n{}{}",
        dockerfile.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A Dockerfile with a known problem is reported, so a pass above means something.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(&bad, "FROM ubuntu\nRUN cd /tmp && apt-get install curl\n").unwrap();
    let out = std::process::Command::new(&hadolint).arg(&bad).output().unwrap();
    assert!(!out.status.success(), "hadolint passed a Dockerfile with known problems");
}

//! `hytrain explain --json` run as a real process under every launcher shape of platform-contract.md, and its
//! refusal of inconsistent input.

use crate::common;

use common::{json, run, sagemaker_tree};
use serde_json::Value;

fn explain(env: &[(&str, String)]) -> Value {
    json(&run(&["explain", "--json"], env))
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn topo(plan: &Value, field: &str) -> Value {
    plan["topology"][field].clone()
}

#[test]
fn kubeflow_v1_worker_pod_gets_its_pod_index_as_rank() {
    // What the training operator injects into worker-1 of a Master x1 + Worker x2 PyTorchJob.
    let plan = explain(&[
        ("PYTHONUNBUFFERED", s("1")),
        ("MASTER_ADDR", s("cifar-master-0")),
        ("PET_MASTER_ADDR", s("cifar-master-0")),
        ("MASTER_PORT", s("23456")),
        ("PET_MASTER_PORT", s("23456")),
        ("WORLD_SIZE", s("3")),
        ("RANK", s("2")),
        ("PET_NODE_RANK", s("2")),
        ("PET_NNODES", s("3")),
    ]);
    assert_eq!(plan["platform"], "kubeflow-pytorchjob");
    assert_eq!(topo(&plan, "rank"), 2);
    assert_eq!(topo(&plan, "world_size"), 3);
    assert_eq!(topo(&plan, "node_rank"), 2);
    assert_eq!(topo(&plan, "master_addr"), "cifar-master-0");
    assert_eq!(topo(&plan, "master_port"), 23456);
}

#[test]
fn kubeflow_v1_nproc_per_node_children_get_global_ranks() {
    // nprocPerNode=2, 2 pods: WORLD_SIZE counts processes (4) while RANK is the pod index. Under
    // `hytrain launch` the second pod's children must be ranks 2 and 3, not 1 and 2.
    let out = run(
        &["launch", "--nproc-per-node", "2", "--", common::hytrain(), "explain", "--json"],
        &[
            ("MASTER_ADDR", s("127.0.0.1")),
            ("PET_MASTER_ADDR", s("127.0.0.1")),
            ("MASTER_PORT", s("23456")),
            ("PET_MASTER_PORT", s("23456")),
            ("WORLD_SIZE", s("4")),
            ("RANK", s("1")),
            ("PET_NODE_RANK", s("1")),
            ("PET_NNODES", s("2")),
            ("PET_NPROC_PER_NODE", s("2")),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut ranks: Vec<(u64, u64, u64)> = serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(|p| {
            let p = p.unwrap();
            assert_eq!(p["platform"], "kubeflow-pytorchjob");
            assert_eq!(p["launcher"], "hytrain-launch");
            assert_eq!(topo(&p, "world_size"), 4);
            (
                topo(&p, "rank").as_u64().unwrap(),
                topo(&p, "local_rank").as_u64().unwrap(),
                topo(&p, "node_rank").as_u64().unwrap(),
            )
        })
        .collect();
    ranks.sort();
    assert_eq!(ranks, vec![(2, 0, 1), (3, 1, 1)]);
}

#[test]
fn trainer_v2_pet_variables_alone_define_the_node() {
    let plan = explain(&[
        ("PET_NNODES", s("4")),
        ("PET_NPROC_PER_NODE", s("1")),
        ("PET_NODE_RANK", s("3")),
        ("PET_MASTER_ADDR", s("job-node-0-0.job")),
        ("PET_MASTER_PORT", s("29500")),
    ]);
    assert_eq!(plan["platform"], "kubeflow-trainjob");
    assert_eq!(topo(&plan, "rank"), 3);
    assert_eq!(topo(&plan, "world_size"), 4);
    assert_eq!(topo(&plan, "nnodes"), 4);
    assert_eq!(topo(&plan, "master_addr"), "job-node-0-0.job");
}

#[test]
fn torchrun_child_trusts_global_rank() {
    let plan = explain(&[
        ("RANK", s("5")),
        ("LOCAL_RANK", s("1")),
        ("GROUP_RANK", s("2")),
        ("LOCAL_WORLD_SIZE", s("2")),
        ("WORLD_SIZE", s("8")),
        ("GROUP_WORLD_SIZE", s("4")),
        ("MASTER_ADDR", s("10.0.0.7")),
        ("MASTER_PORT", s("29500")),
        ("TORCHELASTIC_RUN_ID", s("job-42")),
    ]);
    assert_eq!(plan["platform"], "torchrun");
    assert_eq!(plan["launcher"], "torchrun");
    assert_eq!(topo(&plan, "rank"), 5);
    assert_eq!(topo(&plan, "local_rank"), 1);
    assert_eq!(topo(&plan, "node_rank"), 2);
    assert_eq!(topo(&plan, "nnodes"), 4);
}

#[test]
fn mpirun_ranks_come_from_open_mpi() {
    let plan = explain(&[
        ("OMPI_COMM_WORLD_RANK", s("3")),
        ("OMPI_COMM_WORLD_SIZE", s("4")),
        ("OMPI_COMM_WORLD_LOCAL_RANK", s("1")),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", s("2")),
    ]);
    assert_eq!(plan["launcher"], "mpirun");
    assert_eq!(topo(&plan, "rank"), 3);
    assert_eq!(topo(&plan, "world_size"), 4);
    assert_eq!(topo(&plan, "local_rank"), 1);
    assert_eq!(topo(&plan, "local_world_size"), 2);
}

#[test]
fn sagemaker_without_toolkit_sorts_hosts_as_strings_and_decodes_hyperparameters() {
    let dir = tempfile::tempdir().unwrap();
    let hosts: Vec<String> = (1..=10).map(|i| format!("algo-{i}")).collect();
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    sagemaker_tree(
        dir.path(),
        "algo-2",
        &hosts,
        r#"{"epochs":"10","lr":"0.01","sagemaker_program":"\"train.py\"","backend":"\"gloo\""}"#,
    );
    let plan = explain(&[("HYTRAIN_SM_ROOT", dir.path().display().to_string())]);
    assert_eq!(plan["platform"], "sagemaker");
    // algo-1, algo-10, algo-2, ...: SageMaker's own (lexicographic) order.
    assert_eq!(topo(&plan, "hosts")[1], "algo-10");
    assert_eq!(topo(&plan, "rank"), 2);
    assert_eq!(topo(&plan, "world_size"), 10);
    assert_eq!(topo(&plan, "master_addr"), "algo-1");
    let port = topo(&plan, "master_port").as_u64().unwrap();
    assert!(port != 7777 && port != 7592, "port {port} is taken by SageMaker's toolkits");
    assert_eq!(plan["hyperparameters"]["epochs"], "10");
    assert_eq!(plan["hyperparameters"]["backend"], "gloo");
    assert_eq!(plan["paths"]["model_dir"], dir.path().join("model").display().to_string());
    assert_eq!(
        plan["paths"]["channels"]["training"]["path"],
        dir.path().join("input/data/training").display().to_string()
    );
}

#[test]
fn sagemaker_toolkit_env_is_used_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let plan = explain(&[
        ("HYTRAIN_SM_ROOT", dir.path().display().to_string()),
        ("SM_HOSTS", s(r#"["algo-2","algo-1"]"#)),
        ("SM_CURRENT_HOST", s("algo-2")),
        ("SM_MODEL_DIR", s("/opt/ml/model")),
        ("SM_CHANNELS", s(r#"["training"]"#)),
        ("SM_CHANNEL_TRAINING", s("/opt/ml/input/data/training")),
        ("SM_HPS", s(r#"{"epochs": 3}"#)),
        ("SM_NETWORK_INTERFACE_NAME", s("eth0")),
    ]);
    assert_eq!(plan["platform"], "sagemaker");
    assert_eq!(topo(&plan, "rank"), 1);
    assert_eq!(topo(&plan, "master_addr"), "algo-1");
    assert_eq!(plan["paths"]["model_dir"], "/opt/ml/model");
    assert_eq!(plan["hyperparameters"]["epochs"], "3");
}

#[test]
fn the_collective_backend_a_job_names_is_shown_with_what_hytrain_uses() {
    let plan = explain(&[("HYTRAIN_BACKEND", s("GLOO"))]);
    assert_eq!(plan["backend"]["requested"], "gloo");
    assert_eq!(plan["backend"]["from"], "HYTRAIN_BACKEND");
    assert!(plan["backend"]["uses"].as_str().unwrap().contains("ring"), "{plan}");
    let out = run(&["explain"], &[("HYTRAIN_BACKEND", s("gloo"))]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("backend") && text.contains("gloo"), "{text}");
}

#[test]
fn nothing_detected_is_a_single_local_process() {
    let plan = explain(&[]);
    assert_eq!(plan["platform"], "local");
    assert_eq!(topo(&plan, "rank"), 0);
    assert_eq!(topo(&plan, "world_size"), 1);
}

#[test]
fn text_output_names_platform_and_rank() {
    let out = run(
        &["explain"],
        &[
            ("RANK", s("1")),
            ("WORLD_SIZE", s("2")),
            ("LOCAL_RANK", s("1")),
            ("LOCAL_WORLD_SIZE", s("2")),
            ("TORCHELASTIC_RUN_ID", s("x")),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("torchrun"), "{text}");
    assert!(text.contains("rank"), "{text}");
}

/// Runs explain with bad input and returns its stderr after checking it failed cleanly.
fn refused(env: &[(&str, String)]) -> String {
    let out = run(&["explain", "--json"], env);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "accepted bad input; stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(stderr.starts_with("hytrain: error: "), "{stderr}");
    assert!(out.stdout.is_empty());
    stderr
}

#[test]
fn rank_not_below_world_size_is_refused() {
    let e =
        refused(&[("RANK", s("4")), ("WORLD_SIZE", s("4")), ("LOCAL_RANK", s("0")), ("TORCHELASTIC_RUN_ID", s("x"))]);
    assert!(e.contains("RANK") && e.contains("WORLD_SIZE"), "{e}");
}

#[test]
fn sm_hosts_that_is_not_a_json_list_is_refused() {
    let e = refused(&[("SM_HOSTS", s("algo-1,algo-2")), ("SM_CURRENT_HOST", s("algo-1"))]);
    assert!(e.contains("SM_HOSTS") && e.contains("JSON"), "{e}");
}

#[test]
fn current_host_missing_from_hosts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    sagemaker_tree(dir.path(), "algo-3", &["algo-1", "algo-2"], "{}");
    let e = refused(&[("HYTRAIN_SM_ROOT", dir.path().display().to_string())]);
    assert!(e.contains("algo-3") && e.contains("resourceconfig.json"), "{e}");
}

#[test]
fn port_that_is_not_a_number_is_refused() {
    let e = refused(&[("RANK", s("0")), ("WORLD_SIZE", s("2")), ("MASTER_ADDR", s("m")), ("MASTER_PORT", s("http"))]);
    assert!(e.contains("MASTER_PORT"), "{e}");
}

#[test]
fn malformed_json_file_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    sagemaker_tree(dir.path(), "algo-1", &["algo-1"], "{\"epochs\": ");
    let e = refused(&[("HYTRAIN_SM_ROOT", dir.path().display().to_string())]);
    assert!(e.contains("hyperparameters.json"), "{e}");
}

#[test]
fn a_reader_that_went_away_ends_the_output_quietly_as_for_any_unix_tool() {
    // `hytrain explain | head -1`: the reader closes its end before hytrain writes (here before it even starts).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    for args in [&["explain"][..], &["explain", "--json"]] {
        let out = common::command(args, &[]).stdout(writer.try_clone().unwrap()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?} failed ({}): {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

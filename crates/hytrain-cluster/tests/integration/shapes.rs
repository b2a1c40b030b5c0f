//! Every launcher shape of platform-contract.md, as the launcher really sets it up, through `detect_from`.

use crate::common;

use common::{child_env, env, plan, resource_config, SmTree};
use hytrain_cluster::{
    Distribution, InputMode, Launcher, Platform, S3Distribution, Topology, SAGEMAKER_DEFAULT_MASTER_PORT,
};

/// A v1 PyTorchJob pod's environment as training-operator 1.9 sets it (with a Master replica).
fn kubeflow_v1_pod(
    job: &str,
    replica: &str,
    index: usize,
    rank: usize,
    pods: usize,
    nproc: &str,
) -> Vec<(String, String)> {
    let nproc_int: usize = nproc.parse().unwrap_or(1);
    vec![
        ("PYTHONUNBUFFERED".into(), "0".into()),
        ("MASTER_PORT".into(), "23456".into()),
        ("PET_MASTER_PORT".into(), "23456".into()),
        ("MASTER_ADDR".into(), format!("{job}-master-0")),
        ("PET_MASTER_ADDR".into(), format!("{job}-master-0")),
        ("WORLD_SIZE".into(), (pods * nproc_int).to_string()),
        ("RANK".into(), rank.to_string()),
        ("PET_NPROC_PER_NODE".into(), nproc.into()),
        ("PET_NODE_RANK".into(), rank.to_string()),
        ("PET_NNODES".into(), pods.to_string()),
        ("HOSTNAME".into(), format!("{job}-{replica}-{index}")),
    ]
}

fn env_of(pairs: &[(String, String)]) -> hytrain_cluster::Env {
    let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env(&borrowed)
}

/// The variables torchrun sets for one worker.
fn torchrun_worker(
    rank: usize,
    local_rank: usize,
    world: usize,
    local_world: usize,
    master: &str,
    port: u16,
) -> Vec<(String, String)> {
    let group_rank = rank / local_world;
    [
        ("RANK", rank.to_string()),
        ("LOCAL_RANK", local_rank.to_string()),
        ("GROUP_RANK", group_rank.to_string()),
        ("ROLE_RANK", rank.to_string()),
        ("ROLE_NAME", "default".into()),
        ("LOCAL_WORLD_SIZE", local_world.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("GROUP_WORLD_SIZE", (world / local_world).to_string()),
        ("ROLE_WORLD_SIZE", world.to_string()),
        ("MASTER_ADDR", master.into()),
        ("MASTER_PORT", port.to_string()),
        ("TORCHELASTIC_RESTART_COUNT", "0".into()),
        ("TORCHELASTIC_MAX_RESTARTS", "0".into()),
        ("TORCHELASTIC_RUN_ID", "none".into()),
        ("TORCHELASTIC_USE_AGENT_STORE", "True".into()),
        ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn ranks(t: &Topology) -> (usize, usize, usize, usize, usize, usize) {
    (t.rank, t.world_size, t.local_rank, t.local_world_size, t.node_rank, t.nnodes)
}

// ---------------------------------------------------------------- Kubeflow PyTorchJob v1

#[test]
fn kubeflow_v1_master_and_two_workers_get_the_pod_index_as_rank() {
    for (replica, index, rank) in [("master", 0, 0), ("worker", 0, 1), ("worker", 1, 2)] {
        let p = plan(&env_of(&kubeflow_v1_pod("cifar", replica, index, rank, 3, "auto")));
        assert_eq!(p.platform, Platform::KubeflowPytorchjob);
        assert_eq!(p.launcher, Launcher::None);
        assert_eq!(ranks(&p.topology), (rank, 3, 0, 1, rank, 3), "{replica}-{index}");
        assert_eq!(p.topology.master_addr, "cifar-master-0");
        assert_eq!(p.topology.master_port, 23456);
        assert_eq!(p.topology.current_host, format!("cifar-{replica}-{index}"));
        assert_eq!(p.nproc_per_node_hint(), None, "auto asks for no particular count");
        assert!(p.sagemaker.is_none() && p.hyperparameters.is_empty() && p.paths.channels.is_empty());
    }
}

#[test]
fn kubeflow_v1_nproc2_lone_process_reads_rank_as_node_rank_and_asks_for_hytrain_launch() {
    // Worker 0 of a Master + 1 Worker job with nprocPerNode 2: RANK=1 is the pod, WORLD_SIZE=4 counts processes.
    let p = plan(&env_of(&kubeflow_v1_pod("big", "worker", 0, 1, 2, "2")));
    assert_eq!(p.platform, Platform::KubeflowPytorchjob);
    assert_eq!(ranks(&p.topology), (2, 4, 0, 2, 1, 2));
    assert_eq!(p.nproc_per_node_hint(), Some(2));
    assert!(p.notes.iter().any(|n| n.contains("hytrain launch")), "{:?}", p.notes);
}

#[test]
fn kubeflow_v1_nproc2_hytrain_launch_children_get_global_ranks() {
    let pod = env_of(&kubeflow_v1_pod("big", "worker", 0, 1, 2, "2"));
    for local_rank in 0..2 {
        let p = plan(&child_env(&pod, 2, local_rank));
        assert_eq!(p.platform, Platform::KubeflowPytorchjob);
        assert_eq!(p.launcher, Launcher::HytrainLaunch);
        assert_eq!(ranks(&p.topology), (2 + local_rank, 4, local_rank, 2, 1, 2));
        assert_eq!((p.topology.master_addr.as_str(), p.topology.master_port), ("big-master-0", 23456));
    }
}

#[test]
fn kubeflow_v1_nproc2_torchrun_children_get_global_ranks() {
    let mut vars = kubeflow_v1_pod("big", "worker", 0, 1, 2, "2");
    // torchrun overwrites RANK, WORLD_SIZE and MASTER_* for its workers; PET_* stay.
    vars.extend(torchrun_worker(3, 1, 4, 2, "big-master-0", 23456));
    let p = plan(&env_of(&vars));
    assert_eq!(p.platform, Platform::KubeflowPytorchjob);
    assert_eq!(p.launcher, Launcher::Torchrun);
    assert_eq!(ranks(&p.topology), (3, 4, 1, 2, 1, 2));
}

#[test]
fn kubeflow_v1_elastic_torchrun_child_is_a_pytorchjob_with_torchrun_ranks() {
    let mut vars: Vec<(String, String)> = [
        ("PYTHONUNBUFFERED", "0"),
        ("PET_RDZV_ENDPOINT", "elastic-worker-0:23456"),
        ("PET_RDZV_BACKEND", "c10d"),
        ("PET_NNODES", "1:4"),
        ("PET_MAX_RESTARTS", "100"),
        ("HOSTNAME", "elastic-worker-2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    vars.extend(torchrun_worker(2, 0, 3, 1, "elastic-worker-0", 29400));
    let p = plan(&env_of(&vars));
    assert_eq!(p.platform, Platform::KubeflowPytorchjob);
    assert_eq!(p.launcher, Launcher::Torchrun);
    assert_eq!(ranks(&p.topology), (2, 3, 0, 1, 2, 3));
    assert_eq!(p.topology.master_port, 29400);
}

#[test]
fn kubeflow_v1_elastic_lone_process_uses_rdzv_endpoint_and_max_nodes() {
    let p = plan(&env(&[
        ("PET_RDZV_ENDPOINT", "elastic-worker-0:23456"),
        ("PET_RDZV_BACKEND", "c10d"),
        ("PET_NNODES", "1:4"),
        ("PET_NODE_RANK", "2"),
        ("PET_MAX_RESTARTS", "3"),
    ]));
    assert_eq!(p.platform, Platform::KubeflowPytorchjob);
    assert_eq!(ranks(&p.topology), (2, 4, 0, 1, 2, 4));
    assert_eq!(p.max_restarts, Some(3), "hytrain launch restarts the pod's workers up to maxRestarts times");
    assert_eq!((p.topology.master_addr.as_str(), p.topology.master_port), ("elastic-worker-0", 23456));
    assert!(p.notes.iter().any(|n| n.contains("elastic") && n.contains("1:4")), "{:?}", p.notes);
    assert!(p.notes.iter().any(|n| n.contains("PET_RDZV_ENDPOINT")), "{:?}", p.notes);
}

#[test]
fn kubeflow_v1_without_master_replica_single_pod_is_rank_zero() {
    // A Worker-only job without elasticPolicy gets just PET_NNODES.
    let p = plan(&env(&[("PET_NNODES", "1"), ("PYTHONUNBUFFERED", "0")]));
    assert_eq!(p.platform, Platform::KubeflowPytorchjob);
    assert_eq!(ranks(&p.topology), (0, 1, 0, 1, 0, 1));
    assert_eq!(p.topology.master_addr, "127.0.0.1");
}

// ---------------------------------------------------------------- Kubeflow Trainer v2

fn trainer_v2_node(node_rank: usize, nnodes: usize, nproc: &str) -> Vec<(String, String)> {
    vec![
        ("PET_NNODES".into(), nnodes.to_string()),
        ("PET_NPROC_PER_NODE".into(), nproc.into()),
        ("PET_NODE_RANK".into(), node_rank.to_string()),
        ("PET_MASTER_ADDR".into(), "mnist-node-0-0.mnist".into()),
        ("PET_MASTER_PORT".into(), "29500".into()),
        ("HOSTNAME".into(), format!("mnist-node-0-{node_rank}")),
    ]
}

#[test]
fn trainer_v2_pet_only_gives_node_rank_and_master() {
    for node in 0..3 {
        let p = plan(&env_of(&trainer_v2_node(node, 3, "auto")));
        assert_eq!(p.platform, Platform::KubeflowTrainjob);
        assert_eq!(p.launcher, Launcher::None);
        assert_eq!(ranks(&p.topology), (node, 3, 0, 1, node, 3));
        assert_eq!(p.topology.master_endpoint(), "mnist-node-0-0.mnist:29500");
        assert_eq!(p.nproc_per_node_hint(), None);
    }
}

#[test]
fn trainer_v2_numeric_nproc_is_a_hint_and_children_keep_the_platform() {
    let node = env_of(&trainer_v2_node(1, 2, "4"));
    let p = plan(&node);
    assert_eq!(p.nproc_per_node_hint(), Some(4));
    assert_eq!(ranks(&p.topology), (4, 8, 0, 4, 1, 2));
    for local_rank in 0..4 {
        let c = plan(&child_env(&node, 4, local_rank));
        assert_eq!(c.platform, Platform::KubeflowTrainjob, "HYTRAIN_PLATFORM carries the platform");
        assert_eq!(ranks(&c.topology), (4 + local_rank, 8, local_rank, 4, 1, 2));
    }
}

#[test]
fn trainer_v2_torchrun_children_stay_a_trainjob() {
    let mut vars = trainer_v2_node(1, 2, "2");
    vars.extend(torchrun_worker(3, 1, 4, 2, "mnist-node-0-0.mnist", 29500));
    let p = plan(&env_of(&vars));
    assert_eq!(p.platform, Platform::KubeflowTrainjob);
    assert_eq!(p.launcher, Launcher::Torchrun);
    assert_eq!(ranks(&p.topology), (3, 4, 1, 2, 1, 2));
}

// ---------------------------------------------------------------- torchrun and mpirun outside a cluster

#[test]
fn torchrun_children_take_global_ranks_directly() {
    let p = plan(&env_of(&torchrun_worker(5, 1, 8, 4, "10.0.0.1", 29400)));
    assert_eq!((p.platform, p.launcher), (Platform::Torchrun, Launcher::Torchrun));
    assert_eq!(ranks(&p.topology), (5, 8, 1, 4, 1, 2));
    assert_eq!(p.topology.master_endpoint(), "10.0.0.1:29400");
    assert!(p.topology.hosts.is_empty(), "two nodes whose names torchrun does not give");
}

#[test]
fn torchrun_shape_without_run_id_and_master_defaults_to_localhost_29500() {
    let p = plan(&env(&[
        ("RANK", "1"),
        ("LOCAL_RANK", "1"),
        ("GROUP_RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_WORLD_SIZE", "2"),
    ]));
    assert_eq!(p.launcher, Launcher::Torchrun);
    assert_eq!(ranks(&p.topology), (1, 2, 1, 2, 0, 1));
    assert_eq!(p.topology.master_endpoint(), "127.0.0.1:29500");
}

#[test]
fn mpirun_ranks_come_from_ompi_variables() {
    let p = plan(&env(&[
        ("OMPI_COMM_WORLD_RANK", "5"),
        ("OMPI_COMM_WORLD_SIZE", "8"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ("OMPI_COMM_WORLD_NODE_RANK", "1"),
    ]));
    assert_eq!((p.platform, p.launcher), (Platform::Mpi, Launcher::Mpirun));
    assert_eq!(ranks(&p.topology), (5, 8, 1, 4, 1, 2));
    assert_eq!(p.topology.master_endpoint(), "127.0.0.1:29500");
    assert!(p.notes.iter().any(|n| n.contains("MPI backend needs no store")), "{:?}", p.notes);
}

#[test]
fn mpirun_honours_master_addr_and_pmix_rank() {
    let p = plan(&env(&[
        ("PMIX_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "3"),
        ("MASTER_ADDR", "head"),
        ("MASTER_PORT", "4000"),
    ]));
    assert_eq!(p.launcher, Launcher::Mpirun);
    assert_eq!(ranks(&p.topology), (2, 3, 0, 1, 2, 3));
    assert_eq!(p.topology.master_endpoint(), "head:4000");
}

#[test]
fn hytrain_launch_under_mpirun_children_are_not_taken_for_mpi_ranks() {
    let node = env(&[
        ("OMPI_COMM_WORLD_RANK", "1"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "1"),
    ]);
    let c = plan(&child_env(&node, 2, 1));
    assert_eq!((c.platform, c.launcher), (Platform::Mpi, Launcher::HytrainLaunch));
    assert_eq!(ranks(&c.topology), (3, 4, 1, 2, 1, 2));
}

// ---------------------------------------------------------------- SageMaker

#[test]
fn sagemaker_with_toolkit_env_and_no_files() {
    let tree = SmTree::new();
    let p = plan(&tree.env(&[
        ("SM_HOSTS", r#"["algo-2","algo-1"]"#),
        ("SM_CURRENT_HOST", "algo-2"),
        ("SM_CHANNELS", r#"["training","validation"]"#),
        ("SM_CHANNEL_TRAINING", "/mnt/efs/cifar10"),
        ("SM_MODEL_DIR", "/opt/ml/model"),
        ("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"),
        ("SM_HPS", r#"{"epochs":10,"lr":0.01,"backend":"gloo","augment":true}"#),
        ("SM_HP_EPOCHS", "10"),
        ("SM_NETWORK_INTERFACE_NAME", "eth0"),
        ("SM_NUM_GPUS", "0"),
        ("SM_CURRENT_INSTANCE_TYPE", "ml.c5.xlarge"),
        ("TRAINING_JOB_NAME", "cifar-2024"),
        ("MASTER_ADDR", "algo-1"),
        ("MASTER_PORT", "7777"),
    ]));
    assert_eq!((p.platform, p.launcher), (Platform::Sagemaker, Launcher::None));
    assert_eq!(ranks(&p.topology), (1, 2, 0, 1, 1, 2));
    assert_eq!(p.topology.master_endpoint(), "algo-1:7777");
    assert_eq!(p.topology.hosts, ["algo-1", "algo-2"]);
    assert_eq!(p.topology.current_host, "algo-2");
    assert_eq!(p.paths.channels["training"].path.to_str(), Some("/mnt/efs/cifar10"));
    assert_eq!(p.paths.channels["validation"].path, tree.root().join("input/data/validation"));
    assert_eq!(p.paths.channels["training"].input_mode, InputMode::File);
    assert_eq!(p.paths.model_dir.to_str(), Some("/opt/ml/model"));
    let hp = |k: &str| p.hyperparameters.get(k).map(String::as_str);
    assert_eq!(
        (hp("epochs"), hp("lr"), hp("backend"), hp("augment")),
        (Some("10"), Some("0.01"), Some("gloo"), Some("true"))
    );
    let sm = p.sagemaker.as_ref().unwrap();
    assert!(sm.toolkit);
    assert_eq!(sm.job_name.as_deref(), Some("cifar-2024"));
    assert_eq!(sm.network_interface_name.as_deref(), Some("eth0"));
    assert_eq!(sm.num_gpus, Some(0));
    assert_eq!(sm.distribution, Distribution::None);
}

#[test]
fn sagemaker_without_toolkit_reads_the_config_files() {
    let tree = SmTree::new();
    tree.write_config("resourceconfig.json", &resource_config("algo-2", &["algo-1", "algo-2"]))
        .write_config(
            "inputdataconfig.json",
            r#"{"training":{"ContentType":"application/x-image","TrainingInputMode":"File","S3DistributionType":"FullyReplicated","RecordWrapperType":"None"},
                "stream":{"TrainingInputMode":"Pipe","S3DistributionType":"ShardedByS3Key"},
                "lazy":{"TrainingInputMode":"FastFile"}}"#,
        )
        .write_config(
            "hyperparameters.json",
            r#"{"epochs":"10","sagemaker_program":"\"train.py\"","lr":"0.01","augment":"true","model":"\"lenet\"","raw":"plain text","batch-size":"64"}"#,
        )
        .write_config("checkpointconfig.json", r#"{"LocalPath":"/opt/ml/checkpoints","S3Uri":"s3://bucket/ckpt"}"#);
    let p = plan(&tree.env(&[]));
    assert_eq!((p.platform, p.launcher), (Platform::Sagemaker, Launcher::None));
    assert_eq!(ranks(&p.topology), (1, 2, 0, 1, 1, 2));
    assert_eq!(p.topology.master_addr, "algo-1");
    assert_eq!(p.topology.master_port, SAGEMAKER_DEFAULT_MASTER_PORT);
    assert!(![7777, 7592].contains(&p.topology.master_port));
    assert!(p.notes.iter().any(|n| n.contains("7777") && n.contains("7592")), "{:?}", p.notes);

    let hp = |k: &str| p.hyperparameters.get(k).map(String::as_str);
    assert_eq!(hp("sagemaker_program"), Some("train.py"), "JSON-encoded string is decoded");
    assert_eq!(hp("model"), Some("lenet"));
    assert_eq!(hp("epochs"), Some("10"), "a decoded number keeps its JSON text");
    assert_eq!(hp("augment"), Some("true"));
    assert_eq!(hp("raw"), Some("plain text"), "text that is not JSON is kept as it is");
    assert_eq!(hp("batch-size"), Some("64"));

    let ch = &p.paths.channels;
    assert_eq!(ch.len(), 3);
    assert_eq!(ch["training"].path, tree.root().join("input/data/training"));
    assert_eq!(ch["training"].content_type.as_deref(), Some("application/x-image"));
    assert_eq!(
        (ch["training"].input_mode, ch["training"].s3_distribution),
        (InputMode::File, S3Distribution::FullyReplicated)
    );
    assert_eq!(
        (ch["stream"].input_mode, ch["stream"].s3_distribution),
        (InputMode::Pipe, S3Distribution::ShardedByS3Key)
    );
    assert_eq!(ch["stream"].path, tree.root().join("input/data/stream"), "base path of the stream_<epoch> FIFOs");
    assert_eq!(ch["lazy"].input_mode, InputMode::FastFile);

    assert_eq!(p.paths.model_dir, tree.root().join("model"));
    assert_eq!(p.paths.output_dir, tree.root().join("output"));
    assert_eq!(p.paths.output_data_dir, tree.root().join("output/data"));
    assert_eq!(p.paths.failure_file, Some(tree.root().join("output/failure")));
    assert_eq!(p.paths.checkpoint_dir.as_deref().and_then(|c| c.to_str()), Some("/opt/ml/checkpoints"));

    let sm = p.sagemaker.as_ref().unwrap();
    assert!(!sm.toolkit);
    assert_eq!(sm.checkpoint_s3_uri.as_deref(), Some("s3://bucket/ckpt"));
    assert_eq!(sm.current_instance_type.as_deref(), Some("ml.c5.xlarge"));
    assert_eq!(sm.network_interface_name.as_deref(), Some("eth0"));
    assert_eq!(sm.instance_group.as_deref(), Some("homogeneousCluster"));
}

#[test]
fn sagemaker_checkpoint_dir_defaults_under_the_root() {
    let tree = SmTree::new();
    tree.write_config("resourceconfig.json", &resource_config("algo-1", &["algo-1"]));
    let p = plan(&tree.env(&[]));
    assert_eq!(p.paths.checkpoint_dir, Some(tree.root().join("checkpoints")));
    assert_eq!(ranks(&p.topology), (0, 1, 0, 1, 0, 1));
}

#[test]
fn sagemaker_hosts_sort_as_strings_so_algo10_comes_before_algo2() {
    let tree = SmTree::new();
    let unsorted =
        ["algo-7", "algo-2", "algo-10", "algo-1", "algo-5", "algo-9", "algo-3", "algo-8", "algo-4", "algo-6"];
    let sorted = ["algo-1", "algo-10", "algo-2", "algo-3", "algo-4", "algo-5", "algo-6", "algo-7", "algo-8", "algo-9"];
    for (index, current) in sorted.iter().enumerate() {
        tree.write_config("resourceconfig.json", &resource_config(current, &unsorted));
        let p = plan(&tree.env(&[]));
        assert_eq!(p.topology.hosts, sorted);
        assert_eq!(ranks(&p.topology), (index, 10, 0, 1, index, 10), "{current}");
        assert_eq!(p.topology.master_addr, "algo-1");
    }
}

fn hetero_config(current: &str) -> String {
    serde_json::json!({
        "current_host": current,
        "current_instance_type": if current <= "algo-2" { "ml.c5.2xlarge" } else { "ml.p4d.24xlarge" },
        "current_group_name": if current <= "algo-2" { "data" } else { "train" },
        "hosts": ["algo-4", "algo-1", "algo-3", "algo-2"],
        "instance_groups": [
            {"instance_group_name": "data", "instance_type": "ml.c5.2xlarge", "hosts": ["algo-2", "algo-1"]},
            {"instance_group_name": "train", "instance_type": "ml.p4d.24xlarge", "hosts": ["algo-4", "algo-3"]}
        ],
        "network_interface_name": "eth0"
    })
    .to_string()
}

#[test]
fn sagemaker_heterogeneous_distribution_group_starting_at_algo3() {
    let tree = SmTree::new();
    tree.write_config("hyperparameters.json", r#"{"sagemaker_distribution_instance_groups":"[\"train\"]"}"#);
    for (current, rank) in [("algo-3", 0), ("algo-4", 1)] {
        tree.write_config("resourceconfig.json", &hetero_config(current));
        let p = plan(&tree.env(&[]));
        assert_eq!(ranks(&p.topology), (rank, 2, 0, 1, rank, 2), "{current}");
        assert_eq!(p.topology.master_addr, "algo-3");
        assert_eq!(p.topology.hosts, ["algo-3", "algo-4"]);
        let sm = p.sagemaker.unwrap();
        assert_eq!(sm.distribution_instance_groups, ["train"]);
        assert_eq!(sm.instance_group.as_deref(), Some("train"));
        assert_eq!(sm.hosts, ["algo-1", "algo-2", "algo-3", "algo-4"]);
        assert_eq!(sm.instance_groups["data"].hosts, ["algo-1", "algo-2"]);
    }
}

#[test]
fn sagemaker_host_outside_the_distribution_group_trains_alone() {
    let tree = SmTree::new();
    tree.write_config("resourceconfig.json", &hetero_config("algo-1"));
    // The toolkit's way of saying the same thing, and its MASTER_ADDR for the group, which must not be followed.
    let p = plan(&tree.env(&[("SM_DISTRIBUTION_INSTANCE_GROUPS", r#"["train"]"#), ("MASTER_ADDR", "algo-3")]));
    assert_eq!(ranks(&p.topology), (0, 1, 0, 1, 0, 1));
    assert_eq!(p.topology.master_addr, "127.0.0.1");
    assert_eq!(p.topology.hosts, ["algo-1"]);
    assert!(p.notes.iter().any(|n| n.contains("outside the distribution instance groups")), "{:?}", p.notes);
    assert_eq!(p.nproc_per_node_hint(), None);
}

#[test]
fn sagemaker_torchrun_launched_by_the_toolkit_uses_master_port_7777() {
    let tree = SmTree::new();
    let mut vars: Vec<(String, String)> = [
        ("SM_HOSTS", r#"["algo-1","algo-2"]"#),
        ("SM_CURRENT_HOST", "algo-2"),
        ("SM_HPS", r#"{"sagemaker_torch_distributed_enabled":true}"#),
        ("SM_NUM_GPUS", "4"),
        ("NCCL_SOCKET_IFNAME", "eth0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    vars.extend(torchrun_worker(5, 1, 8, 4, "algo-1", 7777));
    let borrowed: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let p = plan(&tree.env(&borrowed));
    assert_eq!((p.platform, p.launcher), (Platform::Sagemaker, Launcher::Torchrun));
    assert_eq!(ranks(&p.topology), (5, 8, 1, 4, 1, 2));
    assert_eq!(p.topology.master_endpoint(), "algo-1:7777");
    assert_eq!(p.sagemaker.as_ref().unwrap().distribution, Distribution::TorchDistributed);
    assert_eq!(p.nproc_per_node_hint(), Some(4));
}

#[test]
fn sagemaker_mpi_processes_per_host_is_the_nproc_hint() {
    let tree = SmTree::new();
    tree.write_config("resourceconfig.json", &resource_config("algo-1", &["algo-1", "algo-2"])).write_config(
        "hyperparameters.json",
        r#"{"sagemaker_mpi_enabled":"true","sagemaker_mpi_num_of_processes_per_host":"3"}"#,
    );
    let p = plan(&tree.env(&[]));
    assert_eq!(p.sagemaker.as_ref().unwrap().distribution, Distribution::Mpi);
    assert_eq!(p.nproc_per_node_hint(), Some(3));
}

#[test]
fn sagemaker_hytrain_launch_children_on_the_second_host() {
    let tree = SmTree::new();
    tree.write_config("resourceconfig.json", &resource_config("algo-2", &["algo-1", "algo-2"]));
    let host = tree.env(&[]);
    for local_rank in 0..3 {
        let c = plan(&child_env(&host, 3, local_rank));
        assert_eq!((c.platform, c.launcher), (Platform::Sagemaker, Launcher::HytrainLaunch));
        assert_eq!(ranks(&c.topology), (3 + local_rank, 6, local_rank, 3, 1, 2));
        assert_eq!(c.topology.master_endpoint(), format!("algo-1:{SAGEMAKER_DEFAULT_MASTER_PORT}"));
    }
}

// ---------------------------------------------------------------- local

#[test]
fn local_process_is_rank_zero_of_one_with_default_paths() {
    let p = plan(&env(&[("HOSTNAME", "laptop")]));
    assert_eq!((p.platform, p.launcher), (Platform::Local, Launcher::None));
    assert_eq!(ranks(&p.topology), (0, 1, 0, 1, 0, 1));
    assert_eq!(p.topology.master_endpoint(), "127.0.0.1:29500");
    assert_eq!(p.topology.hosts, ["laptop"]);
    assert_eq!(p.paths.model_dir.to_str(), Some("hytrain-out/model"));
    assert_eq!(p.paths.checkpoint_dir.as_deref().and_then(|c| c.to_str()), Some("hytrain-out/checkpoints"));
    assert_eq!(p.paths.output_dir.to_str(), Some("hytrain-out/output"));
    assert_eq!(p.paths.failure_file, None);
    assert_eq!(plan(&env(&[])).topology.current_host, "localhost");
}

#[test]
fn local_honours_master_addr_forms_and_port() {
    for (addr, expect) in [("[::1]", "::1"), ("10.1.2.3", "10.1.2.3"), ("head-node", "head-node")] {
        let p = plan(&env(&[("MASTER_ADDR", addr), ("MASTER_PORT", "1234")]));
        assert_eq!((p.topology.master_addr.as_str(), p.topology.master_port), (expect, 1234));
    }
    assert_eq!(plan(&env(&[("MASTER_ADDR", "[::1]")])).topology.master_endpoint(), "[::1]:29500");
}

#[test]
fn local_env_style_rank_and_world_size_are_honoured() {
    let p = plan(&env(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29600")]));
    assert_eq!((p.platform, p.launcher), (Platform::Local, Launcher::None));
    assert_eq!(ranks(&p.topology), (1, 2, 0, 1, 1, 2));
}

#[test]
fn empty_variables_count_as_unset() {
    let p = plan(&env(&[("RANK", ""), ("WORLD_SIZE", ""), ("MASTER_PORT", ""), ("SM_HOSTS", "")]));
    assert_eq!(p.platform, Platform::Local);
    assert_eq!(ranks(&p.topology), (0, 1, 0, 1, 0, 1));
}

// ---------------------------------------------------------------- hytrain launch round trip and output forms

#[test]
fn worker_env_round_trips_to_the_worker_topology_on_every_platform() {
    let tree = SmTree::new();
    tree.write_config("resourceconfig.json", &resource_config("algo-3", &["algo-1", "algo-2", "algo-3"]));
    let parents = [
        env(&[("HOSTNAME", "laptop")]),
        env_of(&kubeflow_v1_pod("j", "worker", 1, 2, 3, "auto")),
        env_of(&kubeflow_v1_pod("j", "worker", 0, 1, 2, "2")),
        env_of(&trainer_v2_node(2, 3, "auto")),
        env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]),
        tree.env(&[]),
        tree.env(&[
            ("SM_HOSTS", r#"["algo-3","algo-2","algo-1"]"#),
            ("SM_CURRENT_HOST", "algo-2"),
            ("MASTER_ADDR", "algo-1"),
            ("MASTER_PORT", "7777"),
        ]),
    ];
    for parent in &parents {
        let p = plan(parent);
        for nproc in 1..=3 {
            for local_rank in 0..nproc {
                let c = plan(&child_env(parent, nproc, local_rank));
                let want = p.topology.worker(nproc, local_rank);
                assert_eq!(c.topology, want, "{:?} nproc {nproc} local {local_rank}", p.platform);
                assert_eq!(c.platform, p.platform);
                assert_eq!(c.launcher, Launcher::HytrainLaunch);
                assert_eq!(c.topology.rank, p.topology.node_rank * nproc + local_rank);
            }
        }
    }
}

#[test]
fn plan_json_has_platform_and_topology_fields_at_top_level() {
    let tree = SmTree::new();
    tree.write_config("resourceconfig.json", &resource_config("algo-2", &["algo-1", "algo-2"]));
    let p = plan(&tree.env(&[]));
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["platform"], "sagemaker");
    assert_eq!(v["launcher"], "none");
    for field in [
        "rank",
        "local_rank",
        "world_size",
        "local_world_size",
        "node_rank",
        "nnodes",
        "master_addr",
        "master_port",
        "hosts",
        "current_host",
    ] {
        assert!(v["topology"].get(field).is_some(), "topology.{field} missing in {v}");
    }
    assert_eq!(v["topology"]["rank"], 1);
    assert_eq!(v["topology"]["master_addr"], "algo-1");
    let back: hytrain_cluster::Plan = serde_json::from_value(v).unwrap();
    assert_eq!(back, p);
}

#[test]
fn display_shows_platform_ranks_master_and_notes() {
    let p = plan(&env_of(&kubeflow_v1_pod("big", "worker", 0, 1, 2, "2")));
    let text = p.to_string();
    assert!(text.contains("kubeflow-pytorchjob"), "{text}");
    assert!(text.contains("2 of 4"), "{text}");
    assert!(text.contains("big-master-0:23456"), "{text}");
    assert!(text.contains("hytrain launch"), "{text}");
    assert!(text.lines().count() > 5);
}

#[test]
fn host_aliases_map_names_to_addresses_and_leave_others_alone() {
    let p = plan(&env(&[("HYTRAIN_HOST_ALIASES", "algo-1=127.0.0.1, algo-2=[::1]")]));
    assert_eq!(p.address_of("algo-1"), "127.0.0.1");
    assert_eq!(p.address_of("algo-2"), "::1");
    assert_eq!(p.address_of("algo-3"), "algo-3");
}

#[test]
fn nccl_socket_ifname_is_sagemakers_network_interface_as_the_toolkit_sets_it() {
    let tree = SmTree::new();
    let rc = resource_config("algo-1", &["algo-1", "algo-2"]).replace("\"eth0\"", "\"ens5\"");
    tree.write_config("resourceconfig.json", &rc);
    assert_eq!(plan(&tree.env(&[])).nccl_socket_ifname(), Some("ens5"), "from resourceconfig.json");
    let with_toolkit = plan(&tree.env(&[("SM_NETWORK_INTERFACE_NAME", "eth1")]));
    assert_eq!(with_toolkit.nccl_socket_ifname(), Some("eth1"), "the toolkit's own setting first");
    let off_sagemaker = plan(&env(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]));
    assert_eq!(off_sagemaker.nccl_socket_ifname(), None);
}

//! Bad or inconsistent launcher input: each gives one line naming the variable or file and the expected form.

use crate::common;

use common::{env, error, resource_config, SmTree};

const TORCHRUN: [(&str, &str); 1] = [("TORCHELASTIC_RUN_ID", "none")];

fn torchrun(pairs: &[(&str, &str)]) -> hytrain_cluster::Env {
    let mut e = env(&TORCHRUN);
    e.extend(pairs.iter().copied());
    e
}

// ---------------------------------------------------------------- ranks and sizes

#[test]
fn rank_not_below_world_size_is_refused() {
    let want = "RANK=5 is not below WORLD_SIZE=4: RANK must be in 0..WORLD_SIZE";
    assert_eq!(error(&torchrun(&[("RANK", "5"), ("WORLD_SIZE", "4")])), want);
    // The same from a Kubeflow v1 pod (nprocPerNode 1), where RANK is the pod index.
    assert_eq!(
        error(&env(&[("RANK", "5"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "j-master-0"), ("PET_NNODES", "4")])),
        want
    );
}

#[test]
fn non_numeric_ranks_and_sizes_name_the_variable() {
    for (var, pairs) in [
        ("RANK", vec![("RANK", "first"), ("WORLD_SIZE", "2")]),
        ("WORLD_SIZE", vec![("RANK", "0"), ("WORLD_SIZE", "two")]),
        ("LOCAL_RANK", vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "-1"), ("LOCAL_WORLD_SIZE", "2")]),
        ("LOCAL_WORLD_SIZE", vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2.0")]),
        ("GROUP_RANK", vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("GROUP_RANK", "x")]),
    ] {
        let msg = error(&torchrun(&pairs));
        assert!(msg.starts_with(&format!("{var} is not a whole number (got '")), "{msg}");
        assert!(msg.contains("expected"), "{msg}");
    }
}

#[test]
fn a_max_restarts_that_is_no_count_names_the_variable() {
    let msg = error(&env(&[("PET_NNODES", "1"), ("PET_MAX_RESTARTS", "always")]));
    assert!(msg.starts_with("PET_MAX_RESTARTS is not a whole number (got 'always')"), "{msg}");
    assert!(msg.contains("restarts"), "{msg}");
}

#[test]
fn zero_world_size_is_refused() {
    assert_eq!(
        error(&torchrun(&[("RANK", "0"), ("WORLD_SIZE", "0")])),
        "WORLD_SIZE=0 is not allowed; expected at least 1"
    );
}

#[test]
fn local_rank_not_below_local_world_size_is_refused() {
    assert_eq!(
        error(&torchrun(&[("RANK", "4"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "4"), ("LOCAL_WORLD_SIZE", "4")])),
        "LOCAL_RANK=4 is not below LOCAL_WORLD_SIZE=4: LOCAL_RANK must be in 0..LOCAL_WORLD_SIZE"
    );
}

#[test]
fn local_rank_without_local_world_size_is_refused() {
    let msg = error(&torchrun(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")]));
    assert!(msg.starts_with("LOCAL_WORLD_SIZE is not set; LOCAL_RANK is set"), "{msg}");
}

#[test]
fn local_world_size_above_world_size_is_refused() {
    let msg = error(&torchrun(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "4")]));
    assert!(msg.starts_with("LOCAL_WORLD_SIZE=4 is larger than the world size 2"), "{msg}");
}

#[test]
fn group_rank_not_below_group_world_size_is_refused() {
    let msg = error(&torchrun(&[("RANK", "0"), ("WORLD_SIZE", "4"), ("GROUP_RANK", "2"), ("GROUP_WORLD_SIZE", "2")]));
    assert_eq!(msg, "GROUP_RANK=2 is not below GROUP_WORLD_SIZE=2: GROUP_RANK must be in 0..GROUP_WORLD_SIZE");
}

#[test]
fn hytrain_launch_child_without_rank_says_who_sets_it() {
    let msg = error(&env(&[("HYTRAIN_LAUNCHER", "hytrain-launch"), ("WORLD_SIZE", "2")]));
    assert!(msg.starts_with("RANK is not set; torchrun and hytrain launch set it"), "{msg}");
}

#[test]
fn unknown_hytrain_platform_mark_is_refused() {
    let msg = error(&env(&[
        ("HYTRAIN_LAUNCHER", "hytrain-launch"),
        ("HYTRAIN_PLATFORM", "slurm"),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
    ]));
    assert!(
        msg.starts_with("HYTRAIN_PLATFORM: 'slurm' is not a platform; expected one of kubeflow-pytorchjob"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- MPI

#[test]
fn mpi_without_world_size_or_with_rank_out_of_range_is_refused() {
    let msg = error(&env(&[("OMPI_COMM_WORLD_RANK", "1")]));
    assert!(msg.starts_with("OMPI_COMM_WORLD_SIZE is not set; mpirun"), "{msg}");
    let msg = error(&env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "0")]));
    assert!(msg.starts_with("OMPI_COMM_WORLD_RANK is not set; mpirun"), "{msg}");
    assert_eq!(
        error(&env(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "2")])),
        "OMPI_COMM_WORLD_RANK=2 is not below OMPI_COMM_WORLD_SIZE=2: OMPI_COMM_WORLD_RANK must be in 0..OMPI_COMM_WORLD_SIZE"
    );
    assert_eq!(
        error(&env(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "0")])),
        "OMPI_COMM_WORLD_SIZE=0 is not allowed; expected at least 1"
    );
}

// ---------------------------------------------------------------- ports and addresses

#[test]
fn ports_that_are_not_numbers_in_range_are_refused() {
    for bad in ["http", "0", "70000", "-5"] {
        let msg = error(&env(&[("MASTER_PORT", bad)]));
        assert_eq!(msg, format!("MASTER_PORT='{bad}' is not a port; expected a number in 1..=65535"));
    }
    let msg = error(&env(&[
        ("PET_NNODES", "2"),
        ("PET_NODE_RANK", "0"),
        ("PET_MASTER_ADDR", "t-node-0-0.t"),
        ("PET_MASTER_PORT", "abc"),
    ]));
    assert!(msg.starts_with("PET_MASTER_PORT='abc' is not a port"), "{msg}");
}

#[test]
fn master_addr_that_is_no_host_is_refused() {
    let msg = error(&env(&[("MASTER_ADDR", "head:29500")]));
    assert!(msg.starts_with("MASTER_ADDR='head:29500' is not a host name, IPv4 address or [IPv6] address"), "{msg}");
    assert!(msg.contains("MASTER_PORT"), "{msg}");
    assert!(error(&env(&[("MASTER_ADDR", "[::1")])).starts_with("MASTER_ADDR='[::1'"));
}

#[test]
fn bad_rdzv_endpoint_is_refused() {
    let msg = error(&env(&[("PET_RDZV_ENDPOINT", "a b:1"), ("PET_NNODES", "1")]));
    assert!(msg.starts_with("PET_RDZV_ENDPOINT='a b:1' is not a host name"), "{msg}");
    assert!(msg.contains("host:port"), "{msg}");
}

// ---------------------------------------------------------------- Kubeflow

#[test]
fn world_size_not_a_multiple_of_nproc_is_refused() {
    let msg = error(&env(&[
        ("MASTER_ADDR", "j-master-0"),
        ("WORLD_SIZE", "5"),
        ("RANK", "0"),
        ("PET_NODE_RANK", "0"),
        ("PET_NPROC_PER_NODE", "2"),
    ]));
    assert!(msg.starts_with("WORLD_SIZE=5 is not a multiple of PET_NPROC_PER_NODE=2: "), "{msg}");
}

#[test]
fn rank_and_pet_node_rank_that_disagree_are_refused() {
    let msg = error(&env(&[
        ("MASTER_ADDR", "j-master-0"),
        ("WORLD_SIZE", "3"),
        ("RANK", "1"),
        ("PET_NODE_RANK", "2"),
        ("PET_NNODES", "3"),
    ]));
    assert!(msg.starts_with("RANK=1 and PET_NODE_RANK=2 disagree"), "{msg}");
}

#[test]
fn pet_nnodes_that_disagrees_with_world_size_is_refused() {
    let msg = error(&env(&[
        ("MASTER_ADDR", "j-master-0"),
        ("WORLD_SIZE", "4"),
        ("RANK", "1"),
        ("PET_NNODES", "3"),
        ("PET_NPROC_PER_NODE", "2"),
    ]));
    assert!(msg.starts_with("PET_NNODES=3 disagrees with WORLD_SIZE=4 / PET_NPROC_PER_NODE=2 = 2 pods"), "{msg}");
}

#[test]
fn node_rank_beyond_the_node_count_is_refused() {
    let msg = error(&env(&[
        ("MASTER_ADDR", "j-master-0"),
        ("WORLD_SIZE", "4"),
        ("RANK", "2"),
        ("PET_NNODES", "2"),
        ("PET_NPROC_PER_NODE", "2"),
    ]));
    assert_eq!(
        msg,
        "RANK=2 is not below WORLD_SIZE/PET_NPROC_PER_NODE=2: RANK must be in 0..WORLD_SIZE/PET_NPROC_PER_NODE"
    );
    let msg = error(&env(&[("PET_NNODES", "2"), ("PET_NODE_RANK", "2"), ("PET_MASTER_ADDR", "t-node-0-0.t")]));
    assert!(msg.starts_with("PET_NODE_RANK=2 is not below PET_NNODES=2"), "{msg}");
}

#[test]
fn local_rank_beyond_nproc_per_node_is_refused() {
    let msg = error(&env(&[
        ("PET_NNODES", "2"),
        ("PET_NODE_RANK", "1"),
        ("PET_MASTER_ADDR", "t-node-0-0.t"),
        ("PET_NPROC_PER_NODE", "2"),
        ("LOCAL_RANK", "2"),
    ]));
    assert!(msg.starts_with("LOCAL_RANK=2 is not below PET_NPROC_PER_NODE=2"), "{msg}");
}

#[test]
fn malformed_pet_nnodes_and_nproc_are_refused() {
    let base = [("PET_NODE_RANK", "0"), ("PET_MASTER_ADDR", "t-node-0-0.t")];
    for (nnodes, start) in [
        ("two", "PET_NNODES is not a whole number (got 'two'); expected a node count such as 2, or min:max"),
        ("x:4", "PET_NNODES is not a whole number (got 'x:4')"),
        ("0", "PET_NNODES=0 is not allowed"),
        ("4:1", "PET_NNODES: min 4 is above max 1"),
    ] {
        let mut pairs = base.to_vec();
        pairs.push(("PET_NNODES", nnodes));
        let msg = error(&env(&pairs));
        assert!(msg.starts_with(start), "{msg}");
    }
    for (nproc, start) in
        [("two", "PET_NPROC_PER_NODE is not a whole number (got 'two')"), ("0", "PET_NPROC_PER_NODE=0 is not allowed")]
    {
        let mut pairs = base.to_vec();
        pairs.extend([("PET_NNODES", "1"), ("PET_NPROC_PER_NODE", nproc)]);
        let msg = error(&env(&pairs));
        assert!(msg.starts_with(start), "{msg}");
    }
}

#[test]
fn elastic_pod_without_node_rank_asks_for_torchrun() {
    // The pod the endpoint names would host the store in rank 0, but it has no node rank to be rank 0 by.
    let msg =
        error(&env(&[("PET_RDZV_ENDPOINT", "e-worker-0:23456"), ("PET_NNODES", "1:4"), ("HOSTNAME", "e-worker-0")]));
    assert!(msg.starts_with("PET_NODE_RANK is not set; Kubeflow gave this pod no node rank"), "{msg}");
    assert!(msg.contains("torchrun"), "{msg}");
}

#[test]
fn kubeflow_without_any_job_size_is_refused() {
    let msg = error(&env(&[("PET_NODE_RANK", "1"), ("PET_MASTER_ADDR", "t-node-0-0.t")]));
    assert!(msg.starts_with("PET_NNODES is not set"), "{msg}");
}

#[test]
fn multi_pod_kubeflow_job_without_a_master_is_refused() {
    let msg = error(&env(&[("PET_NNODES", "2"), ("PET_NODE_RANK", "1")]));
    assert!(msg.starts_with("MASTER_ADDR is not set; no MASTER_ADDR, PET_MASTER_ADDR or PET_RDZV_ENDPOINT"), "{msg}");
}

#[test]
fn sizes_whose_product_overflows_are_refused() {
    let huge = usize::MAX.to_string();
    let msg = error(&env(&[
        ("PET_NNODES", &huge),
        ("PET_NODE_RANK", "0"),
        ("PET_MASTER_ADDR", "m"),
        ("PET_NPROC_PER_NODE", "2"),
    ]));
    assert!(msg.contains("too large"), "{msg}");
}

// ---------------------------------------------------------------- SageMaker

#[test]
fn sm_hosts_that_is_not_a_json_list_is_refused() {
    let tree = SmTree::new();
    assert_eq!(
        error(&tree.env(&[("SM_HOSTS", "algo-1"), ("SM_CURRENT_HOST", "algo-1")])),
        r#"SM_HOSTS is not a JSON list of host names (got 'algo-1'); expected e.g. ["algo-1","algo-2"]"#
    );
}

#[test]
fn current_host_missing_from_hosts_is_refused() {
    let tree = SmTree::new();
    tree.write_config("resourceconfig.json", &resource_config("algo-3", &["algo-2", "algo-1"]));
    assert_eq!(
        error(&tree.env(&[])),
        format!(
            r#"{}: current_host "algo-3" is not in hosts ["algo-1","algo-2"]"#,
            tree.config("resourceconfig.json").display()
        )
    );
    let msg = error(&tree.env(&[("SM_HOSTS", r#"["algo-1"]"#), ("SM_CURRENT_HOST", "algo-9")]));
    assert_eq!(msg, r#"SM_CURRENT_HOST and SM_HOSTS: current_host "algo-9" is not in hosts ["algo-1"]"#);
}

#[test]
fn empty_host_lists_are_refused() {
    let tree = SmTree::new();
    assert_eq!(
        error(&tree.env(&[("SM_HOSTS", "[]"), ("SM_CURRENT_HOST", "algo-1")])),
        r#"SM_HOSTS: hosts is empty; expected at least one host, e.g. ["algo-1"]"#
    );
    tree.write_config("resourceconfig.json", r#"{"current_host":"algo-1","hosts":[]}"#);
    let msg = error(&tree.env(&[]));
    assert!(msg.starts_with(&format!("{}: hosts is empty", tree.config("resourceconfig.json").display())), "{msg}");
}

#[test]
fn duplicate_and_invalid_host_names_are_refused() {
    let tree = SmTree::new();
    let msg = error(&tree.env(&[("SM_HOSTS", r#"["algo-1","algo-1"]"#), ("SM_CURRENT_HOST", "algo-1")]));
    assert_eq!(msg, r#"SM_HOSTS: host "algo-1" is listed twice; expected each host once"#);
    let msg = error(&tree.env(&[("SM_HOSTS", r#"["algo 1"]"#), ("SM_CURRENT_HOST", "algo 1")]));
    assert!(msg.starts_with("SM_HOSTS: 'algo 1' is not a host name"), "{msg}");
}

#[test]
fn sagemaker_without_hosts_or_current_host_is_refused() {
    let tree = SmTree::new();
    let msg = error(&tree.env(&[("TRAINING_JOB_NAME", "job")]));
    assert!(msg.starts_with("SM_HOSTS is not set; SageMaker was detected but neither SM_HOSTS nor"), "{msg}");
    assert!(msg.contains("resourceconfig.json"), "{msg}");
    tree.write_config("resourceconfig.json", r#"{"hosts":["algo-1"]}"#);
    let msg = error(&tree.env(&[]));
    assert!(msg.starts_with("SM_CURRENT_HOST is not set; "), "{msg}");
    assert!(msg.contains("names no current_host"), "{msg}");
}

#[test]
fn malformed_config_files_name_the_file_line_and_column() {
    for file in ["resourceconfig.json", "inputdataconfig.json", "hyperparameters.json", "checkpointconfig.json"] {
        let tree = SmTree::new();
        if file != "resourceconfig.json" {
            tree.write_config("resourceconfig.json", &resource_config("algo-1", &["algo-1"]));
        }
        tree.write_config(file, "{\n  \"a\":\n  oops\n}");
        let msg = error(&tree.env(&[]));
        let path = tree.config(file).display().to_string();
        assert!(msg.starts_with(&format!("{path}: ")), "{msg}");
        assert!(msg.contains("line 3 column"), "{msg}");
        assert!(msg.contains("expected"), "{msg}");
    }
}

#[test]
fn config_files_of_the_wrong_shape_are_refused() {
    let tree = SmTree::new();
    tree.write_config("resourceconfig.json", r#"{"current_host":"algo-1","hosts":"algo-1"}"#);
    let msg = error(&tree.env(&[]));
    assert!(msg.contains("resourceconfig.json: invalid type"), "{msg}");

    tree.write_config("resourceconfig.json", &resource_config("algo-1", &["algo-1"]));
    tree.write_config("inputdataconfig.json", r#"{"training":{"TrainingInputMode":"Stream"}}"#);
    let msg = error(&tree.env(&[]));
    assert!(msg.ends_with(r#"inputdataconfig.json: channel "training" has TrainingInputMode "Stream"; expected File, FastFile or Pipe"#), "{msg}");

    tree.write_config("inputdataconfig.json", r#"{"training":{"S3DistributionType":"Random"}}"#);
    let msg = error(&tree.env(&[]));
    assert!(msg.contains(r#"S3DistributionType "Random"; expected FullyReplicated or ShardedByS3Key"#), "{msg}");

    tree.write_config("inputdataconfig.json", r#"{"..":{}}"#);
    let msg = error(&tree.env(&[]));
    assert!(msg.contains(r#"".." is not a channel name"#), "{msg}");
}

#[test]
fn unreadable_config_file_is_refused() {
    let tree = SmTree::new();
    // A folder where the file should be.
    std::fs::create_dir_all(tree.config("resourceconfig.json")).unwrap();
    let msg = error(&tree.env(&[]));
    assert!(msg.starts_with(&format!("{}: cannot be read (", tree.config("resourceconfig.json").display())), "{msg}");
}

#[test]
fn malformed_toolkit_json_variables_are_refused() {
    let tree = SmTree::new();
    let hosts = [("SM_HOSTS", r#"["algo-1"]"#), ("SM_CURRENT_HOST", "algo-1")];
    for (var, value) in [
        ("SM_HPS", "{epochs: 10}"),
        ("SM_CHANNELS", "training"),
        ("SM_TRAINING_ENV", "{"),
        ("SM_INPUT_DATA_CONFIG", "[]"),
        ("SM_DISTRIBUTION_INSTANCE_GROUPS", "train"),
        ("SM_INSTANCE_GROUPS_DICT", "[1]"),
        ("SM_RESOURCE_CONFIG", "nope"),
    ] {
        let mut pairs = hosts.to_vec();
        pairs.push((var, value));
        let msg = error(&tree.env(&pairs));
        assert!(msg.starts_with(&format!("{var}: not valid here (")), "{msg}");
        assert!(msg.contains("; expected "), "{msg}");
    }
}

#[test]
fn non_numeric_sagemaker_counts_are_refused() {
    let tree = SmTree::new();
    let msg =
        error(&tree.env(&[("SM_HOSTS", r#"["algo-1"]"#), ("SM_CURRENT_HOST", "algo-1"), ("SM_NUM_GPUS", "many")]));
    assert!(msg.starts_with("SM_NUM_GPUS is not a whole number (got 'many')"), "{msg}");
    let msg = error(&tree.env(&[("SM_HOSTS", r#"["algo-1"]"#), ("SM_CURRENT_HOST", "algo-1"), ("SM_NUM_CPUS", "x")]));
    assert!(msg.starts_with("SM_NUM_CPUS is not a whole number"), "{msg}");
    tree.write_config("resourceconfig.json", &resource_config("algo-1", &["algo-1"]));
    tree.write_config("hyperparameters.json", r#"{"sagemaker_mpi_num_of_processes_per_host":"\"eight\""}"#);
    let msg = error(&tree.env(&[]));
    assert!(
        msg.starts_with("hyperparameter sagemaker_mpi_num_of_processes_per_host is not a whole number (got 'eight')"),
        "{msg}"
    );
    tree.write_config("hyperparameters.json", r#"{"sagemaker_mpi_num_of_processes_per_host":"0"}"#);
    let msg = error(&tree.env(&[]));
    assert_eq!(msg, "hyperparameter sagemaker_mpi_num_of_processes_per_host=0 is not allowed; expected at least 1");
}

#[test]
fn unknown_or_malformed_distribution_groups_are_refused() {
    let tree = SmTree::new();
    tree.write_config(
        "resourceconfig.json",
        r#"{"current_host":"algo-1","hosts":["algo-1","algo-2"],
            "instance_groups":[{"instance_group_name":"a","hosts":["algo-1"]},{"instance_group_name":"b","hosts":["algo-2"]}]}"#,
    );
    let msg = error(&tree.env(&[("SM_DISTRIBUTION_INSTANCE_GROUPS", r#"["gpu"]"#)]));
    assert_eq!(
        msg,
        r#"SM_DISTRIBUTION_INSTANCE_GROUPS: names instance group "gpu" which is not among the instance groups ["a","b"]; expected names from resourceconfig.json's instance_groups"#
    );
    for bad in [
        r#"{"sagemaker_distribution_instance_groups":"[1]"}"#,
        r#"{"sagemaker_distribution_instance_groups":"{\"a\":1}"}"#,
    ] {
        tree.write_config("hyperparameters.json", bad);
        let msg = error(&tree.env(&[]));
        assert!(msg.starts_with("hyperparameter sagemaker_distribution_instance_groups: "), "{msg}");
    }
}

#[test]
fn instance_group_host_outside_the_job_is_refused() {
    let tree = SmTree::new();
    tree.write_config(
        "resourceconfig.json",
        r#"{"current_host":"algo-1","hosts":["algo-1"],"instance_groups":[{"instance_group_name":"a","hosts":["algo-1","algo-7"]}]}"#,
    );
    let msg = error(&tree.env(&[]));
    assert!(msg.contains(r#"instance group "a" lists host "algo-7" which is not in hosts ["algo-1"]"#), "{msg}");
}

#[test]
fn host_alias_without_equals_sign_is_refused() {
    let msg = error(&env(&[("HYTRAIN_HOST_ALIASES", "algo-1:127.0.0.1")]));
    assert!(msg.starts_with("HYTRAIN_HOST_ALIASES"), "{msg}");
    assert!(msg.contains("algo-1=127.0.0.1"), "{msg}");
}

#[test]
fn host_alias_to_a_non_address_is_refused() {
    let msg = error(&env(&[("HYTRAIN_HOST_ALIASES", "algo-1=not an address")]));
    assert!(msg.contains("HYTRAIN_HOST_ALIASES") && msg.contains("not a host name"), "{msg}");
}

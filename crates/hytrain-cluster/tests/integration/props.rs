//! Properties over many inputs: detection never panics, errors stay one line, and well-formed launcher
//! environments always give a consistent topology.

use crate::common;

use common::{env, SmTree, NO_SM_ROOT};
use hytrain_cluster::{detect_from, worker_env, Env, Launcher, Plan};
use proptest::prelude::*;

/// Every variable detection reads.
const VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "HYTRAIN_LAUNCHER",
    "HYTRAIN_PLATFORM",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMIX_RANK",
    "PET_NNODES",
    "PET_NODE_RANK",
    "PET_NPROC_PER_NODE",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "PET_RDZV_ENDPOINT",
    "SM_HOSTS",
    "SM_CURRENT_HOST",
    "SM_HPS",
    "SM_CHANNELS",
    "SM_CHANNEL_TRAINING",
    "SM_NUM_GPUS",
    "SM_DISTRIBUTION_INSTANCE_GROUPS",
    "SM_INSTANCE_GROUPS_DICT",
    "SM_RESOURCE_CONFIG",
    "SM_INPUT_DATA_CONFIG",
    "SM_TRAINING_ENV",
    "TRAINING_JOB_NAME",
    "HOSTNAME",
];

/// Values that are often almost right, plus arbitrary text.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,2}",
        "[0-9]{15,25}",
        "-?[0-9]{1,3}",
        "[0-9]{1,2}:[0-9]{1,2}",
        Just("auto".to_owned()),
        Just("hytrain-launch".to_owned()),
        prop::sample::select(vec![
            "kubeflow-pytorchjob",
            "kubeflow-trainjob",
            "sagemaker",
            "torchrun",
            "mpi",
            "local",
            "x"
        ])
        .prop_map(str::to_owned),
        "algo-[0-9]{1,2}",
        "\\[(\"algo-[0-9]\",){0,3}\"algo-[0-9]\"\\]",
        "\\[[^\\]]{0,10}\\]?",
        "\\{\"[a-z_]{1,8}\":(\"[a-z0-9]{0,4}\"|[0-9]{1,3}|true|\\[\\])\\}",
        "[a-z]{1,6}-master-0",
        "\\[?[0-9a-f:]{0,10}\\]?(:[0-9]{1,5})?",
        ".{0,16}",
    ]
}

/// Well-formed environments of each launcher shape, which the strategy then perturbs.
const SHAPES: &[&[(&str, &str)]] = &[
    &[],
    &[
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("GROUP_RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("GROUP_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_RUN_ID", "x"),
    ],
    &[
        ("MASTER_ADDR", "j-master-0"),
        ("MASTER_PORT", "23456"),
        ("PET_MASTER_ADDR", "j-master-0"),
        ("PET_MASTER_PORT", "23456"),
        ("WORLD_SIZE", "6"),
        ("RANK", "1"),
        ("PET_NODE_RANK", "1"),
        ("PET_NNODES", "3"),
        ("PET_NPROC_PER_NODE", "2"),
    ],
    &[
        ("PET_NNODES", "3"),
        ("PET_NODE_RANK", "2"),
        ("PET_NPROC_PER_NODE", "auto"),
        ("PET_MASTER_ADDR", "t-node-0-0.t"),
        ("PET_MASTER_PORT", "29500"),
    ],
    &[("PET_RDZV_ENDPOINT", "e-worker-0:23456"), ("PET_NNODES", "1:4"), ("PET_NODE_RANK", "0")],
    &[
        ("OMPI_COMM_WORLD_RANK", "3"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
    ],
    &[
        ("SM_HOSTS", r#"["algo-2","algo-1","algo-10"]"#),
        ("SM_CURRENT_HOST", "algo-10"),
        ("SM_HPS", r#"{"epochs":3}"#),
        ("SM_CHANNELS", r#"["training"]"#),
        ("MASTER_ADDR", "algo-1"),
        ("MASTER_PORT", "7777"),
    ],
    &[
        ("HYTRAIN_LAUNCHER", "hytrain-launch"),
        ("HYTRAIN_PLATFORM", "local"),
        ("RANK", "1"),
        ("LOCAL_RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("GROUP_RANK", "0"),
        ("GROUP_WORLD_SIZE", "1"),
    ],
];

/// A launcher shape with up to a few variables set to arbitrary values.
fn arbitrary_env() -> impl Strategy<Value = Env> {
    (prop::sample::select(SHAPES), prop::collection::vec((prop::sample::select(VARS), value()), 0..5)).prop_map(
        |(shape, changes)| {
            let mut e = Env::from_pairs([("HYTRAIN_SM_ROOT", NO_SM_ROOT)]);
            e.extend(shape.iter().copied());
            e.extend(changes.into_iter().map(|(k, v)| (k.to_owned(), v)));
            e
        },
    )
}

fn assert_consistent(plan: &Plan) {
    let t = &plan.topology;
    assert!(t.rank < t.world_size, "rank {} world {}", t.rank, t.world_size);
    assert!(t.local_rank < t.local_world_size);
    assert!(t.node_rank < t.nnodes);
    assert!(t.master_port > 0);
    let _ = plan.to_string();
    let json = serde_json::to_string(plan).expect("plan serialises");
    let back: Plan = serde_json::from_str(&json).expect("plan deserialises");
    assert_eq!(&back, plan);
}

fn check(env: &Env) {
    match detect_from(env) {
        Ok(plan) => assert_consistent(&plan),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n') && !msg.contains('\r'), "multi-line error: {msg:?}");
            assert!(!msg.is_empty());
        }
    }
}

proptest! {
    #[test]
    fn detect_never_panics_and_errors_are_one_line(env in arbitrary_env()) {
        check(&env);
    }

    #[test]
    fn valid_torchrun_shaped_inputs_give_rank_below_world_size(
        nnodes in 1usize..64, nproc in 1usize..16, node in 0usize..64, local in 0usize..16, run_id in any::<bool>(),
    ) {
        let (node, local) = (node % nnodes, local % nproc);
        let rank = node * nproc + local;
        let world = nnodes * nproc;
        let mut pairs = vec![
            ("RANK", rank.to_string()), ("LOCAL_RANK", local.to_string()), ("GROUP_RANK", node.to_string()),
            ("WORLD_SIZE", world.to_string()), ("LOCAL_WORLD_SIZE", nproc.to_string()),
            ("GROUP_WORLD_SIZE", nnodes.to_string()), ("MASTER_ADDR", "10.0.0.1".to_owned()), ("MASTER_PORT", "29400".to_owned()),
        ];
        if run_id {
            pairs.push(("TORCHELASTIC_RUN_ID", "job".to_owned()));
        }
        let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let plan = detect_from(&env(&borrowed)).unwrap();
        prop_assert_eq!(plan.launcher, Launcher::Torchrun);
        prop_assert_eq!((plan.topology.rank, plan.topology.world_size), (rank, world));
        prop_assert_eq!((plan.topology.node_rank, plan.topology.nnodes), (node, nnodes));
        assert_consistent(&plan);
    }

    #[test]
    fn kubeflow_v1_pods_give_global_rank_from_node_rank(
        pods in 1usize..32, nproc in 1usize..9, pod in 0usize..32, local in proptest::option::of(0usize..9),
    ) {
        let pod = pod % pods;
        let local = local.map(|l| l % nproc);
        let mut pairs = vec![
            ("MASTER_ADDR", "j-master-0".to_owned()), ("MASTER_PORT", "23456".to_owned()),
            ("WORLD_SIZE", (pods * nproc).to_string()), ("RANK", pod.to_string()),
            ("PET_NODE_RANK", pod.to_string()), ("PET_NNODES", pods.to_string()),
            ("PET_NPROC_PER_NODE", nproc.to_string()),
        ];
        if let Some(l) = local {
            pairs.push(("LOCAL_RANK", l.to_string()));
        }
        let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let plan = detect_from(&env(&borrowed)).unwrap();
        prop_assert_eq!(plan.topology.rank, pod * nproc + local.unwrap_or(0));
        prop_assert_eq!(plan.topology.world_size, pods * nproc);
        assert_consistent(&plan);
    }

    #[test]
    fn hytrain_launch_workers_detect_their_own_topology(
        nnodes in 1usize..16, node in 0usize..16, nproc in 1usize..9, local in 0usize..9,
    ) {
        let (node, local) = (node % nnodes, local % nproc);
        let parent = env(&[
            ("PET_NNODES", &nnodes.to_string()), ("PET_NODE_RANK", &node.to_string()),
            ("PET_MASTER_ADDR", "t-node-0-0.t"), ("PET_MASTER_PORT", "29500"),
        ]);
        let p = detect_from(&parent).unwrap();
        let worker = p.topology.worker(nproc, local);
        let mut child = parent.clone();
        child.extend(worker_env(&worker, &parent));
        let c = detect_from(&child).unwrap();
        prop_assert_eq!(&c.topology, &worker);
        prop_assert_eq!(c.platform, p.platform);
        assert_consistent(&c);
    }
}

/// File contents that are often almost valid SageMaker config.
fn config_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        Just(r#"{"current_host":"algo-1","hosts":["algo-1","algo-2"]}"#.to_owned()),
        Just(r#"{"current_host":"algo-2","hosts":["algo-10","algo-2"],"instance_groups":[{"instance_group_name":"g","hosts":["algo-2"]}]}"#.to_owned()),
        "\\{\"current_host\":\"algo-[0-9]\",\"hosts\":\\[(\"algo-[0-9]\",?){0,3}\\]\\}",
        "\\{\"[A-Za-z_]{1,20}\":(\"[a-zA-Z0-9\\\\\"]{0,8}\"|[0-9]{1,3}|null|\\[\\]|\\{\\})\\}",
        ".{0,24}",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn detect_never_panics_on_arbitrary_sagemaker_files(
        rc in config_text(), idc in config_text(), hps in config_text(), ck in config_text(), extra in arbitrary_env(),
    ) {
        let tree = SmTree::new();
        for (name, text) in [("resourceconfig.json", rc), ("inputdataconfig.json", idc), ("hyperparameters.json", hps), ("checkpointconfig.json", ck)] {
            if let Some(text) = text {
                tree.write_config(name, &text);
            }
        }
        let mut e = extra;
        e.set("HYTRAIN_SM_ROOT", tree.root().to_str().unwrap());
        e.set("TRAINING_JOB_NAME", "prop");
        check(&e);
    }
}

//! The Kubeflow manifests in containers/kubeflow: every document validates against its CRD (made strict) and
//! Kubernetes' own schemas, the PyTorchJobs keep the reference job's shape, the elastic job with a standalone
//! rendezvous store is wired together (Deployment, Service, job), and every hytrain command line in them is one the
//! binary accepts.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::common;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every document of every manifest in containers/kubeflow, with the file it came from.
fn manifests() -> Vec<(String, Value)> {
    let dir = repo().join("containers/kubeflow");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "manifests missing from {}: {files:?}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value: Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    docs
}

/// Kubernetes rejects unknown fields of a custom resource under strict field validation (kubectl's default): make
/// the CRD's structural schema say so, except where the CRD itself keeps unknown fields.
fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let keeps_unknown = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if map.contains_key("properties") && !map.contains_key("additionalProperties") && !keeps_unknown {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for v in map.values_mut() {
                strict(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

/// The strict schema of `version` in a CRD under tests/fixtures/crds.
fn crd_schema(file: &str, version: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/crds").join(file)).unwrap();
    let crd: Value = serde_norway::from_str(&text).unwrap();
    let mut schema = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == version)
        .unwrap_or_else(|| panic!("{file} has no version {version}"))["schema"]["openAPIV3Schema"]
        .clone();
    strict(&mut schema);
    schema
}

/// Kubernetes' own (strict) JSON Schema of an API type, e.g. io.k8s.api.core.v1.PodTemplateSpec.
fn kubernetes_schema(definitions: &Value, type_name: &str) -> Value {
    assert!(definitions["$defs"].get(type_name).is_some(), "no Kubernetes type {type_name}");
    json!({"$defs": definitions["$defs"], "$ref": format!("#/$defs/{type_name}")})
}

fn kubernetes_definitions() -> Value {
    let path = repo().join("tests/fixtures/kubernetes/v1.37.0-strict-definitions.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The problems `instance` has against `schema`, one line each.
fn problems(schema: &Value, instance: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(schema).expect("schema compiles");
    validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

/// Validates one manifest document: a custom resource against its CRD (made strict) and the Kubernetes types
/// embedded in it (pod templates, object metadata) against Kubernetes' own schemas; a core object against its
/// Kubernetes schema. Returns the problems found.
fn validate(doc: &Value, crds: &[(&str, &str, Value)], k8s: &Value) -> Vec<String> {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let mut found = Vec::new();
    let mut check = |schema: &Value, instance: &Value, what: &str| {
        found.extend(problems(schema, instance).into_iter().map(|p| format!("{what}: {p}")));
    };
    let core = match (api, kind) {
        ("v1", "PersistentVolumeClaim") => Some("io.k8s.api.core.v1.PersistentVolumeClaim"),
        ("v1", "ServiceAccount") => Some("io.k8s.api.core.v1.ServiceAccount"),
        ("v1", "Service") => Some("io.k8s.api.core.v1.Service"),
        ("apps/v1", "Deployment") => Some("io.k8s.api.apps.v1.Deployment"),
        ("storage.k8s.io/v1", "StorageClass") => Some("io.k8s.api.storage.v1.StorageClass"),
        _ => None,
    };
    if let Some(type_name) = core {
        check(&kubernetes_schema(k8s, type_name), doc, kind);
        return found;
    }
    let Some((_, _, schema)) = crds.iter().find(|(a, k, _)| *a == api && *k == kind) else {
        return vec![format!("no schema for {api} {kind}: add its CRD under tests/fixtures/crds")];
    };
    check(schema, doc, kind);
    check(&kubernetes_schema(k8s, "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), &doc["metadata"], "metadata");
    let pod_template = kubernetes_schema(k8s, "io.k8s.api.core.v1.PodTemplateSpec");
    match kind {
        "PyTorchJob" => {
            for (replica, spec) in doc["spec"]["pytorchReplicaSpecs"].as_object().into_iter().flatten() {
                check(&pod_template, &spec["template"], &format!("{replica} pod template"));
            }
        }
        "TrainingRuntime" => {
            let job_template = kubernetes_schema(k8s, "io.k8s.api.batch.v1.JobTemplateSpec");
            for job in doc["spec"]["template"]["spec"]["replicatedJobs"].as_array().into_iter().flatten() {
                check(&job_template, &job["template"], &format!("replicated job {}", job["name"]));
            }
        }
        "TrainJob" => {
            let resources = kubernetes_schema(k8s, "io.k8s.api.core.v1.ResourceRequirements");
            check(&resources, &doc["spec"]["trainer"]["resourcesPerNode"], "resourcesPerNode");
        }
        _ => {}
    }
    found
}

fn schemas() -> (Vec<(&'static str, &'static str, Value)>, Value) {
    let crds = vec![
        ("kubeflow.org/v1", "PyTorchJob", crd_schema("kubeflow.org_pytorchjobs.yaml", "v1")),
        ("trainer.kubeflow.org/v1alpha1", "TrainJob", crd_schema("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1")),
        (
            "trainer.kubeflow.org/v1alpha1",
            "TrainingRuntime",
            crd_schema("trainer.kubeflow.org_trainingruntimes.yaml", "v1alpha1"),
        ),
    ];
    (crds, kubernetes_definitions())
}

#[test]
fn every_kubeflow_manifest_validates_against_its_crd_and_the_kubernetes_schemas() {
    let (crds, k8s) = schemas();
    let docs = manifests();
    let mut all = Vec::new();
    for (file, doc) in &docs {
        for p in validate(doc, &crds, &k8s) {
            all.push(format!("{file} {} {}: {p}", doc["kind"], doc["metadata"]["name"]));
        }
    }
    assert!(all.is_empty(), "manifest problems:\n{}", all.join("\n"));
    let kinds: std::collections::BTreeSet<&str> = docs.iter().filter_map(|(_, d)| d["kind"].as_str()).collect();
    for kind in [
        "PyTorchJob",
        "TrainJob",
        "TrainingRuntime",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "StorageClass",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(kind), "no {kind} among the manifests");
    }
}

#[test]
fn the_validation_rejects_misspelled_fields_wrong_types_and_missing_containers() {
    // The same check must fail on the mistakes people make, or its passing above means nothing.
    let (crds, k8s) = schemas();
    let docs = manifests();
    let (_, job) = docs.iter().find(|(f, _)| f == "pytorchjob-cpu-efs.yaml").unwrap();
    let master = "/spec/pytorchReplicaSpecs/Master";
    type Breakage = Box<dyn Fn(&mut Value)>;
    let broken: Vec<(&str, Breakage)> = vec![
        (
            "restartpolicy",
            Box::new(move |j: &mut Value| {
                let m = j.pointer_mut(master).unwrap().as_object_mut().unwrap();
                let v = m.remove("restartPolicy").unwrap();
                m.insert("restartpolicy".into(), v);
            }),
        ),
        (
            "replicas",
            Box::new(move |j: &mut Value| {
                *j.pointer_mut(&format!("{master}/replicas")).unwrap() = json!("one");
            }),
        ),
        (
            "containers",
            Box::new(move |j: &mut Value| {
                j.pointer_mut(&format!("{master}/template/spec"))
                    .unwrap()
                    .as_object_mut()
                    .unwrap()
                    .remove("containers");
            }),
        ),
        (
            "volumeMount",
            Box::new(move |j: &mut Value| {
                let c = j.pointer_mut(&format!("{master}/template/spec/containers/0")).unwrap();
                c.as_object_mut().unwrap().insert("volumeMount".into(), json!([]));
            }),
        ),
        (
            "cpu",
            Box::new(move |j: &mut Value| {
                *j.pointer_mut(&format!("{master}/template/spec/containers/0/resources/limits")).unwrap() =
                    json!({"cpu": [1]});
            }),
        ),
    ];
    for (what, breakage) in broken {
        let mut doc = job.clone();
        breakage(&mut doc);
        let found = validate(&doc, &crds, &k8s);
        assert!(!found.is_empty(), "a PyTorchJob with a broken {what} passed validation");
    }
    let mut claim = docs.iter().find(|(_, d)| d["kind"] == "PersistentVolumeClaim").unwrap().1.clone();
    claim["spec"]["accessMode"] = json!(["ReadWriteMany"]);
    assert!(!validate(&claim, &crds, &k8s).is_empty(), "a claim with accessMode (not accessModes) passed");
}

/// The containers of a PyTorchJob's replicas or of a Deployment's pods.
fn containers_of(doc: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    if let Some(specs) = doc["spec"]["pytorchReplicaSpecs"].as_object() {
        for spec in specs.values() {
            out.extend(spec["template"]["spec"]["containers"].as_array().into_iter().flatten());
        }
    }
    if doc["kind"] == "Deployment" {
        out.extend(doc["spec"]["template"]["spec"]["containers"].as_array().into_iter().flatten());
    }
    out
}

#[test]
fn pytorchjobs_are_the_reference_job_shape_in_every_variant() {
    let docs = manifests();
    // The elastic job has a shape of its own (see the_elastic_job_reaches_its_standalone_store_...).
    let jobs: Vec<&(String, Value)> =
        docs.iter().filter(|(_, d)| d["kind"] == "PyTorchJob" && d["spec"].get("elasticPolicy").is_none()).collect();
    let files: Vec<&str> = jobs.iter().map(|(f, _)| f.as_str()).collect();
    for variant in
        ["pytorchjob-cpu-efs.yaml", "pytorchjob-gpu-efs.yaml", "pytorchjob-cpu-s3.yaml", "pytorchjob-gpu-s3.yaml"]
    {
        assert!(files.contains(&variant), "{variant} missing: {files:?}");
    }
    let accounts: Vec<&Value> = docs.iter().filter(|(_, d)| d["kind"] == "ServiceAccount").map(|(_, d)| d).collect();
    for (file, job) in jobs {
        let specs = &job["spec"]["pytorchReplicaSpecs"];
        assert_eq!(specs["Master"]["replicas"], 1, "{file}");
        assert_eq!(specs["Worker"]["replicas"], 2, "{file}");
        for replica in ["Master", "Worker"] {
            let spec = &specs[replica];
            assert_eq!(spec["restartPolicy"], "OnFailure", "{file} {replica}");
            assert_eq!(
                spec["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"], "false",
                "{file} {replica}"
            );
        }
        let gpu = file.contains("gpu");
        assert_eq!(job["spec"].get("nprocPerNode").is_some(), gpu, "{file}: nprocPerNode only on GPU variants");
        for c in containers_of(job) {
            // The operator finds its port and injects its variables only in the container named pytorch.
            assert_eq!(c["name"], "pytorch", "{file}");
            assert_eq!(c["ports"][0]["name"], "pytorchjob-port", "{file}");
            let command: Vec<&str> = c["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            if gpu {
                assert_eq!(command[..4], ["hytrain", "launch", "--nproc-per-node", "auto"], "{file}");
                assert!(c["resources"]["limits"]["nvidia.com/gpu"].is_number(), "{file}");
            } else {
                assert_eq!(command, ["hytrain", "train"], "{file}");
            }
        }
        let volumes: Vec<&Value> = ["Master", "Worker"]
            .iter()
            .flat_map(|r| specs[*r]["template"]["spec"]["volumes"].as_array().into_iter().flatten())
            .collect();
        let args: Vec<&str> =
            containers_of(job)[0]["args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        if file.contains("efs") {
            assert!(volumes
                .iter()
                .all(|v| v["name"] != "efs-sc-claim" || v["persistentVolumeClaim"]["claimName"] == "efs-sc-claim"));
            assert!(volumes.iter().any(|v| v["persistentVolumeClaim"]["claimName"] == "efs-sc-claim"), "{file}");
            assert!(args.iter().any(|a| a.starts_with("--data=/efs-sc-claim/")), "{file}: {args:?}");
            assert!(args.iter().any(|a| a.starts_with("--checkpoint-dir=/efs-sc-claim/")), "{file}: {args:?}");
        } else {
            assert!(args.iter().any(|a| a.starts_with("--data=s3://")), "{file}: {args:?}");
            // Checkpoints and the model go straight to S3: no pod needs a claim.
            for flag in ["--checkpoint-dir=s3://", "--model-dir=s3://"] {
                assert!(args.iter().any(|a| a.starts_with(flag)), "{file}: no {flag} in {args:?}");
            }
            assert!(
                volumes.iter().all(|v| v.get("persistentVolumeClaim").is_none()),
                "{file}: a claim is mounted: {volumes:?}"
            );
            for replica in ["Master", "Worker"] {
                let account = specs[replica]["template"]["spec"]["serviceAccountName"].as_str().unwrap();
                let sa = accounts
                    .iter()
                    .find(|a| a["metadata"]["name"] == account)
                    .unwrap_or_else(|| panic!("{file}: service account {account} is defined nowhere"));
                assert!(
                    sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("arn:aws:iam::")),
                    "{file}: {account} has no IRSA role"
                );
            }
        }
    }
    let (_, claim) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "PersistentVolumeClaim" && d["metadata"]["name"] == "efs-sc-claim")
        .expect("the efs-sc-claim claim");
    assert_eq!(claim["spec"]["storageClassName"], "efs-sc");
    assert_eq!(claim["spec"]["accessModes"][0], "ReadWriteMany");
}

/// A command line of a manifest as `hytrain` parses it: with `--help` appended, clap checks every argument before
/// it prints the help, so an unknown flag (or a value clap parses, like --nproc-per-node's) fails with exit 2,
/// without starting any training.
fn assert_hytrain_accepts(args: &[&str], what: &str) {
    let mut all = args.to_vec();
    all.push("--help");
    let out = common::run(&all, &[]);
    assert!(out.status.success(), "{what}: hytrain rejects {args:?}:\n{}", text(&out.stderr));
}

/// Splits `hytrain launch [OPTIONS] -- hytrain train ARGS` (or `hytrain train ARGS`) into hytrain's own command
/// lines.
fn hytrain_command_lines<'a>(command: &'a [&'a str], args: &'a [&'a str]) -> Vec<Vec<&'a str>> {
    let all: Vec<&str> = command.iter().chain(args).copied().collect();
    assert_eq!(all[0], "hytrain", "the container command must be the hytrain binary: {all:?}");
    match all.iter().position(|a| *a == "--") {
        Some(split) => {
            assert_eq!(all[split + 1], "hytrain", "{all:?}");
            vec![all[1..split].to_vec(), all[split + 2..].to_vec()]
        }
        None => vec![all[1..].to_vec()],
    }
}

#[test]
fn every_manifest_command_line_is_one_hytrain_accepts() {
    let docs = manifests();
    let mut checked = 0;
    for (file, doc) in &docs {
        let mut lines: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        let as_strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().map(|s| s.as_str().unwrap().to_string()).collect()
        };
        for c in containers_of(doc) {
            lines.push((as_strings(&c["command"]), as_strings(&c["args"])));
        }
        if doc["kind"] == "TrainJob" {
            let t = &doc["spec"]["trainer"];
            lines.push((as_strings(&t["command"]), as_strings(&t["args"])));
        }
        for (command, args) in &lines {
            let command: Vec<&str> = command.iter().map(String::as_str).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            for line in hytrain_command_lines(&command, &args) {
                assert_hytrain_accepts(&line, file);
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} command lines found");
    // The check itself rejects a flag hytrain does not have.
    let out = common::run(&["train", "--efs-dir-path=cifar10-dataset", "--help"], &[]);
    assert!(!out.status.success(), "a reference-only flag passed the check");
}

/// The `value` of the variable `name` in a container's env.
fn env_of<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {container}"))
}

#[test]
fn the_elastic_job_reaches_its_standalone_store_through_the_service_with_the_same_token() {
    let docs = manifests();
    let file = "pytorchjob-elastic-store.yaml";
    let doc = |kind: &str| &docs.iter().find(|(f, d)| f == file && d["kind"] == kind).unwrap().1;
    let (deployment, service, job) = (doc("Deployment"), doc("Service"), doc("PyTorchJob"));
    let store = containers_of(deployment)[0];
    assert_eq!(store["command"], json!(["hytrain", "rendezvous"]));
    assert_eq!(store["args"], json!(["--listen=0.0.0.0:29400"]));
    assert_eq!(store["ports"][0], json!({"name": "rendezvous", "containerPort": 29400}));
    assert_eq!(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "rendezvous");
    let policy = &job["spec"]["elasticPolicy"];
    assert_eq!(policy["rdzvHost"], service["metadata"]["name"]);
    assert_eq!(policy["rdzvPort"], service["spec"]["ports"][0]["port"]);
    let workers = &job["spec"]["pytorchReplicaSpecs"]["Worker"];
    let (min, max) = (policy["minReplicas"].as_u64().unwrap(), policy["maxReplicas"].as_u64().unwrap());
    assert!(min < max && workers["replicas"].as_u64() == Some(max), "{policy}");
    let worker = containers_of(job)[0];
    assert_eq!(env_of(worker, "HYTRAIN_JOB_TOKEN"), env_of(store, "HYTRAIN_JOB_TOKEN"), "one secret for both");
    // What hytrain makes of the variables the operator gives worker pods (no node rank): both join the store as
    // clients, and the store admits them as a range of nodes.
    let endpoint = format!("{}:{}", policy["rdzvHost"].as_str().unwrap(), policy["rdzvPort"]);
    for node in ["0", "1"] {
        let env = [
            ("PET_RDZV_ENDPOINT", endpoint.clone()),
            ("PET_NNODES", format!("{min}:{max}")),
            ("PET_MAX_RESTARTS", "3".to_string()),
            ("HOSTNAME", format!("hytrain-cifar10-elastic-worker-{node}")),
        ];
        let out = common::run(&["explain", "--json"], &env);
        let plan = common::json(&out);
        assert_eq!(
            plan["rendezvous"],
            json!({"store": "external", "host": "hytrain-rdzv", "port": 29400, "origin": "PET_RDZV_ENDPOINT"}),
            "pod {node}"
        );
        assert_eq!(plan["nnodes_range"], json!({"min": min, "max": max}), "pod {node}");
    }
}

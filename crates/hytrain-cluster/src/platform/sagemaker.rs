//! SageMaker: the plan from the training toolkit's `SM_*` variables, or with no toolkit at all from the files the
//! platform writes under `<root>/input/config`. A toolkit variable, when set, wins over the file it is derived
//! from, so a user can override one fact without rewriting the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::channel::{Channel, InputMode, S3Distribution};
use crate::env::Env;
use crate::error::{shown, DetectError};
use crate::launcher::{self, Launcher};
use crate::parse;
use crate::plan::{Distribution, InstanceGroup, Paths, Plan, SageMaker};
use crate::platform::{Platform, DEFAULT_MASTER_ADDR};
use crate::topology::Counts;

/// The master port hytrain uses on SageMaker when no toolkit set MASTER_PORT. Not 7777: the SageMaker
/// training toolkits give that port to their own launchers (torchrun, mpirun) as MASTER_PORT. Not 7592: SMDDP
/// (SageMaker's data-parallel library) listens there. 29500 is PyTorch's own default and is free on a SageMaker
/// host that runs no toolkit.
pub const SAGEMAKER_DEFAULT_MASTER_PORT: u16 = 29500;

/// The file SageMaker reads a failed job's reason from (its first 1024 characters become `FailureReason`),
/// inside the output directory.
const FAILURE_FILE: &str = "failure";

/// The job's output directory: `SM_OUTPUT_DIR`, else `<root>/output`.
fn output_dir(env: &Env, root: &Path) -> PathBuf {
    env.value("SM_OUTPUT_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("output"))
}

/// Where the failure reason goes when this process runs on SageMaker, decided from the markers alone, so that a
/// job whose configuration cannot be read still reports why.
pub(crate) fn failure_file(env: &Env, root: &Path) -> PathBuf {
    output_dir(env, root).join(FAILURE_FILE)
}

const RC_EXPECTED: &str =
    "resourceconfig.json's form, e.g. {\"current_host\":\"algo-1\",\"hosts\":[\"algo-1\",\"algo-2\"]}";
const IDC_EXPECTED: &str =
    "inputdataconfig.json's form, e.g. {\"training\":{\"TrainingInputMode\":\"File\",\"S3DistributionType\":\"FullyReplicated\"}}";

#[derive(Debug, Default, Deserialize)]
struct ResourceConfig {
    current_host: Option<String>,
    current_instance_type: Option<String>,
    current_group_name: Option<String>,
    hosts: Option<Vec<String>>,
    instance_groups: Option<Vec<ResourceGroup>>,
    network_interface_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResourceGroup {
    instance_group_name: Option<String>,
    instance_type: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ChannelConfig {
    #[serde(rename = "ContentType")]
    content_type: Option<String>,
    #[serde(rename = "TrainingInputMode")]
    training_input_mode: Option<String>,
    #[serde(rename = "S3DistributionType")]
    s3_distribution_type: Option<String>,
    #[serde(rename = "RecordWrapperType")]
    record_wrapper_type: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct CheckpointConfig {
    #[serde(rename = "LocalPath")]
    local_path: Option<String>,
    #[serde(rename = "S3Uri")]
    s3_uri: Option<String>,
}

/// A hyperparameters.json value: the SDK JSON-encodes each one, so decode it; a decoded string is the value,
/// anything else (number, bool, list) keeps its JSON text, and text that is not JSON is taken as it is.
pub(crate) fn decode_hyperparameter(raw: &str) -> String {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::String(s)) => s,
        _ => raw.to_owned(),
    }
}

/// A value of SM_HPS (already decoded by the toolkit): strings as they are, the rest as JSON text.
fn plain(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Checks a host list and sorts it as SageMaker does: as strings, so algo-10 comes before algo-2.
fn sorted_hosts(mut hosts: Vec<String>, origin: &str) -> Result<Vec<String>, DetectError> {
    if hosts.is_empty() {
        return Err(DetectError::EmptyHosts { origin: origin.into() });
    }
    for h in &hosts {
        if !parse::is_host_name(h) {
            return Err(DetectError::Malformed {
                origin: origin.into(),
                problem: format!("'{}' is not a host name", shown(h)),
                expected: "host names such as algo-1".into(),
            });
        }
    }
    hosts.sort();
    if let Some(w) = hosts.windows(2).find(|w| w[0] == w[1]) {
        return Err(DetectError::Malformed {
            origin: origin.into(),
            problem: format!("host \"{}\" is listed twice", w[0]),
            expected: "each host once".into(),
        });
    }
    Ok(hosts)
}

fn json_list(hosts: &[String]) -> String {
    serde_json::to_string(hosts).unwrap_or_default()
}

fn valid_channel_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

fn input_mode(origin: &str, channel: &str, v: Option<&str>) -> Result<InputMode, DetectError> {
    match v {
        None => Ok(InputMode::File),
        Some(m) => m.parse().map_err(|_: String| DetectError::Malformed {
            origin: origin.into(),
            problem: format!("channel \"{channel}\" has TrainingInputMode \"{}\"", shown(m)),
            expected: "File, FastFile or Pipe".into(),
        }),
    }
}

fn s3_distribution(origin: &str, channel: &str, v: Option<&str>) -> Result<S3Distribution, DetectError> {
    match v {
        None => Ok(S3Distribution::FullyReplicated),
        Some(d) if d.eq_ignore_ascii_case("FullyReplicated") => Ok(S3Distribution::FullyReplicated),
        Some(d) if d.eq_ignore_ascii_case("ShardedByS3Key") => Ok(S3Distribution::ShardedByS3Key),
        Some(d) => Err(DetectError::Malformed {
            origin: origin.into(),
            problem: format!("channel \"{channel}\" has S3DistributionType \"{}\"", shown(d)),
            expected: "FullyReplicated or ShardedByS3Key".into(),
        }),
    }
}

/// The toolkit's name for a channel's directory variable.
fn channel_var(name: &str) -> String {
    format!("SM_CHANNEL_{}", name.to_uppercase())
}

fn hyperparameters(
    env: &Env,
    config_dir: &Path,
    notes: &mut Vec<String>,
) -> Result<BTreeMap<String, String>, DetectError> {
    if let Some(v) = env.value("SM_HPS") {
        let map: BTreeMap<String, Value> =
            parse::json_var("SM_HPS", v, "a JSON object such as {\"epochs\":10,\"lr\":0.01}")?;
        return Ok(map.into_iter().map(|(k, v)| (k, plain(v))).collect());
    }
    let path = config_dir.join("hyperparameters.json");
    let file: Option<BTreeMap<String, Value>> =
        parse::json_file(&path, "a JSON object of JSON-encoded strings such as {\"epochs\":\"10\"}")?;
    if let Some(map) = file {
        return Ok(map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => decode_hyperparameter(&s),
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect());
    }
    let from_env: BTreeMap<String, String> = env
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("SM_HP_").map(|name| (name.to_lowercase(), decode_hyperparameter(v))))
        .collect();
    if !from_env.is_empty() {
        notes.push("hyperparameters taken from SM_HP_* variables; their names are lower-cased".into());
    }
    Ok(from_env)
}

fn distribution_groups(env: &Env, hps: &BTreeMap<String, String>) -> Result<(Vec<String>, String), DetectError> {
    let expected = "a JSON list of instance group names such as [\"train\"]";
    if let Some(v) = env.value("SM_DISTRIBUTION_INSTANCE_GROUPS") {
        let groups: Vec<String> = parse::json_var("SM_DISTRIBUTION_INSTANCE_GROUPS", v, expected)?;
        return Ok((groups, "SM_DISTRIBUTION_INSTANCE_GROUPS".into()));
    }
    let origin = "hyperparameter sagemaker_distribution_instance_groups".to_owned();
    let Some(v) = hps.get("sagemaker_distribution_instance_groups") else {
        return Ok((Vec::new(), origin));
    };
    let groups = match serde_json::from_str::<Value>(v) {
        Ok(Value::Array(items)) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                other => Err(DetectError::Malformed {
                    origin: origin.clone(),
                    problem: format!("{} is not a group name", shown(&other.to_string())),
                    expected: expected.into(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Ok(Value::String(s)) => vec![s],
        Err(_) => vec![v.clone()],
        Ok(other) => {
            return Err(DetectError::Malformed {
                origin,
                problem: format!("{} is not a list of group names", shown(&other.to_string())),
                expected: expected.into(),
            })
        }
    };
    Ok((groups, origin))
}

#[derive(Debug, Deserialize)]
struct ToolkitGroup {
    instance_type: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
}

fn instance_groups(
    env: &Env,
    rc: &ResourceConfig,
    rc_origin: &str,
    hosts: &[String],
) -> Result<BTreeMap<String, InstanceGroup>, DetectError> {
    // (name, instance type, hosts) of every group, from the toolkit's dict or the file's list.
    type Raw = Vec<(String, Option<String>, Vec<String>)>;
    let (raw, origin): (Raw, String) = if let Some(v) = env.value("SM_INSTANCE_GROUPS_DICT") {
        let map: BTreeMap<String, ToolkitGroup> = parse::json_var(
            "SM_INSTANCE_GROUPS_DICT",
            v,
            "a JSON object of groups such as {\"train\":{\"instance_type\":\"ml.p4d.24xlarge\",\"hosts\":[\"algo-1\"]}}",
        )?;
        let raw = map.into_iter().map(|(k, g)| (k, g.instance_type, g.hosts)).collect();
        (raw, "SM_INSTANCE_GROUPS_DICT".into())
    } else {
        let raw = rc
            .instance_groups
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, g)| {
                let name = g.instance_group_name.clone().unwrap_or_else(|| format!("group-{i}"));
                (name, g.instance_type.clone(), g.hosts.clone())
            })
            .collect();
        (raw, rc_origin.into())
    };
    let mut groups = BTreeMap::new();
    for (name, instance_type, mut group_hosts) in raw {
        if let Some(h) = group_hosts.iter().find(|h| !hosts.contains(h)) {
            return Err(DetectError::Malformed {
                origin,
                problem: format!(
                    "instance group \"{name}\" lists host \"{}\" which is not in hosts {}",
                    shown(h),
                    json_list(hosts)
                ),
                expected: "instance groups whose hosts are among the job's hosts".into(),
            });
        }
        group_hosts.sort();
        groups.insert(name, InstanceGroup { instance_type, hosts: group_hosts });
    }
    Ok(groups)
}

fn channels(env: &Env, root: &Path, config_dir: &Path) -> Result<BTreeMap<String, Channel>, DetectError> {
    let (configs, origin): (BTreeMap<String, ChannelConfig>, String) = match env.value("SM_INPUT_DATA_CONFIG") {
        Some(v) => (parse::json_var("SM_INPUT_DATA_CONFIG", v, IDC_EXPECTED)?, "SM_INPUT_DATA_CONFIG".into()),
        None => {
            let path = config_dir.join("inputdataconfig.json");
            (parse::json_file(&path, IDC_EXPECTED)?.unwrap_or_default(), path.display().to_string())
        }
    };
    let listed: Vec<String> = match env.value("SM_CHANNELS") {
        Some(v) => parse::json_var("SM_CHANNELS", v, "a JSON list of channel names such as [\"training\"]")?,
        None => Vec::new(),
    };
    let names: BTreeSet<&str> = configs.keys().map(String::as_str).chain(listed.iter().map(String::as_str)).collect();
    let mut out = BTreeMap::new();
    for name in names {
        if !valid_channel_name(name) {
            return Err(DetectError::Malformed {
                origin: origin.clone(),
                problem: format!("\"{}\" is not a channel name", shown(name)),
                expected: "names of letters, digits, '.', '-' and '_' such as training".into(),
            });
        }
        let cfg = configs.get(name);
        let cfg_field = |f: fn(&ChannelConfig) -> &Option<String>| cfg.and_then(|c| f(c).as_deref());
        let path =
            env.value(&channel_var(name)).map(PathBuf::from).unwrap_or_else(|| root.join("input/data").join(name));
        out.insert(
            name.to_owned(),
            Channel {
                path,
                input_mode: input_mode(&origin, name, cfg_field(|c| &c.training_input_mode))?,
                s3_distribution: s3_distribution(&origin, name, cfg_field(|c| &c.s3_distribution_type))?,
                content_type: cfg_field(|c| &c.content_type).map(str::to_owned),
                record_wrapper_type: cfg_field(|c| &c.record_wrapper_type).map(str::to_owned),
            },
        );
    }
    Ok(out)
}

fn hp_flag(hps: &BTreeMap<String, String>, name: &str) -> bool {
    hps.get(name).is_some_and(|v| parse::truthy(v))
}

/// The plan of a process in a SageMaker training job.
pub(crate) fn plan(env: &Env, root: &Path, launcher: Launcher) -> Result<Plan, DetectError> {
    let mut notes = Vec::new();
    let config_dir = root.join("input/config");
    let rc_path = config_dir.join("resourceconfig.json");
    let (rc, rc_origin): (ResourceConfig, String) = match env.value("SM_RESOURCE_CONFIG") {
        Some(v) => (parse::json_var("SM_RESOURCE_CONFIG", v, RC_EXPECTED)?, "SM_RESOURCE_CONFIG".into()),
        None => (parse::json_file(&rc_path, RC_EXPECTED)?.unwrap_or_default(), rc_path.display().to_string()),
    };

    let (hosts, hosts_origin) = match env.value("SM_HOSTS") {
        Some(v) => (parse::host_list("SM_HOSTS", v)?, "SM_HOSTS".to_owned()),
        None => match &rc.hosts {
            Some(h) => (h.clone(), rc_origin.clone()),
            None => {
                return Err(DetectError::Missing {
                    var: "SM_HOSTS".into(),
                    hint: format!(
                        "SageMaker was detected but neither SM_HOSTS nor {} lists the job's hosts; SageMaker \
                         writes that file in every training job (set HYTRAIN_SM_ROOT if it lives elsewhere)",
                        rc_path.display()
                    ),
                })
            }
        },
    };
    let hosts = sorted_hosts(hosts, &hosts_origin)?;

    let (current_host, current_origin) = if let Some(v) = env.value("SM_CURRENT_HOST") {
        (v.to_owned(), "SM_CURRENT_HOST".to_owned())
    } else if let Some(h) = rc.current_host.as_deref().filter(|h| !h.is_empty()) {
        (h.to_owned(), rc_origin.clone())
    } else if let Some(v) = env.value("CURRENT_HOST") {
        (v.to_owned(), "CURRENT_HOST".to_owned())
    } else {
        return Err(DetectError::Missing {
            var: "SM_CURRENT_HOST".into(),
            hint: format!("{rc_origin} names no current_host either"),
        });
    };
    if !hosts.contains(&current_host) {
        return Err(DetectError::CurrentHostNotInHosts {
            origin: if current_origin == hosts_origin {
                current_origin
            } else {
                format!("{current_origin} and {hosts_origin}")
            },
            host: shown(&current_host),
            hosts: json_list(&hosts),
        });
    }

    let groups = instance_groups(env, &rc, &rc_origin, &hosts)?;
    let instance_group =
        env.value("SM_CURRENT_INSTANCE_GROUP").map(str::to_owned).or_else(|| rc.current_group_name.clone());
    let hps = hyperparameters(env, &config_dir, &mut notes)?;
    let (dist_groups, dist_origin) = distribution_groups(env, &hps)?;
    let dist_hosts: Vec<String> = if dist_groups.is_empty() {
        hosts.clone()
    } else {
        let mut set = BTreeSet::new();
        for g in &dist_groups {
            match groups.get(g) {
                Some(ig) => set.extend(ig.hosts.iter().cloned()),
                None => {
                    return Err(DetectError::Malformed {
                        origin: dist_origin,
                        problem: format!(
                            "names instance group \"{}\" which is not among the instance groups {}",
                            shown(g),
                            json_list(&groups.keys().cloned().collect::<Vec<_>>())
                        ),
                        expected: "names from resourceconfig.json's instance_groups".into(),
                    })
                }
            }
        }
        // BTreeSet order is string order: the order SageMaker ranks hosts in.
        set.into_iter().collect()
    };
    if dist_hosts.is_empty() {
        return Err(DetectError::EmptyHosts { origin: dist_origin });
    }
    let group_index = dist_hosts.iter().position(|h| *h == current_host);

    let (counts, topo_hosts, default_master) = match (launcher, group_index) {
        (Launcher::None, Some(i)) => (
            Counts {
                rank: i,
                local_rank: 0,
                world_size: dist_hosts.len(),
                local_world_size: 1,
                node_rank: i,
                nnodes: dist_hosts.len(),
            },
            dist_hosts.clone(),
            dist_hosts[0].clone(),
        ),
        (Launcher::None, None) => {
            notes.push(format!(
                "host {current_host} is outside the distribution instance groups {}; it runs alone (rank 0 of 1)",
                json_list(&dist_groups)
            ));
            (Counts::SINGLE, vec![current_host.clone()], DEFAULT_MASTER_ADDR.to_owned())
        }
        (_, index) => {
            let counts = if launcher == Launcher::Mpirun {
                launcher::mpi_counts(env, &mut notes)?
            } else {
                launcher::torchrun_counts(env)?
            };
            match index {
                Some(i) => {
                    if counts.nnodes != dist_hosts.len() || counts.node_rank != i {
                        notes.push(format!(
                            "the launcher says node {} of {} but this host is {} of {} in the sorted host list",
                            counts.node_rank,
                            counts.nnodes,
                            i,
                            dist_hosts.len()
                        ));
                    }
                    (counts, dist_hosts.clone(), dist_hosts[0].clone())
                }
                None => (counts, vec![current_host.clone()], DEFAULT_MASTER_ADDR.to_owned()),
            }
        }
    };

    // A toolkit exports MASTER_ADDR for the distribution group on every host; a host running alone must not
    // go looking for the group's store.
    let master_addr = match parse::opt_host(env, "MASTER_ADDR")? {
        Some(a) if launcher != Launcher::None || group_index.is_some() => {
            if a != default_master {
                notes.push(format!(
                    "MASTER_ADDR={a} is used, though the first host of the distribution group is {default_master}"
                ));
            }
            a
        }
        Some(a) => {
            notes.push(format!("MASTER_ADDR={a} ignored: this host trains alone"));
            default_master
        }
        None => default_master,
    };
    let master_port = match parse::opt_port(env, "MASTER_PORT")? {
        Some(p) => p,
        None => {
            notes.push(format!(
                "MASTER_PORT not set (no toolkit launcher): using {SAGEMAKER_DEFAULT_MASTER_PORT}; 7777 (toolkits) \
                 and 7592 (SMDDP) are reserved on SageMaker"
            ));
            SAGEMAKER_DEFAULT_MASTER_PORT
        }
    };

    let distribution = if hp_flag(&hps, "sagemaker_torch_distributed_enabled") {
        Distribution::TorchDistributed
    } else if hp_flag(&hps, "sagemaker_mpi_enabled") {
        Distribution::Mpi
    } else if hp_flag(&hps, "sagemaker_distributed_dataparallel_enabled")
        || hp_flag(&hps, "sagemaker_pytorch_ddp_enabled")
    {
        Distribution::Smddp
    } else {
        Distribution::None
    };
    let num_gpus = parse::opt_number(env, "SM_NUM_GPUS", "a GPU count such as 0 or 8")?;
    let num_cpus = parse::opt_number(env, "SM_NUM_CPUS", "a CPU count such as 4")?;
    let mpi_per_host = match hps.get("sagemaker_mpi_num_of_processes_per_host") {
        Some(v) => match parse::number(
            "hyperparameter sagemaker_mpi_num_of_processes_per_host",
            v,
            "a process count such as 8",
        )? {
            0 => {
                return Err(DetectError::Zero { var: "hyperparameter sagemaker_mpi_num_of_processes_per_host".into() })
            }
            n => Some(n),
        },
        None => None,
    };
    let nproc_per_node = match (group_index, mpi_per_host, distribution) {
        (None, _, _) => None,
        (Some(_), Some(n), _) => Some(n),
        (Some(_), None, Distribution::TorchDistributed | Distribution::Mpi) => num_gpus.map(|g| g.max(1)),
        (Some(_), None, _) => None,
    };

    let checkpoint: CheckpointConfig = parse::json_file(
        &config_dir.join("checkpointconfig.json"),
        "checkpointconfig.json's form, e.g. {\"LocalPath\":\"/opt/ml/checkpoints\",\"S3Uri\":\"s3://bucket/ckpt\"}",
    )?
    .unwrap_or_default();
    let output_dir = output_dir(env, root);
    let paths = Paths {
        channels: channels(env, root, &config_dir)?,
        model_dir: env.value("SM_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("model")),
        checkpoint_dir: Some(
            checkpoint
                .local_path
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("checkpoints")),
        ),
        output_data_dir: env.value("SM_OUTPUT_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("output/data")),
        failure_file: Some(output_dir.join(FAILURE_FILE)),
        output_dir,
    };

    let training_env: Option<Value> = env
        .value("SM_TRAINING_ENV")
        .map(|v| parse::json_var("SM_TRAINING_ENV", v, "the toolkit's JSON object describing the job"))
        .transpose()?;
    let job_name =
        env.value("TRAINING_JOB_NAME").or_else(|| env.value("SAGEMAKER_JOB_NAME")).map(str::to_owned).or_else(|| {
            training_env.as_ref().and_then(|t| t.get("job_name")).and_then(Value::as_str).map(str::to_owned)
        });
    let sagemaker = SageMaker {
        job_name,
        job_arn: env.value("TRAINING_JOB_ARN").map(str::to_owned),
        region: env.value("SAGEMAKER_REGION").or_else(|| env.value("AWS_REGION")).map(str::to_owned),
        network_interface_name: env.value("SM_NETWORK_INTERFACE_NAME").map(str::to_owned).or(rc.network_interface_name),
        current_instance_type: env.value("SM_CURRENT_INSTANCE_TYPE").map(str::to_owned).or(rc.current_instance_type),
        instance_group,
        instance_groups: groups,
        distribution_instance_groups: dist_groups,
        hosts,
        toolkit: ["SM_HOSTS", "SM_CURRENT_HOST", "SM_TRAINING_ENV"].iter().any(|v| env.has(v)),
        num_gpus,
        num_cpus,
        distribution,
        checkpoint_s3_uri: checkpoint.s3_uri,
    };

    Ok(Plan {
        platform: Platform::Sagemaker,
        launcher,
        topology: counts.topology(master_addr, master_port, topo_hosts, current_host),
        paths,
        hyperparameters: hps,
        sagemaker: Some(sagemaker),
        nproc_per_node,
        notes,
        host_aliases: BTreeMap::new(),
        job_token: Default::default(),
        rendezvous: Default::default(),
        nnodes_range: None,
        max_restarts: None,
        node_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyperparameters_are_json_decoded_with_raw_fallback() {
        assert_eq!(decode_hyperparameter("\"train.py\""), "train.py");
        assert_eq!(decode_hyperparameter("10"), "10");
        assert_eq!(decode_hyperparameter("true"), "true");
        assert_eq!(decode_hyperparameter("0.01"), "0.01");
        assert_eq!(decode_hyperparameter("[\"a\"]"), "[\"a\"]");
        assert_eq!(decode_hyperparameter("not json"), "not json");
        assert_eq!(decode_hyperparameter("\"quoted \\\"inner\\\"\""), "quoted \"inner\"");
    }

    #[test]
    fn hosts_sort_as_strings_like_sagemaker() {
        let hosts: Vec<String> = (1..=10).rev().map(|i| format!("algo-{i}")).collect();
        let sorted = sorted_hosts(hosts, "x").unwrap();
        assert_eq!(sorted[0], "algo-1");
        assert_eq!(sorted[1], "algo-10");
        assert_eq!(sorted[2], "algo-2");
    }

    #[test]
    fn channel_names_that_could_escape_the_data_dir_are_refused() {
        assert!(valid_channel_name("training"));
        assert!(valid_channel_name("val-2.a_b"));
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(!valid_channel_name(bad), "{bad}");
        }
    }
}

//! The `launcher_env` fuzz target's body: detection from an environment and a SageMaker /opt/ml tree that both come
//! from one byte string, so a fuzzer can mutate variables and config files together.
//!
//! The input is text (lossy UTF-8): `NAME=VALUE` lines first, then any of the sections `--- <file>` whose following
//! lines (up to the next section) are the content of `<root>/input/config/<file>` for the files SageMaker writes, or
//! of the job token file for `--- token`. `HYTRAIN_SM_ROOT` always points at the given root and
//! `HYTRAIN_JOB_TOKEN_FILE`, when set, at the token file in it, so an input cannot make detection read anything
//! else on the machine.

use std::path::Path;

use crate::{detect_from, Env, TOKEN_FILE_VAR};

/// The config files an input may supply, as SageMaker names them.
const CONFIG_FILES: [&str; 4] =
    ["hyperparameters.json", "resourceconfig.json", "inputdataconfig.json", "checkpointconfig.json"];

/// Runs detection on the environment and files `data` describes, with the SageMaker root at `root` (a scratch
/// folder the caller owns; its config files are replaced on every call). Panics only when detection breaks a
/// promise of this crate: an error message that is not one line, or a plan that does not round-trip through JSON.
pub fn detect_sectioned(data: &[u8], root: &Path) {
    let text = String::from_utf8_lossy(data);
    let mut env = Env::default();
    let mut files: Vec<(String, String)> = Vec::new();
    for line in text.split_inclusive('\n') {
        if let Some(name) = line.strip_prefix("--- ") {
            files.push((name.trim().to_owned(), String::new()));
        } else if let Some((_, content)) = files.last_mut() {
            content.push_str(line);
        } else if let Some((name, value)) = line.trim_end_matches('\n').split_once('=') {
            env.set(name, value);
        }
    }
    let config = root.join("input/config");
    let token = root.join("token");
    if std::fs::create_dir_all(&config).is_err() {
        return;
    }
    for name in CONFIG_FILES {
        let _ = std::fs::remove_file(config.join(name));
    }
    let _ = std::fs::remove_file(&token);
    for (name, content) in &files {
        let path = match name.as_str() {
            "token" => token.clone(),
            n if CONFIG_FILES.contains(&n) => config.join(n),
            _ => continue,
        };
        if std::fs::write(path, content).is_err() {
            return;
        }
    }
    env.set("HYTRAIN_SM_ROOT", root.to_string_lossy());
    if env.get(TOKEN_FILE_VAR).is_some() {
        env.set(TOKEN_FILE_VAR, token.to_string_lossy());
    }
    match detect_from(&env) {
        Ok(plan) => {
            let _ = plan.to_string();
            let json = serde_json::to_string(&plan).expect("a plan serializes");
            let back: crate::Plan = serde_json::from_str(&json).expect("a serialized plan reads back");
            assert_eq!(back, plan, "the plan `hytrain explain --json` prints reads back as the same plan");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "detection error is not one line: {msg:?}");
        }
    }
}

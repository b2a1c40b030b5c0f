//! Export of a trained model to the model directory (SM_MODEL_DIR or `--model-dir`): `model.safetensors`,
//! `model.pt` (TorchScript) where the model allows it, an exported model's packages, and `metadata.json`.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use tch::{Device, Kind};

use crate::model::{self, Model, TorchScriptSource};
use crate::{Result, TrainError};

/// The libtorch version this crate was built against, read from libtorch's `build-version` at build time.
pub const TORCH_VERSION: &str = match option_env!("HYTRAIN_LIBTORCH_VERSION") {
    Some(v) => v,
    None => "unknown",
};

/// One exported tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorInfo {
    /// PyTorch-style name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// libtorch dtype name.
    pub dtype: String,
}

/// What `metadata.json` records.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportMetadata {
    /// Model name.
    pub model: String,
    /// Number of output classes.
    pub num_classes: i64,
    /// One sample's shape, without the batch dimension.
    pub input_shape: Vec<i64>,
    /// hytrain's version.
    pub hytrain_version: String,
    /// libtorch's version.
    pub torch_version: String,
    /// How `model.pt` was made; `None` when it was not written.
    pub torchscript: Option<TorchScriptSource>,
    /// Why `model.pt` is missing, when it is.
    pub torchscript_error: Option<String>,
    /// The tensors in `model.safetensors`.
    pub tensors: Vec<TensorInfo>,
    /// Compiled packages and their metadata (a model exported with `python -m hytrain_export`): the folder then
    /// also trains on with `hytrain train --model DIR`.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Whatever else the caller records (classes' names, final accuracy, configuration).
    pub extra: serde_json::Value,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TrainError + 'a {
    move |e| TrainError::io(action, path, e)
}

/// Writes `model_dir/model.safetensors` (every `state_dict` name, tied ones included), `model_dir/model.pt` (a
/// TorchScript module's own code, or a trace of a built-in model in eval mode; a model that cannot be traced gets
/// none, and metadata says why; an exported model writes its compiled packages instead) and
/// `model_dir/metadata.json`. Each file appears whole (written beside, fsynced, renamed). Only global rank 0 should
/// call it.
pub fn export(
    model: &dyn Model,
    model_dir: &Path,
    num_classes: i64,
    input_shape: &[i64],
    extra: serde_json::Value,
) -> Result<ExportMetadata> {
    fs::create_dir_all(model_dir).map_err(io("create", model_dir))?;
    let tensors = model::state_tensors(model);
    let mut host = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?)))
        .collect::<Result<Vec<_>, tch::TchError>>()
        .map_err(|e| TrainError::torch("preparing the model for export", e))?;
    for (alias, name) in model.tied_names() {
        // safetensors holds no shared tensors: the alias gets its own copy.
        if let Some(t) = host.iter().find(|(n, _)| *n == name).map(|(_, t)| t.copy()) {
            host.push((alias, t));
        }
    }
    let weights = model_dir.join("model.safetensors");
    let tmp = model_dir.join(".model.safetensors.tmp");
    tch::Tensor::write_safetensors(&host, &tmp)
        .map_err(|e| TrainError::torch(format!("writing {}", tmp.display()), e))?;
    commit(&tmp, &weights)?;

    let packages = model.write_packages(model_dir, "model.safetensors")?;
    let script = model_dir.join("model.pt");
    let script_tmp = model_dir.join(".model.pt.tmp");
    let example = model::example_input(input_shape, Kind::Float, model::device_of(model))?;
    let (torchscript, torchscript_error) = match model.save_torchscript(&script_tmp, &example) {
        Err(e) if model.compiled_step().is_some() => (None, Some(e.to_string())),
        Ok(source) => {
            commit(&script_tmp, &script)?;
            (Some(source), None)
        }
        Err(e) => {
            let _ = fs::remove_file(&script_tmp);
            tracing::warn!(model = model.name(), error = %e, "no TorchScript export; model.safetensors is written");
            (None, Some(e.to_string()))
        }
    };

    let meta = ExportMetadata {
        model: model.name().to_string(),
        num_classes,
        input_shape: input_shape.to_vec(),
        hytrain_version: env!("CARGO_PKG_VERSION").to_string(),
        torch_version: TORCH_VERSION.to_string(),
        torchscript,
        torchscript_error,
        tensors: host
            .iter()
            .map(|(n, t)| TensorInfo { name: n.clone(), shape: t.size(), dtype: format!("{:?}", t.kind()) })
            .collect(),
        packages,
        extra,
    };
    let meta_path = model_dir.join("metadata.json");
    let meta_tmp = model_dir.join(".metadata.json.tmp");
    let mut f = File::create(&meta_tmp).map_err(io("create", &meta_tmp))?;
    f.write_all(&serde_json::to_vec_pretty(&meta).expect("metadata serialises")).map_err(io("write", &meta_tmp))?;
    drop(f);
    commit(&meta_tmp, &meta_path)?;
    tracing::info!(dir = %model_dir.display(), torchscript = meta.torchscript.is_some(), "model exported");
    Ok(meta)
}

/// Sets `extra[key]` in the `metadata.json` that [`export`] wrote to `model_dir`, for what the caller knows only
/// beside the training loop (the data transforms inference must repeat). The file is rewritten whole, as
/// [`export`] writes it.
pub fn record_extra(model_dir: &Path, key: &str, value: serde_json::Value) -> Result<()> {
    let path = model_dir.join("metadata.json");
    let text = fs::read(&path).map_err(io("read", &path))?;
    let mut meta: ExportMetadata = serde_json::from_slice(&text)
        .map_err(|e| TrainError::io("parse", &path, std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    if !meta.extra.is_object() {
        meta.extra = serde_json::json!({});
    }
    meta.extra[key] = value;
    let tmp = model_dir.join(".metadata.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&meta).expect("metadata serialises")).map_err(io("write", &tmp))?;
    commit(&tmp, &path)
}

/// Uploads the model folder `local` that [`export`] wrote to `url` (`s3://bucket/prefix`), keeping its layout;
/// `metadata.json` goes last, so a reader that finds it finds the whole model. Files are read one at a time; each
/// is a multipart upload with parallel parts when large. Only global rank 0 should call it.
pub fn upload(local: &Path, url: &str, options: &hytrain_data::source::S3Options) -> Result<()> {
    let storage = |during: String| move |source| TrainError::Storage { during, source };
    let s3 = hytrain_data::source::S3::new(url.trim_end_matches('/'), options)
        .map_err(storage(format!("opening the model location {url}")))?;
    let mut files = Vec::new();
    let mut folders = vec![local.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in fs::read_dir(&folder).map_err(io("list", &folder))? {
            let path = entry.map_err(io("list", &folder))?.path();
            let name = path.strip_prefix(local).unwrap_or(&path).to_string_lossy().into_owned();
            if name.split('/').any(|part| part.starts_with('.')) {
                continue;
            }
            if path.is_dir() {
                folders.push(path);
            } else {
                files.push((name, path));
            }
        }
    }
    // metadata.json last; the rest in a stable order.
    files.sort_by_key(|(name, _)| (name == "metadata.json", name.clone()));
    let started = std::time::Instant::now();
    let mut bytes_sent = 0u64;
    for (name, path) in &files {
        let bytes = fs::read(path).map_err(io("read", path))?;
        bytes_sent += bytes.len() as u64;
        s3.put(name, bytes.into()).map_err(storage(format!("uploading {name} of the model to {url}")))?;
    }
    tracing::info!(
        url,
        files = files.len(),
        bytes = bytes_sent,
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        "model uploaded"
    );
    Ok(())
}

/// Makes `tmp` (written beside) `dest`: fsynced, renamed, the folder fsynced.
pub(crate) fn commit(tmp: &Path, dest: &Path) -> Result<()> {
    File::open(tmp).and_then(|f| f.sync_all()).map_err(io("fsync", tmp))?;
    fs::rename(tmp, dest).map_err(io("rename", tmp))?;
    if let Some(parent) = dest.parent() {
        File::open(parent).and_then(|f| f.sync_all()).map_err(io("fsync", parent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> ExportMetadata {
        ExportMetadata {
            model: "mlp".into(),
            num_classes: 2,
            input_shape: vec![3, 8, 8],
            hytrain_version: "0".into(),
            torch_version: "0".into(),
            torchscript: None,
            torchscript_error: None,
            tensors: vec![],
            packages: vec![],
            extra: serde_json::json!({ "config": { "lr": 0.1 } }),
        }
    }

    #[test]
    fn a_recorded_extra_joins_what_export_wrote() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("metadata.json"), serde_json::to_vec(&metadata()).unwrap()).unwrap();
        record_extra(dir.path(), "transform", serde_json::json!({ "crop": 8 })).unwrap();
        let meta: ExportMetadata =
            serde_json::from_slice(&fs::read(dir.path().join("metadata.json")).unwrap()).unwrap();
        assert_eq!(meta.extra, serde_json::json!({ "config": { "lr": 0.1 }, "transform": { "crop": 8 } }));
        assert_eq!(meta.input_shape, vec![3, 8, 8]);
    }

    #[test]
    fn recording_into_a_missing_or_broken_metadata_json_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = record_extra(dir.path(), "transform", serde_json::json!(1)).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("metadata.json"), "{e}");
        fs::write(dir.path().join("metadata.json"), "{ not json").unwrap();
        let e = record_extra(dir.path(), "transform", serde_json::json!(1)).unwrap_err().to_string();
        assert!(e.contains("cannot parse") && e.contains("metadata.json"), "{e}");
    }
}

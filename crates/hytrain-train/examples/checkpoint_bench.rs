//! hytrain's side of the checkpoint bench (`benches/checkpoint.py` in this crate, run by `cargo xtask bench --only
//! checkpoint`): saves and loads one state dict, read from a safetensors file the driver wrote, through
//! [`CheckpointStore`] and [`AsyncCheckpointer`], to an S3 prefix and to a folder, and prints one JSON line of
//! seconds per operation.
//!
//! ```text
//! cargo run --release -p hytrain-train --example checkpoint_bench -- STATE.safetensors --url s3://bucket/prefix
//!     --endpoint URL --access-key K --secret-key S --dir DIR [--runs N] [--stores s3,dir] [--part-size BYTES]
//!     [--max-in-flight N]
//! ```
//!
//! Each run, in this order: a synchronous save to S3 (`save`), the load of it (`latest_valid`, checksums
//! verified), a background save to S3 (the seconds the caller is held by [`AsyncCheckpointer::save`], then the
//! wait for the write), and the same three to the folder. Every load is checked to equal the state bit for bit,
//! outside the timing.

use std::path::PathBuf;
use std::time::Instant;

use hytrain_data::source::{S3Credentials, S3Options};
use hytrain_train::{AsyncCheckpointer, Checkpoint, CheckpointMeta, CheckpointStore, RngState, Schedule};
use tch::Tensor;

fn main() {
    if let Err(e) = run() {
        eprintln!("checkpoint_bench: {e}");
        std::process::exit(1);
    }
}

struct Args {
    state: PathBuf,
    url: String,
    dir: PathBuf,
    runs: usize,
    /// Which stores to measure: "s3", "dir" or both.
    stores: Vec<String>,
    s3: S3Options,
}

fn parse() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut state, mut url, mut dir, mut runs) = (None, None, None, 1usize);
    let mut stores = vec!["s3".to_string(), "dir".to_string()];
    let (mut access_key, mut secret_key) = (None, None);
    let mut s3 = S3Options { region: Some("us-east-1".into()), ..S3Options::default() };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--url" => url = Some(value()?),
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--runs" => runs = value()?.parse()?,
            "--stores" => stores = value()?.split(',').map(str::to_string).collect(),
            "--endpoint" => s3.endpoint = Some(value()?),
            "--access-key" => access_key = Some(value()?),
            "--secret-key" => secret_key = Some(value()?),
            "--part-size" => s3.part_size = value()?.parse()?,
            "--max-in-flight" => s3.max_in_flight = value()?.parse()?,
            _ if state.is_none() && !arg.starts_with("--") => state = Some(PathBuf::from(arg)),
            _ => return Err(format!("unknown argument {arg}").into()),
        }
    }
    let usage = "usage: checkpoint_bench STATE.safetensors --url s3://bucket/prefix --dir DIR [options]";
    if let (Some(access_key_id), Some(secret_access_key)) = (access_key, secret_key) {
        s3.credentials = Some(S3Credentials { access_key_id, secret_access_key, session_token: None });
    }
    Ok(Args { state: state.ok_or(usage)?, url: url.ok_or(usage)?, dir: dir.ok_or(usage)?, runs, stores, s3 })
}

fn checkpoint(model: &[(String, Tensor)], step: u64) -> Checkpoint {
    Checkpoint {
        model: model.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
        optimizer: Vec::new(),
        meta: CheckpointMeta {
            step,
            epoch: 0,
            data_position: serde_json::Value::Null,
            rng: RngState::default(),
            config: serde_json::Value::Null,
            schedule: Schedule::Constant,
            model: "bench".into(),
            optimizer: "none".into(),
            grad_scaler: None,
        },
    }
}

/// Seconds `f` takes, and what it returned.
fn timed<T>(f: impl FnOnce() -> hytrain_train::Result<T>) -> hytrain_train::Result<(f64, T)> {
    let started = Instant::now();
    let out = f()?;
    Ok((started.elapsed().as_secs_f64(), out))
}

/// Seconds of each operation, per run, for one store.
#[derive(Default)]
struct Times {
    save: Vec<f64>,
    load: Vec<f64>,
    async_held: Vec<f64>,
    async_write: Vec<f64>,
}

impl Times {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "save": self.save, "load": self.load, "async_held": self.async_held, "async_write": self.async_write,
        })
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // RUST_LOG=info shows the stores' own timings (an S3 save's upload seconds), for a breakdown.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = parse()?;
    let mut state = Tensor::read_safetensors(&args.state)?;
    state.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes: usize = state.iter().map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum();
    let stores = [("s3", CheckpointStore::s3(&args.url, &args.s3, 1)?), ("dir", CheckpointStore::new(&args.dir, 1)?)];
    let mut out = serde_json::Map::new();
    let mut step = 0u64;
    for (name, store) in stores.into_iter().filter(|(name, _)| args.stores.iter().any(|s| s == name)) {
        let mut times = Times::default();
        let mut background = AsyncCheckpointer::new(store);
        for _ in 0..args.runs {
            step += 1;
            let store = background.store();
            let (secs, _) = timed(|| store.save(&checkpoint(&state, step)))?;
            times.save.push(secs);
            let (secs, resume) = timed(|| store.latest_valid())?;
            times.load.push(secs);
            let mut loaded = resume.ok_or("the checkpoint just saved was not found")?.checkpoint.model;
            loaded.sort_by(|a, b| a.0.cmp(&b.0));
            let same = loaded.len() == state.len()
                && loaded.iter().zip(&state).all(|((na, a), (nb, b))| na == nb && a.equal(b));
            if !same {
                return Err(format!("the checkpoint loaded from {name} differs from the state saved").into());
            }
            drop(loaded);
            step += 1;
            let ckpt = checkpoint(&state, step);
            let (secs, ()) = timed(|| background.save(&ckpt))?;
            times.async_held.push(secs);
            let (secs, _) = timed(|| background.finish())?;
            times.async_write.push(secs);
        }
        out.insert(name.into(), times.json());
    }
    out.insert("bytes".into(), bytes.into());
    out.insert("tensors".into(), state.len().into());
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

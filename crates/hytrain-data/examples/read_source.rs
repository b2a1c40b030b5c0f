//! Reads every object of a source once, through `Source::read_many`, and prints one JSON line with the bytes,
//! objects and seconds. The benchmark driver `benches/s3_read.py` runs it against a folder and the local S3 server.
//!
//! ```text
//! cargo run --release -p hytrain-data --example read_source -- SPEC [--endpoint URL --access-key K --secret-key S]
//!     [--prefetch N] [--max-in-flight N] [--part-size BYTES] [--repeat N]
//! ```

use std::time::Instant;

use hytrain_data::source::{self, OpenOptions, S3Credentials};

fn main() {
    if let Err(e) = run() {
        eprintln!("read_source: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut spec = None;
    let mut opts = OpenOptions::default();
    let (mut access_key, mut secret_key, mut repeat) = (None, None, 1usize);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--endpoint" => opts.s3.endpoint = Some(value()?),
            "--region" => opts.s3.region = Some(value()?),
            "--access-key" => access_key = Some(value()?),
            "--secret-key" => secret_key = Some(value()?),
            "--prefetch" => opts.s3.prefetch = value()?.parse()?,
            "--max-in-flight" => opts.s3.max_in_flight = value()?.parse()?,
            "--part-size" => opts.s3.part_size = value()?.parse()?,
            "--repeat" => repeat = value()?.parse()?,
            _ if spec.is_none() && !arg.starts_with("--") => spec = Some(arg),
            _ => return Err(format!("unknown argument {arg}").into()),
        }
    }
    let spec = spec.ok_or("usage: read_source SPEC [options]")?;
    if let (Some(access_key_id), Some(secret_access_key)) = (access_key, secret_key) {
        opts.s3.credentials = Some(S3Credentials { access_key_id, secret_access_key, session_token: None });
    }
    let source = source::open(&spec, &opts)?;
    for _ in 0..repeat {
        let started = Instant::now();
        let names: Vec<String> = source.list()?.into_iter().map(|o| o.name).collect();
        let objects = names.len();
        let mut bytes = 0u64;
        for object in source.read_many(names) {
            bytes += object?.1.len() as u64;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!("{{\"spec\": \"{spec}\", \"objects\": {objects}, \"bytes\": {bytes}, \"seconds\": {seconds:.6}}}");
    }
    Ok(())
}

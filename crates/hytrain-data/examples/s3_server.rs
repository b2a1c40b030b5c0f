//! Serves a folder over the S3 protocol on loopback: s3s-fs with SigV4 checked against fixed test credentials.
//! Each subfolder of ROOT is a bucket. Used by `benches/s3_read.py`, so Python clients (boto3, s3torchconnector)
//! and hytrain read from the same server; also handy to try `--data s3://...` by hand.
//!
//! ```text
//! cargo run --release -p hytrain-data --example s3_server -- ROOT [--port 0] [--threads 4]
//! ```
//! Prints one line `endpoint=http://127.0.0.1:PORT access_key=... secret_key=...` and serves until its standard
//! input closes (or it is killed).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut root = None;
    let (mut port, mut threads) = (0u16, 4usize);
    while let Some(arg) = args.next() {
        let mut value = |what: &str| {
            args.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| {
                eprintln!("s3_server: {what} needs a number");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--port" => port = value("--port") as u16,
            "--threads" => threads = value("--threads") as usize,
            _ if root.is_none() && !arg.starts_with('-') => root = Some(std::path::PathBuf::from(arg)),
            _ => {
                eprintln!("usage: s3_server ROOT [--port N] [--threads N]");
                std::process::exit(2)
            }
        }
    }
    let Some(root) = root else {
        eprintln!("usage: s3_server ROOT [--port N] [--threads N]");
        std::process::exit(2)
    };
    if let Err(e) = std::fs::create_dir_all(&root) {
        eprintln!("s3_server: cannot create {}: {e}", root.display());
        std::process::exit(1)
    }
    let server = support::LocalS3::start_on(&root, &format!("127.0.0.1:{port}"), threads.max(1));
    println!("endpoint={} access_key={} secret_key={}", server.endpoint(), support::ACCESS_KEY, support::SECRET_KEY);
    std::io::stdout().flush().ok();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

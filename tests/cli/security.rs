//! The job token with the real `hytrain` binary as separate processes: a rank with the wrong token is refused and
//! the job fails fast, hostile clients at the rendezvous port change nothing, and neither `explain` nor the logs
//! ever show the token.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hytrain_comm::testing::free_port;

const RIGHT: &str = "right-token-0f3a9c51e7d2b864";
const WRONG: &str = "wrong-token-7c1e5a93d0b2f468";
/// Every process here must end well within this, or the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(120);

fn hytrain() -> &'static str {
    env!("CARGO_BIN_EXE_hytrain")
}

/// The binary with only PATH from the test runner's environment, plus `env`.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(hytrain());
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HYTRAIN_SM_ROOT", "/nonexistent/hytrain-security-test");
    c.envs(env.iter().copied());
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn wait(mut child: Child, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{what} still running after {LIMIT:?}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn connect_when_listening(port: u16) -> TcpStream {
    let until = Instant::now() + LIMIT;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > until => panic!("rank 0 never listened on {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Whether the server closed `s` (rather than leaving it open) within 30 s.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn a_launched_worker_with_the_wrong_token_makes_the_job_fail_fast_naming_the_master() {
    let port = free_port().to_string();
    let script = r#"if [ "$LOCAL_RANK" = 1 ]; then export HYTRAIN_JOB_TOKEN="$WRONG_TOKEN"; fi; exec "$0" doctor --sizes 4KiB --iters 1"#;
    let started = Instant::now();
    let out = wait(
        command(
            &["launch", "--nproc-per-node", "2", "--master-port", &port, "--", "/bin/sh", "-c", script, hytrain()],
            &[
                ("HYTRAIN_JOB_TOKEN", RIGHT),
                // Not on the command line, which the launcher logs.
                ("WRONG_TOKEN", WRONG),
                // Without the token check failing fast, rank 0 would wait this long for the missing rank.
                ("HYTRAIN_RENDEZVOUS_TIMEOUT", "100"),
            ],
        )
        .spawn()
        .unwrap(),
        "hytrain launch",
    );
    let all = text(&out);
    assert!(!out.status.success(), "the job succeeded:\n{all}");
    assert!(started.elapsed() < Duration::from_secs(60), "the job took {:?} to fail:\n{all}", started.elapsed());
    assert!(
        all.contains(&format!("rank 1: job token mismatch with the rendezvous store at 127.0.0.1:{port}")),
        "{all}"
    );
    assert!(!all.contains(RIGHT) && !all.contains(WRONG), "a token leaked:\n{all}");
}

#[test]
fn hostile_clients_at_the_rendezvous_port_change_nothing_and_no_log_shows_the_token() {
    let port = free_port().to_string();
    let rank = |r: &str, token: &str| {
        command(
            &["--log-level", "trace", "doctor", "--sizes", "64KiB", "--iters", "1", "--json"],
            &[
                ("RANK", r),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &port),
                ("HYTRAIN_JOB_TOKEN", token),
                ("HYTRAIN_RENDEZVOUS_TIMEOUT", "100"),
            ],
        )
        .spawn()
        .unwrap()
    };
    let master = rank("0", RIGHT);
    let port: u16 = port.parse().unwrap();

    // Connects and stays silent while the job runs.
    let silent = connect_when_listening(port);
    let mut garbage = connect_when_listening(port);
    garbage.write_all(&[0xAB; 4096]).unwrap();
    assert!(closed_by_server(&mut garbage), "garbage was not dropped");
    let mut huge = connect_when_listening(port);
    let mut frame = b"HYTSTOR3".to_vec();
    frame.extend_from_slice(&u64::MAX.to_le_bytes());
    huge.write_all(&frame).unwrap();
    assert!(closed_by_server(&mut huge), "a huge length prefix was not dropped");

    // A real hytrain process claiming rank 1 with the wrong token: refused at once, and it does not take rank 1's
    // place.
    let started = Instant::now();
    let impostor = wait(rank("1", WRONG), "the wrong-token rank");
    assert!(!impostor.status.success());
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    let impostor = text(&impostor);
    assert!(
        impostor.contains(&format!("rank 1: job token mismatch with the rendezvous store at 127.0.0.1:{port}")),
        "{impostor}"
    );

    let worker = wait(rank("1", RIGHT), "rank 1");
    let master = wait(master, "rank 0");
    let (w, m) = (text(&worker), text(&master));
    assert!(worker.status.success(), "rank 1 failed:\n{w}");
    assert!(master.status.success(), "rank 0 failed:\n{m}");
    let report: serde_json::Value = serde_json::from_slice(&master.stdout).unwrap();
    assert_eq!(report["ok"], true, "{m}");
    assert_eq!(report["world_size"], 2);
    assert!(
        m.contains("refused a rendezvous connection: job token mismatch"),
        "rank 0 did not report the refusal:\n{m}"
    );
    for log in [&w, &m, &impostor] {
        assert!(!log.contains(RIGHT) && !log.contains(WRONG), "a token leaked:\n{log}");
    }
    // It stayed connected the whole time without holding anyone up.
    drop(silent);
}

#[test]
fn explain_shows_where_the_token_comes_from_and_never_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job-token");
    std::fs::write(&file, format!("{RIGHT}\n")).unwrap();
    let file = file.to_str().unwrap();
    for (env, says) in [
        (("HYTRAIN_JOB_TOKEN_FILE", file), format!("job token:       from HYTRAIN_JOB_TOKEN_FILE ({file})")),
        (("HYTRAIN_JOB_TOKEN", RIGHT), "job token:       from HYTRAIN_JOB_TOKEN".to_owned()),
    ] {
        let out = wait(command(&["--log-level", "trace", "explain"], &[env]).spawn().unwrap(), "explain");
        let all = text(&out);
        assert!(out.status.success(), "{all}");
        assert!(all.contains(&says), "{all}");
        assert!(!all.contains(RIGHT), "the token leaked:\n{all}");
        let out = wait(command(&["explain", "--json"], &[env]).spawn().unwrap(), "explain --json");
        let all = text(&out);
        assert!(!all.contains(RIGHT), "the token leaked:\n{all}");
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let source = &plan["job_token"]["source"];
        assert!(source == "file" || source == "env", "{plan}");
    }
    let out = wait(command(&["explain"], &[("HYTRAIN_JOB_TOKEN", "zq9x")]).spawn().unwrap(), "explain");
    let all = text(&out);
    assert!(!out.status.success());
    assert!(all.contains("HYTRAIN_JOB_TOKEN: the job token holds only 4 bytes"), "{all}");
    assert!(!all.contains("zq9x"), "the token leaked:\n{all}");
}

#[test]
fn launch_gives_its_workers_one_fresh_token_and_they_show_only_its_source() {
    let out = wait(
        command(
            &["launch", "--nproc-per-node", "2", "--", "/bin/sh", "-c", r#"exec "$0" explain --json"#, hytrain()],
            &[],
        )
        .spawn()
        .unwrap(),
        "hytrain launch explain",
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    let plans: Vec<serde_json::Value> =
        serde_json::Deserializer::from_str(&stdout).into_iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(plans.len(), 2, "{stdout}");
    for p in &plans {
        assert_eq!(p["job_token"], serde_json::json!({"source": "launch"}), "{p}");
    }
    // The generated token is 64 hex digits; none may appear anywhere.
    let all = text(&out);
    let hex_run = all.split(|c: char| !c.is_ascii_hexdigit()).map(str::len).max().unwrap_or(0);
    assert!(hex_run < 32, "something token-like was printed:\n{all}");
}

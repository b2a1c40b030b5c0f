//! Credentials from the SDK's default chain that S3 rejects as expired are renewed through the chain, once per
//! request. The chain is the real one, read from a profile whose `credential_process` hands out a new session token
//! each time it runs; the server (s3s-fs) answers `ExpiredToken` when told to. The environment the chain reads is
//! process-wide, so this binary holds one test. Reads and uploads share the renewal.

mod support;

use std::path::Path;

use hytrain_data::source::{S3Options, Source, S3};
use hytrain_data::Error;
use support::{Fault, LocalS3, ACCESS_KEY, SECRET_KEY};

/// Points the default chain at a profile whose `credential_process` appends a line to `runs` each time it is asked.
fn credential_process_profile(dir: &Path) {
    let script = dir.join("credentials.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> '{runs}'\nn=$(wc -l < '{runs}')\n\
             printf '{{\"Version\": 1, \"AccessKeyId\": \"{ACCESS_KEY}\", \"SecretAccessKey\": \"{SECRET_KEY}\", \
             \"SessionToken\": \"session-%s\"}}' \"$n\"\n",
            runs = dir.join("runs").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = dir.join("config");
    std::fs::write(&config, format!("[profile hytrain-test]\ncredential_process = {}\n", script.display())).unwrap();
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE"] {
        std::env::remove_var(var);
    }
    std::env::set_var("AWS_CONFIG_FILE", &config);
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials-file"));
    std::env::set_var("AWS_PROFILE", "hytrain-test");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
}

fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs")).map_or(0, |s| s.lines().count())
}

#[test]
fn an_expired_token_is_renewed_through_the_credential_chain_and_the_request_retried_once() {
    let dir = tempfile::tempdir().unwrap();
    credential_process_profile(dir.path());
    let root = tempfile::tempdir().unwrap();
    let server = LocalS3::start(root.path());
    server.put("bkt", "ds/a.tar", b"hello");
    let opts = S3Options { credentials: None, ..server.options() };
    let source = S3::new("s3://bkt/ds", &opts).unwrap();
    source.list().unwrap();
    assert_eq!(runs(dir.path()), 1, "the chain's credentials were fetched once");

    server.faults.inject("GetObject", Fault::ExpiredToken, 1);
    assert_eq!(source.read("a.tar").unwrap(), b"hello");
    assert_eq!(server.faults.count("GetObject"), 2);
    assert_eq!(runs(dir.path()), 2, "the chain was not asked for new credentials");

    // Uploads (checkpoints and models sent to S3) renew the same way.
    server.faults.reset();
    server.faults.inject("PutObject", Fault::ExpiredToken, 1);
    source.put("ckpt/meta.json", bytes::Bytes::from_static(b"{}")).unwrap();
    assert_eq!(server.faults.count("PutObject"), 2);
    assert_eq!(runs(dir.path()), 3, "the upload did not renew the credentials");
    assert_eq!(std::fs::read(root.path().join("bkt/ds/ckpt/meta.json")).unwrap(), b"{}");

    // A token that S3 still calls expired after the renewal ends the read with what to check, after one renewal.
    server.faults.reset();
    server.faults.inject("GetObject", Fault::ExpiredToken, usize::MAX);
    let err = source.read("a.tar").unwrap_err();
    assert_eq!(server.faults.count("GetObject"), 2, "{err}");
    assert_eq!(runs(dir.path()), 4);
    let Error::AccessDenied { ref code, ref message, .. } = err else { panic!("{err:?}") };
    assert_eq!(code, "ExpiredToken");
    assert!(message.contains("renewed"), "{message}");
}

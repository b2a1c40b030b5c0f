//! `hytrain data` as a user runs it: the digest of a rank's batch stream is the same whichever layout the same
//! pixels arrive in, and bad sources fail with a clear line.

use crate::common;

use common::run;

fn fixture(name: &str) -> String {
    format!("{}/crates/hytrain-data/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `rank R: HEX` lines of `hytrain data digest` over 3 ranks and 2 epochs.
fn digests(data: &str, augment: bool) -> Vec<String> {
    let mut args = vec![
        "data",
        "digest",
        "--data",
        data,
        "--world-size",
        "3",
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--seed",
        "7",
    ];
    if augment {
        args.push("--augment");
    }
    let out = run(&args, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (rank, line) in lines.iter().enumerate() {
        let hex = line.strip_prefix(&format!("rank {rank}: ")).unwrap_or_else(|| panic!("{line}"));
        assert_eq!(hex.len(), 64, "{line}");
    }
    lines
}

fn pack(data: &str) -> tempfile::TempDir {
    let out_dir = tempfile::tempdir().unwrap();
    let out = run(&["data", "pack", "--data", data, "--out", &out_dir.path().display().to_string()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out_dir
}

#[test]
fn digests_agree_across_cifar_pickles_and_binary_files() {
    for augment in [false, true] {
        let reference = digests(&fixture("cifar-py2"), augment);
        assert_eq!(digests(&fixture("cifar-bin"), augment), reference);
        assert_eq!(digests(&fixture("cifar-py3"), augment), reference);
        // Ranks see different samples.
        assert_ne!(reference[0], reference[1]);
    }
    assert_ne!(digests(&fixture("cifar-py2"), true), digests(&fixture("cifar-py2"), false));
}

#[test]
fn shards_packed_from_either_cifar_layout_give_the_same_batches() {
    // Packing changes the shard layout (and so the shuffled order), but not what is in it.
    let from_pickles = pack(&fixture("cifar-py2"));
    let from_binary = pack(&fixture("cifar-bin"));
    for augment in [false, true] {
        assert_eq!(
            digests(&from_pickles.path().display().to_string(), augment),
            digests(&from_binary.path().display().to_string(), augment)
        );
    }
}

#[test]
fn inspect_reports_format_and_counts() {
    let out = run(&["data", "inspect", "--data", &fixture("mnist")], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("mnist") || text.contains("MNIST"), "{text}");
    assert!(text.contains("train:") && text.contains("test:"), "{text}");
}

#[test]
fn a_missing_folder_is_refused_naming_it() {
    let out = run(&["data", "digest", "--data", "/nonexistent/hytrain-dataset"], &[]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(stderr.starts_with("hytrain: error: "), "{stderr}");
    assert!(stderr.contains("/nonexistent/hytrain-dataset"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_rank_outside_the_world_is_refused() {
    let out = run(&["data", "digest", "--data", &fixture("cifar-bin"), "--world-size", "2", "--rank", "2"], &[]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(stderr.contains("--rank 2") && stderr.contains("--world-size 2"), "{stderr}");
}

#[test]
fn inspect_and_digest_cut_token_files_by_the_context_length_given() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u8> = (0u16..1001).flat_map(u16::to_le_bytes).collect();
    std::fs::write(dir.path().join("train.bin"), &ids).unwrap();
    std::fs::write(dir.path().join("val.bin"), &ids[..202]).unwrap();
    let data = dir.path().display().to_string();
    let out = run(&["data", "inspect", "--data", &data, "--context-length", "10"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("token ids")
            && text.contains("next token id")
            && text.contains("100 samples")
            && text.contains("10 samples"),
        "{text}"
    );
    let digest = |context: &str| {
        let out = run(&["data", "digest", "--data", &data, "--context-length", context, "--batch-size", "4"], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_ne!(digest("10"), digest("20"), "the context length cuts other windows");
    let out = run(&["data", "digest", "--data", &data], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--context-length N"), "{stderr}");
    let out = run(&["data", "digest", "--data", &data, "--context-length", "10", "--token-dtype", "int8"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("uint16, uint32"), "{stderr}");
}

#[test]
fn photos_of_different_sizes_digest_once_resized_and_cropped_and_bad_transforms_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shards = common::pack_images(&common::photo_folder(dir.path()), dir.path());
    let data = shards.to_str().unwrap();
    let digest = |extra: &[&str]| {
        let mut args = vec!["data", "digest", "--data", data, "--batch-size", "4", "--seed", "5"];
        args.extend(extra);
        run(&args, &[])
    };
    // Without a resize and a crop the sizes do not stack into one batch, and the error says what does.
    let out = digest(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("has shape") && stderr.contains("--resize N and --crop N"),
        "{stderr}"
    );
    let hex = |extra: &[&str]| {
        let out = digest(extra);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let plain = hex(&["--resize", "12", "--crop", "10"]);
    assert_eq!(plain, hex(&["--resize", "12", "--crop", "10"]), "the same flags give the same batches");
    let others = [
        hex(&["--resize", "12", "--crop", "10", "--augment"]),
        hex(&["--resize", "12", "--crop", "10", "--augment", "--crop-padding", "0"]),
        hex(&["--resize", "14", "--crop", "10"]),
        hex(&["--resize", "12", "--crop", "8"]),
        hex(&["--resize", "12", "--crop", "10", "--normalize", "none"]),
        hex(&["--resize", "12", "--crop", "10", "--normalize", "0.5,0.5,0.5/0.25,0.25,0.25"]),
    ];
    for (i, other) in others.iter().enumerate() {
        assert_ne!(*other, plain, "variant {i} changes the batches");
    }
    // `auto` spelled out is the default.
    assert_eq!(hex(&["--resize", "12", "--crop", "10", "--normalize", "auto"]), plain);

    let refused = |extra: &[&str], expected: &[&str]| {
        let out = digest(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for e in expected {
            assert!(stderr.contains(e), "{extra:?}: expected '{e}' in: {stderr}");
        }
    };
    let syntax = "MEAN,MEAN,MEAN/STD,STD,STD";
    refused(&["--resize", "12", "--crop", "10", "--normalize", "imagenet"], &[syntax, "'imagenet'"]);
    refused(&["--resize", "12", "--crop", "10", "--normalize", "0.5,0.5/0.2"], &[syntax, "2 means but 1 stds"]);
    refused(
        &["--resize", "12", "--crop", "10", "--normalize", "0.5,x,0.5/0.2,0.2,0.2"],
        &[syntax, "'x' is not a number"],
    );
    refused(&["--resize", "12", "--crop", "10", "--normalize", "0.5,0.5,0.5/0.2,0,0.2"], &[syntax, "above 0"]);
    // Three-channel photos with one channel's normalization.
    refused(
        &["--resize", "12", "--crop", "10", "--normalize", "0.5/0.2"],
        &["1 means and 1 stds for 3-channel images"],
    );
    refused(&["--resize", "0", "--crop", "10"], &["--resize", "at least 1"]);
    refused(&["--resize", "12", "--crop", "0"], &["--crop", "at least 1"]);
}

/// `hytrain data digest` of the 7-sample CIFAR fixture over 3 ranks, seed 3, `batch` samples a batch, plus `extra`.
fn three_ranks(batch: &str, extra: &[&str]) -> std::process::Output {
    let data = fixture("cifar-py2");
    let mut args = vec!["data", "digest", "--data", &data, "--world-size", "3", "--batch-size", batch, "--seed", "3"];
    args.extend_from_slice(extra);
    run(&args, &[])
}

/// The stdout of a digest run with `extra` that must have succeeded.
fn succeeded(extra: &[&str], out: std::process::Output) -> String {
    assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn digest_follows_the_stream_window_as_training_does_and_refuses_a_bad_one() {
    let digest = |extra: &[&str]| three_ranks("4", extra);
    let hex = |extra: &[&str]| succeeded(extra, digest(extra));
    let all_shuffled = hex(&[]);
    assert_eq!(hex(&["--stream-window", "off"]), all_shuffled, "off is the default");
    // Interleaved ranks read other samples than contiguous blocks.
    assert_ne!(hex(&["--stream-window", "2"]), all_shuffled);
    for bad in ["0", "two"] {
        let out = digest(&["--stream-window", bad]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--stream-window {bad} was accepted");
        assert!(stderr.contains("--stream-window") && stderr.contains("at least 1"), "{stderr}");
    }
}

#[test]
fn digest_of_a_regrouped_epoch_shares_what_the_earlier_ranks_left_and_refuses_a_bad_regroup() {
    let digest = |extra: &[&str]| three_ranks("1", extra);
    let hex = |extra: &[&str]| succeeded(extra, digest(extra));
    let plain = hex(&[]);
    // Three ranks that read nothing before three others took over leave each its whole share, in order.
    assert_eq!(hex(&["--regroup", "1:3x0"]), plain);
    // Its 7 samples: after four ranks read one each of their 2, the three share the 4 left: other samples.
    let regrouped = hex(&["--regroup", "1:4x1"]);
    assert_ne!(regrouped, plain);
    let nothing = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    assert!(!regrouped.contains(nothing), "a rank reads nothing: {regrouped}");
    assert_ne!(hex(&["--regroup", "1:4x1"]), hex(&["--regroup", "1:4x1", "--stream-window", "2"]));
    for (bad, says) in [
        (&["--regroup", "1:4"][..], "--regroup: '4' is not WxB"),
        (&["--regroup", "1:2x1000"][..], "more than their share"),
    ] {
        let out = digest(bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert!(stderr.contains(says), "{bad:?}: {stderr}");
    }
}

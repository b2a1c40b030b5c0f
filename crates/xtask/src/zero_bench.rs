//! `cargo xtask bench --only zero`: sharded training (issue 17) on a model whose optimizer state dominates, AdamW
//! on an MLP of about 50M float32 parameters (`mlp:4096,4096,4096,4096` on the digits' 1x8x8 input), at 2 and 4
//! ranks on this node: each rank's peak host memory and the step time of `hytrain train --shard
//! none|optimizer|gradients`, beside PyTorch's DistributedDataParallel alone and with ZeroRedundancyOptimizer
//! (benches/zero_memory.py under torchrun), all in the same run.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The MLP's hidden sizes: 64*4096 + 3*4096*4096 + 4096*10 weights and their biases, 50.65M parameters.
const HIDDEN: &str = "4096,4096,4096,4096";
/// Optimizer steps per run: the first [`WARMUP`] are not timed.
const STEPS: usize = 7;
const WARMUP: usize = 2;
const BATCH: usize = 32;

/// One run's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Peak resident host memory of each rank, in bytes, rank order.
    pub peak_bytes: Vec<f64>,
    /// Mean (PyTorch) or median (hytrain) seconds of one timed optimizer step.
    pub step_seconds: f64,
}

impl Measured {
    /// The largest rank's peak: what a node must hold room for, per rank.
    pub fn worst_peak(&self) -> f64 {
        self.peak_bytes.iter().copied().fold(0.0, f64::max)
    }
}

/// The hidden size of the tiny MLP whose run gives each side's baseline: the process's own memory (libtorch, or
/// Python and torch, the collectives' buffers) with next to no model state.
const TINY: &str = "8";

/// Runs every side at 2 and 4 ranks and appends the comparisons to the bench summary.
pub fn zero(root: &Path, python: &Path, summary_file: &Path) -> Result<()> {
    let digits = crate::demo_data::digits(root)?;
    println!("bench: building hytrain (release) for sharded training");
    let built = crate::build(root, &["--release", "--bin", "hytrain"])?;
    let hytrain = built
        .into_iter()
        .find_map(|(name, exe)| (name == "hytrain").then_some(exe))
        .context("cargo built no hytrain executable")?;
    let torchrun = python.with_file_name("torchrun");
    let scratch = std::env::temp_dir().join(format!("hytrain-zero-bench-{}", std::process::id()));
    let ours = |world: usize, shard: &str, hidden: &str| -> Result<Measured> {
        let out = scratch.join(format!("{shard}-{world}-{hidden}"));
        let mut c = Command::new(&hytrain);
        c.args(["launch", "--nproc-per-node", &world.to_string(), "--"])
            .arg(&hytrain)
            .args(["train", "--model", &format!("mlp:{hidden}"), "--data"])
            .arg(&digits)
            .args(["--optimizer", "adamw", "--lr", "0.0001", "--weight-decay", "0.01"])
            .args(["--batch-size", &BATCH.to_string(), "--max-steps", &STEPS.to_string()])
            .args(["--log-interval", "1", "--shard", shard, "--no-resume", "--validation", "none"])
            .args(["--model-dir", "none", "--checkpoint-dir", "none", "--output-dir"])
            .arg(&out)
            .env("OMP_NUM_THREADS", "1")
            .current_dir(root);
        println!("bench: {}", crate::show(&c));
        let output = c.output().with_context(|| format!("cannot run {}", hytrain.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "hytrain --shard {shard} on {world} ranks failed ({}):\n{stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let metrics = fs::read_to_string(out.join("metrics.jsonl"))
            .with_context(|| format!("hytrain wrote no {}", out.join("metrics.jsonl").display()))?;
        let measured = Measured {
            peak_bytes: peaks_by_rank(&stdout)?,
            step_seconds: median_step_seconds(&metrics, BATCH * world)?,
        };
        println!("bench:   hytrain mlp:{hidden} --shard {shard}, {world} ranks: {measured:?}");
        Ok(measured)
    };
    let theirs = |world: usize, mode: &str, hidden: &str| -> Result<Measured> {
        let mut c = Command::new(&torchrun);
        c.args(["--standalone", "--nproc-per-node", &world.to_string()])
            .arg(root.join("benches/zero_memory.py"))
            .args(["--mode", mode, "--hidden", hidden, "--batch-size", &BATCH.to_string()])
            .args(["--warmup", &WARMUP.to_string(), "--steps", &(STEPS - WARMUP).to_string()])
            .env("OMP_NUM_THREADS", "1")
            .current_dir(root);
        println!("bench: {}", crate::show(&c));
        let output = c.output().with_context(|| format!("cannot run {}", torchrun.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("zero_memory.py --mode {mode} failed ({}):\n{stdout}", output.status);
        }
        let measured = peer_figures(&stdout)?;
        println!("bench:   PyTorch {mode} {hidden}, {world} ranks: {measured:?}");
        Ok(measured)
    };
    for world in [2usize, 4] {
        let mut hy = Vec::new();
        for shard in ["none", "optimizer", "gradients"] {
            hy.push((shard, ours(world, shard, HIDDEN)?));
        }
        let mut py = Vec::new();
        for mode in ["ddp", "zero"] {
            py.push((mode, theirs(world, mode, HIDDEN)?));
        }
        let baselines = Baselines { hytrain: ours(world, "none", TINY)?, pytorch: theirs(world, "ddp", TINY)? };
        let _ = fs::remove_dir_all(&scratch);
        for row in rows(world, &hy, &py, Some(&baselines)) {
            crate::summarize(summary_file, row)?;
        }
    }
    Ok(())
}

/// Each side's run of the tiny MLP: what its processes hold without model state.
#[derive(Debug, Clone)]
pub struct Baselines {
    /// `hytrain train --model mlp:8 --shard none`.
    pub hytrain: Measured,
    /// zero_memory.py `--mode ddp --hidden 8`.
    pub pytorch: Measured,
}

/// The summary rows of one world size: each sharding's worst per-rank peak against hytrain's DDP and PyTorch's
/// ZeroRedundancyOptimizer, and its step time against hytrain's DDP (issue 17's targets apply at 4 ranks: ZeRO-2
/// at most 0.5x DDP's peak and at most PyTorch ZeRO's, step time at most 1.05x DDP's).
///
/// With `baselines`, also the model-state memory: each peak minus its side's tiny-MLP peak (what sharding can
/// shrink; the process's own memory it cannot), without targets: the are on the whole peak.
pub fn rows(
    world: usize,
    ours: &[(&str, Measured)],
    theirs: &[(&str, Measured)],
    baselines: Option<&Baselines>,
) -> Vec<serde_json::Value> {
    let find = |list: &[(&str, Measured)], key: &str| list.iter().find(|(k, _)| *k == key).map(|(_, m)| m.clone());
    let (Some(ddp), Some(torch_zero)) = (find(ours, "none"), find(theirs, "zero")) else {
        return Vec::new();
    };
    let at4 = |target: &str| if world == 4 { target.to_string() } else { String::new() };
    let title = format!("{world} ranks, AdamW MLP 50.7M params");
    let mut out = Vec::new();
    for (shard, zero) in [("optimizer", "ZeRO-1"), ("gradients", "ZeRO-2")] {
        let Some(m) = find(ours, shard) else { continue };
        let gib = |b: f64| b / (1u64 << 30) as f64;
        out.push(serde_json::json!({
            "comparison": format!("peak host memory per rank, --shard {shard} ({zero}), {title}"), "unit": "GiB",
            "higher_is_better": false, "hytrain": gib(m.worst_peak()), "peer_name": "hytrain --shard none (DDP)",
            "peer": gib(ddp.worst_peak()), "target": if shard == "gradients" { at4("<=0.5") } else { String::new() },
        }));
        out.push(serde_json::json!({
            "comparison": format!("peak host memory per rank, --shard {shard} ({zero}), {title}"), "unit": "GiB",
            "higher_is_better": false, "hytrain": gib(m.worst_peak()),
            "peer_name": "PyTorch DDP + ZeroRedundancyOptimizer", "peer": gib(torch_zero.worst_peak()),
            "target": if shard == "gradients" { at4("<=1") } else { String::new() },
        }));
        out.push(serde_json::json!({
            "comparison": format!("step time, --shard {shard} ({zero}), {title}"), "unit": "s",
            "higher_is_better": false, "hytrain": m.step_seconds, "peer_name": "hytrain --shard none (DDP)",
            "peer": ddp.step_seconds, "target": at4("<=1.05"),
        }));
    }
    if let Some(b) = baselines {
        let state = |m: &Measured, base: &Measured| (m.worst_peak() - base.worst_peak()).max(0.0) / (1u64 << 30) as f64;
        for (shard, zero) in [("optimizer", "ZeRO-1"), ("gradients", "ZeRO-2")] {
            let Some(m) = find(ours, shard) else { continue };
            out.push(serde_json::json!({
                "comparison": format!("model-state memory per rank (peak minus the tiny MLP's), --shard {shard} \
                                       ({zero}), {title}"),
                "unit": "GiB", "higher_is_better": false, "hytrain": state(&m, &b.hytrain),
                "peer_name": "hytrain --shard none (DDP)", "peer": state(&ddp, &b.hytrain), "target": "",
            }));
            out.push(serde_json::json!({
                "comparison": format!("model-state memory per rank (peak minus the tiny MLP's), --shard {shard} \
                                       ({zero}), {title}"),
                "unit": "GiB", "higher_is_better": false, "hytrain": state(&m, &b.hytrain),
                "peer_name": "PyTorch DDP + ZeroRedundancyOptimizer", "peer": state(&torch_zero, &b.pytorch),
                "target": "",
            }));
        }
    }
    if let Some(torch_ddp) = find(theirs, "ddp") {
        out.push(serde_json::json!({
            "comparison": format!("step time, --shard none (DDP), {title}"), "unit": "s", "higher_is_better": false,
            "hytrain": ddp.step_seconds, "peer_name": "PyTorch DDP", "peer": torch_ddp.step_seconds, "target": "",
        }));
    }
    out
}

/// Every rank's peak from the summary rank 0 prints: `peak host memory ... (MiB by rank: 812 790)`.
pub fn peaks_by_rank(stdout: &str) -> Result<Vec<f64>> {
    let line = stdout
        .lines()
        .find(|l| l.contains("peak host memory"))
        .context("hytrain's summary has no 'peak host memory' line")?;
    let list = line
        .split_once("MiB by rank:")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .with_context(|| format!("no per-rank list in '{line}'"))?;
    list.split_whitespace()
        .map(|m| m.parse::<f64>().map(|m| m * (1u64 << 20) as f64).with_context(|| format!("'{m}' in '{line}'")))
        .collect()
}

/// The median step time of the timed steps in `metrics.jsonl` (one line per step at `--log-interval 1`; the
/// first [`WARMUP`] left out): the global batch over each line's samples per second.
pub fn median_step_seconds(metrics: &str, global_batch: usize) -> Result<f64> {
    let mut steps: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["step"].as_u64().is_some_and(|s| s as usize > WARMUP))
        .filter_map(|r| r["samples_per_sec"].as_f64())
        .filter(|rate| *rate > 0.0)
        .map(|rate| global_batch as f64 / rate)
        .collect();
    if steps.is_empty() {
        bail!("metrics.jsonl holds no timed step after the {WARMUP} warm-up steps");
    }
    steps.sort_by(f64::total_cmp);
    Ok(steps[steps.len() / 2])
}

/// zero_memory.py's one JSON line.
pub fn peer_figures(stdout: &str) -> Result<Measured> {
    let line =
        stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("zero_memory.py printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("bad JSON '{line}'"))?;
    let peak_bytes = v["peak_bytes"]
        .as_array()
        .context("no peak_bytes")?
        .iter()
        .map(|b| b.as_f64().context("a peak that is not a number"))
        .collect::<Result<Vec<_>>>()?;
    Ok(Measured { peak_bytes, step_seconds: v["step_seconds"].as_f64().context("no step_seconds")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_gives_each_ranks_peak() {
        let out =
            "samples 224 at 10.0/s over 22.4 s\npeak host memory     812.0 MiB on rank 1 (MiB by rank: 790 812)\n";
        assert_eq!(peaks_by_rank(out).unwrap(), vec![790.0 * 1048576.0, 812.0 * 1048576.0]);
        assert!(peaks_by_rank("no summary").unwrap_err().to_string().contains("peak host memory"));
    }

    #[test]
    fn step_time_is_the_median_of_the_timed_steps() {
        let metrics = (1..=7)
            .map(|s| format!("{{\"step\":{s},\"samples_per_sec\":{}}}\n", if s <= 2 { 1.0 } else { 64.0 * s as f64 }))
            .collect::<String>();
        // Steps 3..=7 at 64*s samples/s over a global batch of 64: 1/s seconds; the median is step 5's.
        assert!((median_step_seconds(&metrics, 64).unwrap() - 0.2).abs() < 1e-12);
        assert!(median_step_seconds("{\"step\":1,\"samples_per_sec\":5}", 64).is_err());
    }

    #[test]
    fn rows_judge_zero2_at_four_ranks_against_both_peers() {
        let m = |peak: f64, s: f64| Measured { peak_bytes: vec![peak, peak * 0.9], step_seconds: s };
        let ours = [("none", m(4.0, 1.0)), ("optimizer", m(2.5, 1.01)), ("gradients", m(1.8, 1.02))];
        let theirs = [("ddp", m(4.2, 0.9)), ("zero", m(3.0, 1.1))];
        let at4 = rows(4, &ours, &theirs, None);
        assert_eq!(at4.len(), 7);
        let zero2: Vec<_> = at4.iter().filter(|r| r["comparison"].as_str().unwrap().contains("ZeRO-2")).collect();
        assert_eq!(zero2.iter().map(|r| r["target"].as_str().unwrap()).collect::<Vec<_>>(), ["<=0.5", "<=1", "<=1.05"]);
        assert_eq!(zero2[0]["hytrain"].as_f64().unwrap(), 1.8 / (1u64 << 30) as f64);
        assert!(rows(2, &ours, &theirs, None).iter().all(|r| r["target"] == ""), "targets apply at 4 ranks");
        let base = Baselines { hytrain: m(0.5, 0.1), pytorch: m(1.0, 0.1) };
        let with_state = rows(4, &ours, &theirs, Some(&base));
        assert_eq!(with_state.len(), 11);
        let state: Vec<_> =
            with_state.iter().filter(|r| r["comparison"].as_str().unwrap().contains("model-state")).collect();
        // ZeRO-2: 1.8 - 0.5 against DDP's 4.0 - 0.5 and PyTorch ZeRO's 3.0 - 1.0.
        let gib = |x: f64| x / (1u64 << 30) as f64;
        assert_eq!((state[2]["hytrain"].as_f64().unwrap(), state[2]["peer"].as_f64().unwrap()), (gib(1.3), gib(3.5)));
        assert_eq!(state[3]["peer"].as_f64().unwrap(), gib(2.0));
    }
}

//! The one table `cargo xtask bench` ends with: every comparison against a peer measured in the same run, as a
//! ratio, beside issue 8's target. Each bench appends its rows as JSON lines to the file named by
//! HYTRAIN_BENCH_SUMMARY; this module reads them back.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// One comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was compared, e.g. "allreduce 64 MiB, 2 processes: shm".
    pub comparison: String,
    /// Unit of both values.
    pub unit: String,
    /// Whether a larger value is better (bandwidth) or worse (time).
    pub higher_is_better: bool,
    /// hytrain's value.
    pub hytrain: f64,
    /// Who hytrain is compared with.
    pub peer_name: String,
    /// The peer's value.
    pub peer: f64,
    /// The target ratio hytrain/peer, as ">=3" or "<=0.8", or empty for none.
    pub target: String,
}

impl Row {
    /// hytrain's value over the peer's.
    pub fn ratio(&self) -> f64 {
        self.hytrain / self.peer
    }

    /// "yes", "no", or "" when the row has no target.
    fn met(&self) -> Result<&'static str> {
        let t = self.target.trim();
        if t.is_empty() {
            return Ok("");
        }
        let (at_least, bound) = match (t.strip_prefix(">="), t.strip_prefix("<=")) {
            (Some(b), _) => (true, b),
            (_, Some(b)) => (false, b),
            _ => bail!("target '{t}' of '{}' is neither >=X nor <=X", self.comparison),
        };
        let bound: f64 =
            bound.trim().parse().with_context(|| format!("target '{t}' of '{}' is not a number", self.comparison))?;
        let r = self.ratio();
        Ok(if (at_least && r >= bound) || (!at_least && r <= bound) { "yes" } else { "no" })
    }
}

/// Reads the rows the benches appended to `path`; a missing file is no rows.
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("bad summary line '{line}'"))?;
            let s = |k: &str| v[k].as_str().map(str::to_string).with_context(|| format!("'{k}' missing in '{line}'"));
            let f = |k: &str| v[k].as_f64().with_context(|| format!("'{k}' missing in '{line}'"));
            Ok(Row {
                comparison: s("comparison")?,
                unit: s("unit")?,
                higher_is_better: v["higher_is_better"].as_bool().unwrap_or(true),
                hytrain: f("hytrain")?,
                peer_name: s("peer_name")?,
                peer: f("peer")?,
                target: v["target"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// The Markdown table of `rows`, plus a line for each comparison that produced none.
pub fn table(rows: &[Row], missing: &[String]) -> Result<String> {
    let mut out = String::from(
        "| comparison | unit | hytrain | peer | peer value | ratio hytrain/peer | target | met |\n\
         |---|---|---:|---|---:|---:|---|---|\n",
    );
    for r in rows {
        let better = if r.higher_is_better { "higher is better" } else { "lower is better" };
        out += &format!(
            "| {} | {} ({better}) | {:.2} | {} | {:.2} | {:.2}x | {} | {} |\n",
            r.comparison,
            r.unit,
            r.hytrain,
            r.peer_name,
            r.peer,
            r.ratio(),
            if r.target.is_empty() { "-".to_string() } else { format!("{}x", r.target) },
            r.met()?,
        );
    }
    for m in missing {
        out += &format!("not measured: {m}\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_and_targets_are_judged_in_the_right_direction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.jsonl");
        std::fs::write(
            &path,
            "{\"comparison\":\"allreduce 64 MiB\",\"unit\":\"GB/s\",\"higher_is_better\":true,\"hytrain\":3.3,\
             \"peer_name\":\"gloo\",\"peer\":1.0,\"target\":\">=3\"}\n\
             {\"comparison\":\"step lenet\",\"unit\":\"ms\",\"higher_is_better\":false,\"hytrain\":45,\
             \"peer_name\":\"DDP\",\"peer\":50,\"target\":\"<=0.8\"}\n\
             {\"comparison\":\"ring\",\"unit\":\"GB/s\",\"hytrain\":1.5,\"peer_name\":\"gloo\",\"peer\":1.0,\"target\":\"\"}\n",
        )
        .unwrap();
        let rows = read(&path).unwrap();
        assert_eq!(rows.len(), 3);
        let t = table(&rows, &["s3 read: boto3 missing".into()]).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[2],
            "| allreduce 64 MiB | GB/s (higher is better) | 3.30 | gloo | 1.00 | 3.30x | >=3x | yes |"
        );
        assert_eq!(lines[3], "| step lenet | ms (lower is better) | 45.00 | DDP | 50.00 | 0.90x | <=0.8x | no |");
        assert_eq!(lines[4], "| ring | GB/s (higher is better) | 1.50 | gloo | 1.00 | 1.50x | - |  |");
        assert_eq!(lines[5], "not measured: s3 read: boto3 missing");
    }

    #[test]
    fn a_missing_file_is_no_rows_and_a_bad_line_or_target_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join("none")).unwrap().is_empty());
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "{\"comparison\":\"x\"}\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("'unit' missing"));
        let row = Row {
            comparison: "x".into(),
            unit: "ms".into(),
            higher_is_better: false,
            hytrain: 1.0,
            peer_name: "p".into(),
            peer: 1.0,
            target: "about 1".into(),
        };
        assert!(table(&[row], &[]).unwrap_err().to_string().contains("neither >=X nor <=X"));
    }
}

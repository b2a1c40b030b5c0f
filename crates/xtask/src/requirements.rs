//! The pinned, hashed wheel list pip downloads (`libtorch-requirements.txt`), read the same way pip reads it so xtask
//! can check every download itself and know which cached file belongs to which pin.

use anyhow::{bail, Context, Result};

/// One `name==version --hash=sha256:HEX` line of a requirements file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The distribution name as written (e.g. `nvidia-cuda-runtime`).
    pub name: String,
    /// The exact version after `==`.
    pub version: String,
    /// The lowercase hex sha256 of the wheel.
    pub sha256: String,
}

impl Pin {
    /// Whether a wheel file name (`torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl`) is this pin's distribution
    /// and version. Wheel names escape `-` in the distribution as `_`, so names are compared normalized.
    pub fn matches_wheel_file(&self, file_name: &str) -> bool {
        let Some(stem) = file_name.strip_suffix(".whl") else {
            return false;
        };
        let mut parts = stem.split('-');
        match (parts.next(), parts.next()) {
            (Some(name), Some(version)) => normalize(name) == normalize(&self.name) && version == self.version,
            _ => false,
        }
    }
}

/// PEP 503 name normalization: lowercase, runs of `-`, `_`, `.` become one `-`.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut separator = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            separator = true;
        } else {
            if separator && !out.is_empty() {
                out.push('-');
            }
            separator = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Parses a requirements file in which every requirement is pinned with `==` and carries exactly one sha256 hash,
/// which is what `pip download --require-hashes` demands too; anything else is refused with the offending line.
pub fn parse(text: &str) -> Result<Vec<Pin>> {
    let mut pins: Vec<Pin> = Vec::new();
    for (number, line) in logical_lines(text) {
        let mut words = line.split_whitespace();
        let Some(spec) = words.next() else { continue };
        let (name, version) = spec
            .split_once("==")
            .filter(|(n, v)| !n.is_empty() && !v.is_empty() && !v.contains(['=', '<', '>', ',', '*']))
            .with_context(|| format!("line {number}: `{spec}` is not pinned; write it as name==version"))?;
        let mut sha256 = None;
        for word in words {
            let Some(hash) = word.strip_prefix("--hash=") else {
                bail!("line {number}: unexpected `{word}`; only --hash=sha256:HEX may follow the pin");
            };
            let Some(hex) = hash.strip_prefix("sha256:") else {
                bail!("line {number}: `{word}` is not a sha256 hash; write --hash=sha256:HEX");
            };
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("line {number}: `{hex}` is not 64 hex digits");
            }
            if sha256.replace(hex.to_ascii_lowercase()).is_some() {
                bail!("line {number}: {name} has more than one hash; pin exactly one wheel");
            }
        }
        let sha256 = sha256.with_context(|| format!("line {number}: {name} has no --hash=sha256:HEX"))?;
        if pins.iter().any(|p| normalize(&p.name) == normalize(name)) {
            bail!("line {number}: {name} is pinned twice");
        }
        pins.push(Pin { name: name.to_string(), version: version.to_string(), sha256 });
    }
    Ok(pins)
}

/// Joins `\` continuations and drops comments and blank lines, keeping the number of each logical line's first
/// physical line for error messages.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        // pip treats `#` as a comment at the line start or after whitespace.
        let comment = raw
            .char_indices()
            .find(|&(i, c)| c == '#' && (i == 0 || raw[..i].ends_with(char::is_whitespace)))
            .map(|(i, _)| i);
        let line = &raw[..comment.unwrap_or(raw.len())];
        let (body, continued) = match line.trim_end().strip_suffix('\\') {
            Some(body) => (body, true),
            None => (line, false),
        };
        let entry = current.get_or_insert_with(|| (index + 1, String::new()));
        entry.1.push(' ');
        entry.1.push_str(body.trim());
        if !continued {
            let (number, text) = current.take().expect("set above");
            if !text.trim().is_empty() {
                out.push((number, text.trim().to_string()));
            }
        }
    }
    if let Some((number, text)) = current {
        if !text.trim().is_empty() {
            out.push((number, text.trim().to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a";

    #[test]
    fn continuation_lines_and_comments_parse_into_pins() {
        let text = format!("# header\n\ntorch==2.11.0 \\\n    --hash=sha256:{A}  # the big one\nnvidia_cuda.runtime==13.0.96 --hash=sha256:{}\n", A.to_uppercase());
        let pins = parse(&text).unwrap();
        assert_eq!(pins.len(), 2);
        assert_eq!(pins[0], Pin { name: "torch".into(), version: "2.11.0".into(), sha256: A.into() });
        assert_eq!(pins[1].name, "nvidia_cuda.runtime");
        assert_eq!(pins[1].sha256, A, "hashes are lowercased");
    }

    #[test]
    fn unpinned_or_unhashed_requirements_are_refused_with_their_line() {
        let cases = [
            (format!("torch>=2.11 --hash=sha256:{A}"), "line 1: `torch>=2.11` is not pinned"),
            ("\ntorch==2.11.0".to_string(), "line 2: torch has no --hash"),
            (format!("torch==2.11.0 --hash=md5:{A}"), "is not a sha256 hash"),
            ("torch==2.11.0 --hash=sha256:abc".to_string(), "is not 64 hex digits"),
            (format!("torch==2.11.0 --hash=sha256:{A} --hash=sha256:{A}"), "more than one hash"),
            (
                format!("torch==2.11.0 --hash=sha256:{A}\nTorch==2.11.0 --hash=sha256:{A}"),
                "line 2: Torch is pinned twice",
            ),
            (format!("torch==2.11.0 --no-deps --hash=sha256:{A}"), "unexpected `--no-deps`"),
        ];
        for (text, expected) in cases {
            let error = format!("{:#}", parse(&text).unwrap_err());
            assert!(error.contains(expected), "{text:?}: got `{error}`, expected `{expected}`");
        }
    }

    #[test]
    fn wheel_file_names_match_their_pin_only() {
        let pin = Pin { name: "nvidia-cuda-runtime".into(), version: "13.0.96".into(), sha256: A.into() };
        assert!(pin
            .matches_wheel_file("nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"));
        assert!(!pin.matches_wheel_file("nvidia_cuda_runtime-13.5.37-py3-none-manylinux2014_x86_64.whl"));
        assert!(!pin.matches_wheel_file("nvidia_cuda_cupti-13.0.96-py3-none-manylinux_2_25_x86_64.whl"));
        assert!(!pin.matches_wheel_file("nvidia_cuda_runtime-13.0.96-py3-none-any.tar.gz"));
    }

    #[test]
    fn the_committed_requirements_pin_torch_for_tch_0_24() {
        let pins = parse(include_str!("../libtorch-requirements.txt")).unwrap();
        let torch = pins.iter().find(|p| p.name == "torch").expect("torch is pinned");
        assert_eq!(torch.version, crate::wheel::TORCH_VERSION);
    }
}

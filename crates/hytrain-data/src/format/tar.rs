//! WebDataset tar shards: members `{key}.{ext}`, grouped by key in archive order. `png`/`jpg`/`jpeg` are images,
//! `npy` a tensor, `cls` (an ASCII integer) or `json` (`{"label": n}` or a bare integer) the label; other
//! extensions are ignored. As in WebDataset, the key is the member path up to the first dot of its file name.

use std::io::Read;

use super::{Dataset, ImageKind, Payload, RawSample, Shard, ShardKind, Split};
use crate::source::Object;
use crate::Error;

const BLOCK: u64 = 512;

fn split_of(name: &str) -> Option<Split> {
    let first = name.split('/').next().unwrap_or("");
    if name.contains('/') {
        match first {
            "train" | "training" => return Some(Split::Train),
            "val" | "valid" | "validation" | "test" | "testing" => return Some(Split::Test),
            _ => {}
        }
    }
    None
}

/// Chooses the split's `*.tar` objects and counts each shard's samples (reading every shard whose count is not
/// known already).
pub(crate) fn index(ds: &mut Dataset, objects: &[Object]) -> Result<(), Error> {
    let tars: Vec<&Object> = objects.iter().filter(|o| o.name.ends_with(".tar")).collect();
    let has_test = tars.iter().any(|o| split_of(&o.name) == Some(Split::Test));
    let has_train = tars.iter().any(|o| split_of(&o.name) == Some(Split::Train));
    let chosen: Vec<&Object> = match ds.split {
        Split::Test => tars.iter().copied().filter(|o| split_of(&o.name) == Some(Split::Test)).collect(),
        Split::Train if has_train => tars.iter().copied().filter(|o| split_of(&o.name) == Some(Split::Train)).collect(),
        Split::Train => tars.iter().copied().filter(|o| !has_test || split_of(&o.name).is_none()).collect(),
    };
    if chosen.is_empty() {
        return Err(ds.no_split(match ds.split {
            Split::Test => "put the test shards under val/ or test/, or give the test channel as its own source",
            Split::Train => "put the training shards under train/ (test shards go under val/ or test/)",
        }));
    }
    let known = ds.known_counts(objects, &chosen);
    let counts = ds.count_samples(&chosen, known, |ds, o, bytes| {
        let (samples, skipped) = parse(bytes, &ds.source_desc, &o.name, ds.skip_bad_samples)?;
        for e in &skipped {
            ds.note_skip(e);
        }
        Ok(samples.len())
    })?;
    for (o, samples) in chosen.iter().zip(counts) {
        ds.shards.push(Shard { name: o.name.clone(), bytes: o.size, samples, kind: ShardKind::Object });
    }
    read_classes(ds, objects)
}

fn read_classes(ds: &mut Dataset, objects: &[Object]) -> Result<(), Error> {
    let classes = objects.iter().find(|o| o.name == super::CLASSES_FILE).map(|o| o.name.clone());
    if let Some(name) = classes {
        let bytes = ds.source.read(&name)?;
        let names: Vec<String> = serde_json::from_slice(&bytes).map_err(|e| Error::BadShard {
            source_desc: ds.source_desc.clone(),
            shard: name.clone(),
            reason: format!("is not a JSON array of class names ({e}); fix or delete it"),
        })?;
        ds.classes = Some(names);
    }
    Ok(())
}

/// Members of one key, gathered until the key changes.
#[derive(Default)]
struct Group {
    key: String,
    input: Option<(String, Payload)>,
    label: Option<(String, Vec<u8>)>,
    error: Option<(String, String)>,
}

/// Parses one shard. Returns the samples and, with `skip_bad`, the errors of the samples it left out; without it
/// the first bad sample is the error.
pub(crate) fn parse(
    bytes: &[u8],
    source_desc: &str,
    shard: &str,
    skip_bad: bool,
) -> Result<(Vec<RawSample>, Vec<Error>), Error> {
    let bad_shard =
        |reason: String| Error::BadShard { source_desc: source_desc.to_string(), shard: shard.to_string(), reason };
    let bad_member = |member: &str, reason: String| Error::BadMember {
        source_desc: source_desc.to_string(),
        shard: shard.to_string(),
        member: member.to_string(),
        reason,
    };
    if bytes.is_empty() {
        return Err(bad_shard("is empty (0 bytes); re-copy or re-pack it".into()));
    }
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    let mut group = Group::default();
    // Ends the current group; a bad group is an error, or skipped and returned with `skip_bad`.
    let finish = |group: Group, samples: &mut Vec<RawSample>, skipped: &mut Vec<Error>| -> Result<(), Error> {
        if group.key.is_empty() {
            return Ok(());
        }
        let result = (|| {
            if let Some((member, reason)) = group.error {
                return Err(bad_member(&member, reason));
            }
            let Some((member, payload)) = group.input else {
                let member = group.label.map(|l| l.0).unwrap_or_else(|| group.key.clone());
                return Err(bad_member(
                    &member,
                    format!("sample {} has no input member ({}.png, .jpg, .jpeg or .npy)", group.key, group.key),
                ));
            };
            let Some((label_member, label_bytes)) = group.label else {
                return Err(bad_member(
                    &member,
                    format!("sample {} has no label ({}.cls or {}.json member)", group.key, group.key, group.key),
                ));
            };
            let label = parse_label(&label_member, &label_bytes).map_err(|r| bad_member(&label_member, r))?;
            Ok(RawSample { key: group.key, member, payload, label })
        })();
        match result {
            Ok(s) => samples.push(s),
            Err(e) if skip_bad => skipped.push(e),
            Err(e) => return Err(e),
        }
        Ok(())
    };

    let mut archive = tar::Archive::new(bytes);
    let entries = archive.entries().map_err(|e| bad_shard(format!("is not a tar file ({e})")))?;
    let mut end: u64 = 0;
    let mut last_member = String::new();
    let mut count = 0usize;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) if count == 0 => {
                return Err(bad_shard(format!("is not a tar file ({e}); shards must be plain, uncompressed tar")))
            }
            Err(e) => {
                let err = bad_shard(format!(
                    "is truncated or corrupt after member {last_member} ({e}); re-copy or re-pack it"
                ));
                if skip_bad {
                    skipped.push(err);
                    finish(std::mem::take(&mut group), &mut samples, &mut skipped)?;
                    return Ok((samples, skipped));
                }
                return Err(err);
            }
        };
        count += 1;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let size = entry.size();
        // The size is the header's claim (up to 2^64 - 1 in base-256): no overflow on the way to "truncated".
        end = entry.raw_file_position().saturating_add(size.div_ceil(BLOCK).saturating_mul(BLOCK));
        last_member = path.clone();
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        let path = path.strip_prefix("./").unwrap_or(&path).to_string();
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(bytes.len()));
        if let Err(e) = entry.read_to_end(&mut data) {
            return Err(bad_shard(format!("member {path} cannot be read ({e}); the shard is truncated or corrupt")));
        }
        if (data.len() as u64) < size {
            let err = bad_shard(format!(
                "is truncated: member {path} should have {size} bytes but the file ends after {}; re-copy or re-pack it",
                data.len()
            ));
            if skip_bad {
                skipped.push(err);
                // The cut member's sample is incomplete; earlier samples are whole.
                return Ok((samples, skipped));
            }
            return Err(err);
        }
        let member_error = if path.starts_with('/') {
            Some("has an absolute path; shard members must be relative (key.ext)".to_string())
        } else if path.split('/').any(|c| c == "..") {
            Some("has a '..' component; shard members must stay inside the shard (key.ext)".to_string())
        } else if !(kind.is_file() || kind.is_contiguous()) {
            Some(format!("is a {kind:?} entry, not a regular file; shards hold regular files only"))
        } else {
            None
        };
        let (dir, file) = match path.rfind('/') {
            Some(i) => (&path[..=i], &path[i + 1..]),
            None => ("", path.as_str()),
        };
        let (stem, ext) = match file.find('.') {
            Some(i) => (&file[..i], file[i + 1..].to_ascii_lowercase()),
            None => (file, String::new()),
        };
        let key = format!("{dir}{stem}");
        if key != group.key {
            finish(std::mem::take(&mut group), &mut samples, &mut skipped)?;
            group.key = key;
        }
        if let Some(reason) = member_error {
            group.error.get_or_insert((path, reason));
            continue;
        }
        let payload = match ext.as_str() {
            "png" => Some(Payload::Encoded(ImageKind::Png, data)),
            "jpg" | "jpeg" => Some(Payload::Encoded(ImageKind::Jpeg, data)),
            "npy" => Some(Payload::Npy(data)),
            "cls" | "json" => {
                if group.label.is_some() {
                    group.error.get_or_insert((path.clone(), format!("sample {} has two labels", group.key)));
                } else {
                    group.label = Some((path.clone(), data));
                }
                None
            }
            _ => None,
        };
        if let Some(p) = payload {
            if let Some((first, _)) = &group.input {
                let reason = format!("sample {} has two inputs ({first} and this one); keep one per key", group.key);
                group.error.get_or_insert((path, reason));
            } else {
                group.input = Some((path, p));
            }
        }
    }
    finish(std::mem::take(&mut group), &mut samples, &mut skipped)?;
    // A tar ends with zero blocks; a file that stops right after a member's data was cut at a block boundary.
    let end = usize::try_from(end).unwrap_or(usize::MAX);
    let marker_ok =
        bytes.len() >= end.saturating_add(BLOCK as usize) && bytes[end..end + BLOCK as usize].iter().all(|&b| b == 0);
    if !marker_ok {
        let err = bad_shard(if count == 0 {
            "is not a tar file (no tar header found); shards must be plain, uncompressed tar".to_string()
        } else {
            format!("is truncated: it ends after member {last_member} without the end-of-archive marker; re-copy or re-pack it")
        });
        if skip_bad && count > 0 {
            skipped.push(err);
        } else {
            return Err(err);
        }
    }
    Ok((samples, skipped))
}

fn parse_label(member: &str, bytes: &[u8]) -> Result<i64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "label is not UTF-8 text".to_string())?.trim();
    let value = if member.to_ascii_lowercase().ends_with(".json") {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("label is not JSON ({e}); write {{\"label\": 3}} or 3"))?;
        match v {
            serde_json::Value::Object(map) => map.get("label").and_then(serde_json::Value::as_i64),
            other => other.as_i64(),
        }
    } else {
        text.parse::<i64>().ok()
    };
    value.ok_or_else(|| format!("label {text:?} is not an integer class index"))
}

//! Parsers for the small values launchers hand over: counts, ranks, ports, host names and JSON lists.

use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::env::Env;
use crate::error::{one_line, shown, DetectError};

/// A whole number read from `var`.
pub(crate) fn number(var: &str, value: &str, expected: &str) -> Result<usize, DetectError> {
    value.trim().parse::<usize>().map_err(|_| DetectError::NotANumber {
        var: var.to_owned(),
        value: shown(value),
        expected: expected.to_owned(),
    })
}

/// `var` as a whole number when it is set.
pub(crate) fn opt_number(env: &Env, var: &str, expected: &str) -> Result<Option<usize>, DetectError> {
    env.value(var).map(|v| number(var, v, expected)).transpose()
}

/// What a rank variable should hold, for error messages.
pub(crate) const RANK_EXPECTED: &str = "a whole number such as 0, 1, 2";
/// What a count variable should hold, for error messages.
pub(crate) const COUNT_EXPECTED: &str = "a whole number of at least 1 such as 1, 2, 8";

/// Checks that rank `name` = `value` is below the size `limit_name` = `limit` it indexes.
pub(crate) fn below(name: &str, value: usize, limit_name: &str, limit: usize) -> Result<(), DetectError> {
    if value < limit {
        Ok(())
    } else {
        Err(DetectError::OutOfRange { name: name.to_owned(), value, limit_name: limit_name.to_owned(), limit })
    }
}

/// `a * b` as a process count, or an error naming `what` when it does not fit.
pub(crate) fn product(a: usize, b: usize, what: &str) -> Result<usize, DetectError> {
    a.checked_mul(b)
        .ok_or_else(|| DetectError::Inconsistent(format!("{what} = {a} x {b} is too large to be a process count")))
}

/// `var` as a count that must be at least 1, when it is set.
pub(crate) fn opt_count(env: &Env, var: &str, expected: &str) -> Result<Option<usize>, DetectError> {
    match opt_number(env, var, expected)? {
        Some(0) => Err(DetectError::Zero { var: var.to_owned() }),
        other => Ok(other),
    }
}

/// A TCP port: a number in 1..=65535.
pub(crate) fn port(var: &str, value: &str) -> Result<u16, DetectError> {
    match value.trim().parse::<u64>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(DetectError::BadPort { var: var.to_owned(), value: shown(value) }),
    }
}

/// `var` as a port when it is set.
pub(crate) fn opt_port(env: &Env, var: &str) -> Result<Option<u16>, DetectError> {
    env.value(var).map(|v| port(var, v)).transpose()
}

/// Whether `s` can be a DNS host name (underscores are tolerated: some clusters use them in pod names).
pub(crate) fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// A master address: a host name, an IPv4 address, or an IPv6 address with or without brackets.
/// IPv6 comes back without brackets, the form `std::net` and `(host, port)` socket addresses take.
pub(crate) fn host(var: &str, value: &str) -> Result<String, DetectError> {
    let v = value.trim();
    if let Some(inner) = v.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        if inner.parse::<Ipv6Addr>().is_ok() {
            return Ok(inner.to_owned());
        }
    } else if v.parse::<Ipv4Addr>().is_ok() || v.parse::<Ipv6Addr>().is_ok() || is_host_name(v) {
        return Ok(v.to_owned());
    }
    let has_port = v
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    Err(DetectError::BadAddress {
        var: var.to_owned(),
        value: shown(value),
        hint: if has_port && var.ends_with("_ADDR") {
            format!("; give the port in {} instead", var.replace("_ADDR", "_PORT"))
        } else {
            String::new()
        },
    })
}

/// `HYTRAIN_HOST_ALIASES`: comma-separated `host=address` pairs, e.g. `algo-1=127.0.0.1,algo-2=127.0.0.1`.
pub(crate) fn host_aliases(env: &Env) -> Result<std::collections::BTreeMap<String, String>, DetectError> {
    const VAR: &str = "HYTRAIN_HOST_ALIASES";
    let mut aliases = std::collections::BTreeMap::new();
    let Some(value) = env.value(VAR) else {
        return Ok(aliases);
    };
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, address)) = pair.split_once('=') else {
            return Err(DetectError::Malformed {
                origin: VAR.to_owned(),
                problem: format!("'{}' has no '='", shown(pair)),
                expected: "host=address pairs separated by commas, e.g. algo-1=127.0.0.1,algo-2=127.0.0.1".to_owned(),
            });
        };
        let name = name.trim();
        if !is_host_name(name) {
            return Err(DetectError::BadAddress { var: VAR.to_owned(), value: shown(name), hint: String::new() });
        }
        aliases.insert(name.to_owned(), host(VAR, address)?);
    }
    Ok(aliases)
}

/// `var` as a master address when it is set.
pub(crate) fn opt_host(env: &Env, var: &str) -> Result<Option<String>, DetectError> {
    env.value(var).map(|v| host(var, v)).transpose()
}

/// A rendezvous endpoint `host:port`, `[ipv6]:port` or a bare host.
pub(crate) fn endpoint(var: &str, value: &str) -> Result<(String, Option<u16>), DetectError> {
    let v = value.trim();
    let bad = || DetectError::BadAddress {
        var: var.to_owned(),
        value: shown(value),
        hint: "; expected host:port, e.g. job-worker-0:23456".to_owned(),
    };
    let (h, p) = if let Some(rest) = v.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (format!("[{inner}]"), None),
            _ => (format!("[{inner}]"), Some(after.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else if v.matches(':').count() == 1 {
        let (h, p) = v.split_once(':').ok_or_else(bad)?;
        (h.to_owned(), Some(p))
    } else {
        (v.to_owned(), None)
    };
    let h = host(var, &h).map_err(|_| bad())?;
    let p = p.map(|p| port(var, p)).transpose()?;
    Ok((h, p))
}

/// A JSON list of strings held in variable `var`.
pub(crate) fn host_list(var: &str, value: &str) -> Result<Vec<String>, DetectError> {
    serde_json::from_str::<Vec<String>>(value)
        .map_err(|_| DetectError::NotHostList { var: var.to_owned(), value: shown(value) })
}

/// A JSON value of type `T` held in variable `var`.
pub(crate) fn json_var<T: DeserializeOwned>(var: &str, value: &str, expected: &str) -> Result<T, DetectError> {
    serde_json::from_str(value).map_err(|e| DetectError::Malformed {
        origin: var.to_owned(),
        problem: format!("not valid here ({})", one_line(&e.to_string())),
        expected: expected.to_owned(),
    })
}

/// Largest SageMaker config file read (`hyperparameters.json`, `resourceconfig.json`, ...). SageMaker's own are a
/// few KiB (hyperparameters are capped at 256 characters per key and value); a bigger file is not one of them, and
/// reading it whole could exhaust memory before the JSON parser says so.
pub(crate) const MAX_CONFIG_FILE: u64 = 4 << 20;

/// A JSON file of type `T` of at most [`MAX_CONFIG_FILE`] bytes, or `None` when the file does not exist.
pub(crate) fn json_file<T: DeserializeOwned>(path: &Path, expected: &str) -> Result<Option<T>, DetectError> {
    let unreadable = |error| DetectError::Unreadable { path: path.to_owned(), error };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(unreadable(error)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_FILE + 1).read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() as u64 > MAX_CONFIG_FILE {
        let size = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(DetectError::Malformed {
            origin: path.display().to_string(),
            problem: format!(
                "is {size} bytes, larger than the limit of {} MiB for a SageMaker config file",
                MAX_CONFIG_FILE >> 20
            ),
            expected: expected.to_owned(),
        });
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| DetectError::Malformed {
        origin: path.display().to_string(),
        problem: one_line(&e.to_string()),
        expected: expected.to_owned(),
    })
}

/// A boolean flag as SageMaker and shells write them.
pub(crate) fn truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_1_to_65535_are_refused() {
        assert_eq!(port("P", "29500").unwrap(), 29500);
        assert_eq!(port("P", " 7777 ").unwrap(), 7777);
        for bad in ["0", "65536", "-1", "abc", "", "99999999999999999999999"] {
            let e = port("MASTER_PORT", bad).unwrap_err().to_string();
            assert!(e.starts_with("MASTER_PORT='"), "{e}");
            assert!(e.contains("1..=65535"), "{e}");
        }
    }

    #[test]
    fn master_addresses_accept_host_ipv4_and_bracketed_ipv6() {
        assert_eq!(host("MASTER_ADDR", "job-master-0").unwrap(), "job-master-0");
        assert_eq!(host("MASTER_ADDR", "algo-1.internal.").unwrap(), "algo-1.internal.");
        assert_eq!(host("MASTER_ADDR", "10.0.0.7").unwrap(), "10.0.0.7");
        assert_eq!(host("MASTER_ADDR", "[fe80::1]").unwrap(), "fe80::1");
        assert_eq!(host("MASTER_ADDR", "::1").unwrap(), "::1");
    }

    #[test]
    fn master_address_with_a_port_says_where_the_port_goes() {
        let e = host("MASTER_ADDR", "job-master-0:23456").unwrap_err().to_string();
        assert_eq!(
            e,
            "MASTER_ADDR='job-master-0:23456' is not a host name, IPv4 address or [IPv6] address; \
             give the port in MASTER_PORT instead"
        );
        for bad in ["[::1", "a b", "-x", "[not-v6]", "host/path"] {
            assert!(host("MASTER_ADDR", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_split_host_and_port() {
        assert_eq!(endpoint("E", "job-worker-0:23456").unwrap(), ("job-worker-0".to_owned(), Some(23456)));
        assert_eq!(endpoint("E", "[::1]:29400").unwrap(), ("::1".to_owned(), Some(29400)));
        assert_eq!(endpoint("E", "node").unwrap(), ("node".to_owned(), None));
        assert!(endpoint("E", "a:b:c:d:e").is_err());
        assert!(endpoint("E", "[::1]x").is_err());
        assert!(endpoint("E", "host:0").is_err());
    }

    #[test]
    fn missing_json_file_is_none_and_broken_one_names_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        assert!(json_file::<Vec<String>>(&path, "a list").unwrap().is_none());
        std::fs::write(&path, "[\"a\",\n  oops]").unwrap();
        let e = json_file::<Vec<String>>(&path, "a list").unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
        assert!(e.contains("line 2 column"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn unreadable_json_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where a file is expected cannot be read as text.
        let e = json_file::<Vec<String>>(dir.path(), "a list").unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: cannot be read", dir.path().display())), "{e}");
    }

    #[test]
    fn a_config_file_over_the_size_limit_is_refused_naming_file_size_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hyperparameters.json");
        // Valid JSON, so only the size can be the reason.
        let mut text = vec![b' '; MAX_CONFIG_FILE as usize + 1];
        text.extend_from_slice(b"{}");
        std::fs::write(&path, text).unwrap();
        let e = json_file::<serde_json::Value>(&path, "a JSON object").unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
        assert!(e.contains(&format!("is {} bytes, larger than the limit of 4 MiB", MAX_CONFIG_FILE + 3)), "{e}");
        std::fs::write(&path, "{}").unwrap();
        assert!(json_file::<serde_json::Value>(&path, "x").unwrap().is_some());
    }
}

//! The one error type of detection. Every message is a single line that names the variable or file at fault and
//! the form that was expected, because it is what `hytrain explain` and `hytrain train` print before exiting.

use std::path::PathBuf;

/// Why the environment a launcher handed this process could not be turned into a [`Plan`](crate::Plan).
///
/// The `Display` text is always one line; values taken from the environment or from files are shown with control
/// characters escaped and long values shortened, so a hostile or broken value cannot spill over several lines.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetectError {
    /// A variable the detected launcher always sets is absent.
    #[error("{var} is not set; {hint}")]
    Missing {
        /// The variable.
        var: String,
        /// What sets it and what to do.
        hint: String,
    },

    /// A count or rank is not a whole number.
    #[error("{var} is not a whole number (got '{value}'); expected {expected}")]
    NotANumber {
        /// The variable (or hyperparameter) read.
        var: String,
        /// Its value, escaped and shortened.
        value: String,
        /// The form wanted, with an example.
        expected: String,
    },

    /// A count that must be at least 1 is 0.
    #[error("{var}=0 is not allowed; expected at least 1")]
    Zero {
        /// The variable.
        var: String,
    },

    /// A port is not a number in 1..=65535.
    #[error("{var}='{value}' is not a port; expected a number in 1..=65535")]
    BadPort {
        /// The variable.
        var: String,
        /// Its value, escaped and shortened.
        value: String,
    },

    /// A rank is not below the size it indexes.
    #[error("{name}={value} is not below {limit_name}={limit}: {name} must be in 0..{limit_name}")]
    OutOfRange {
        /// The variable holding the rank.
        name: String,
        /// The rank.
        value: usize,
        /// The variable (or quotient of variables) holding the size.
        limit_name: String,
        /// The size.
        limit: usize,
    },

    /// A process count is not a multiple of the per-node process count.
    #[error("{var}={value} is not a multiple of {divisor_var}={divisor}: {why}")]
    NotMultiple {
        /// The variable holding the total.
        var: String,
        /// The total.
        value: usize,
        /// The variable holding the per-node count.
        divisor_var: String,
        /// The per-node count.
        divisor: usize,
        /// Why the two must divide.
        why: String,
    },

    /// A host list variable is not a JSON list of strings.
    #[error("{var} is not a JSON list of host names (got '{value}'); expected e.g. [\"algo-1\",\"algo-2\"]")]
    NotHostList {
        /// The variable.
        var: String,
        /// Its value, escaped and shortened.
        value: String,
    },

    /// The current host is not one of the job's hosts.
    #[error("{origin}: current_host \"{host}\" is not in hosts {hosts}")]
    CurrentHostNotInHosts {
        /// The file or variables the two came from.
        origin: String,
        /// The current host, escaped and shortened.
        host: String,
        /// The hosts as a JSON list.
        hosts: String,
    },

    /// The job's host list is empty.
    #[error("{origin}: hosts is empty; expected at least one host, e.g. [\"algo-1\"]")]
    EmptyHosts {
        /// The file or variable the list came from.
        origin: String,
    },

    /// A master address is neither a host name, nor an IPv4 address, nor a bracketed IPv6 address.
    #[error("{var}='{value}' is not a host name, IPv4 address or [IPv6] address{hint}")]
    BadAddress {
        /// The variable.
        var: String,
        /// Its value, escaped and shortened.
        value: String,
        /// Extra advice, empty or starting with "; ".
        hint: String,
    },

    /// A JSON file or JSON-valued variable does not parse, or parses into something of the wrong shape.
    #[error("{origin}: {problem}; expected {expected}")]
    Malformed {
        /// The file path or variable name.
        origin: String,
        /// What is wrong, with serde's line and column where it has them.
        problem: String,
        /// The form wanted, with an example.
        expected: String,
    },

    /// A configuration file exists but cannot be read.
    #[error("{}: cannot be read ({error})", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },

    /// Two sources of the same fact disagree.
    #[error("{0}")]
    Inconsistent(String),
}

/// Longest value shown in an error message; longer ones are cut, since a message must stay one readable line.
const SHOWN_MAX: usize = 120;

/// A value from outside, made safe to put inside a one-line message.
pub(crate) fn shown(value: &str) -> String {
    let mut out = String::new();
    for (i, c) in value.chars().enumerate() {
        if i == SHOWN_MAX {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Like [`shown`] for longer texts such as serde's messages.
pub(crate) fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_escapes_newlines_and_shortens_long_values() {
        assert_eq!(shown("a\nb"), "a\\nb");
        let long = "x".repeat(500);
        let s = shown(&long);
        assert!(s.len() < 130 && s.ends_with("..."));
    }

    #[test]
    fn every_message_is_one_line_even_with_hostile_values() {
        let e = DetectError::NotANumber { var: "RANK".into(), value: shown("1\n2\r3"), expected: "a rank".into() };
        assert!(!e.to_string().contains('\n'));
        let e =
            DetectError::Malformed { origin: "x.json".into(), problem: one_line("bad\nthing"), expected: "y".into() };
        assert!(!e.to_string().contains('\n'));
    }
}

//! The subcommands of the `hytrain` binary, as library functions so examples and tests can call them too.

pub mod checkpoint;
pub mod data;
pub mod device;
pub mod doctor;
pub mod explain;
pub mod launch;
pub mod rendezvous;
pub mod train;

use std::time::Duration;

/// Parses a duration in seconds as the command line and `HYTRAIN_*` env give it (`900`, `2.5`).
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 =
        text.trim().parse().map_err(|_| format!("'{text}' is not a number of seconds (e.g. 900 or 2.5)"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("'{text}' is not a non-negative number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{text}' seconds is too long"))
}

/// Longest deadline accepted: a week. Longer ones are almost certainly a unit mistake (milliseconds?).
const MAX_DEADLINE_SECS: f64 = 7.0 * 24.0 * 3600.0;

/// Parses a deadline in seconds (`30`, `2.5`): positive (a zero deadline would fail every wait at once) and at
/// most a week.
pub fn parse_deadline(text: &str) -> Result<Duration, String> {
    let d = parse_seconds(text)?;
    if d.is_zero() {
        return Err(format!("'{text}' is not a usable deadline; give a positive number of seconds"));
    }
    if d.as_secs_f64() > MAX_DEADLINE_SECS {
        return Err(format!("'{text}' seconds is more than a week; give the deadline in seconds (e.g. 30)"));
    }
    Ok(d)
}

/// Parses a byte size such as `1MiB`, `64MiB`, `512KiB`, `1GiB`, `4096` (plain bytes). Units are binary; `MB` is
/// accepted as a synonym of `MiB` since that is what people type.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: usize =
        number.parse().map_err(|_| format!("'{text}' is not a size; write e.g. 1MiB, 64MiB, 512KiB or 4096"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("'{text}' has an unknown unit '{unit}'; use B, KiB, MiB or GiB")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("'{text}' is too large"))
}

/// Formats a byte count the way `parse_size` reads it.
pub fn format_size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64mb"), Ok(64 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    }

    #[test]
    fn bad_sizes_say_what_is_expected() {
        assert!(parse_size("lots").unwrap_err().contains("e.g. 1MiB"));
        assert!(parse_size("3parsecs").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn sizes_format_round_trip() {
        for bytes in [1, 1000, 1 << 10, 3 << 20, 1 << 30] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
    }

    #[test]
    fn deadlines_must_be_positive_and_at_most_a_week() {
        assert_eq!(parse_deadline("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_deadline("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_deadline("0").unwrap_err().contains("positive number of seconds"));
        assert!(parse_deadline("1e7").unwrap_err().contains("more than a week"));
        assert!(parse_deadline("1e30").unwrap_err().contains("too long"));
        assert!(parse_deadline("1e300").is_err());
        assert!(parse_deadline("nan").is_err());
    }

    #[test]
    fn seconds_reject_negative_and_text() {
        assert_eq!(parse_seconds("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").unwrap_err().contains("seconds"));
    }
}

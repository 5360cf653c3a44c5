//! Human-friendly sizes (`512M`, `4G`, `64GiB`) and durations (`5s`, `250ms`, `2m`).
//!
//! Binary multiples throughout: `1G` is 2^30 bytes, as in every VMM's `--memory` flag.

use std::time::Duration;

/// An error parsing a size or a duration, carrying the input that was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error(
        "`{0}` is not a size: expected a number with an optional K, M, G or T suffix (e.g. 512M, 4G)"
    )]
    BadSize(String),
    #[error("`{0}` is too large")]
    Overflow(String),
    #[error(
        "`{0}` is not a duration: expected a number with a unit ns, us, ms, s, m or h (e.g. 5s, 250ms)"
    )]
    BadDuration(String),
}

/// Parses a byte size. Accepts a plain number of bytes or a number followed by `K`, `M`, `G`,
/// `T` (optionally `KiB`, `MB`, ...; all are binary multiples). Fractions such as `1.5G` are
/// accepted if they come to a whole number of bytes.
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(UnitError::BadSize(input.to_string()));
    }
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0u32,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(UnitError::BadSize(input.to_string())),
    };
    if let Some((whole, frac)) = number.split_once('.') {
        // Exact arithmetic on the decimal fraction: value = (whole * 10^n + frac) * 2^shift / 10^n.
        if frac.is_empty() || frac.len() > 9 || frac.contains('.') {
            return Err(UnitError::BadSize(input.to_string()));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole
                .parse()
                .map_err(|_| UnitError::BadSize(input.to_string()))?
        };
        let frac_val: u128 = frac
            .parse()
            .map_err(|_| UnitError::BadSize(input.to_string()))?;
        let scale = 10u128.pow(frac.len() as u32);
        let numerator = (whole * scale + frac_val) << shift;
        if !numerator.is_multiple_of(scale) {
            return Err(UnitError::BadSize(input.to_string()));
        }
        u64::try_from(numerator / scale).map_err(|_| UnitError::Overflow(input.to_string()))
    } else {
        let n: u64 = number
            .parse()
            .map_err(|_| UnitError::Overflow(input.to_string()))?;
        n.checked_mul(1u64 << shift)
            .ok_or_else(|| UnitError::Overflow(input.to_string()))
    }
}

/// Formats a byte count with a binary suffix, exact where possible (`1G`, `1536M`, `4097`).
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{}", bytes >> shift, suffix);
        }
    }
    bytes.to_string()
}

/// Formats a byte count for people: `1.50 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else if value >= 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Parses a duration: a number (fractions allowed) followed by `ns`, `us`, `ms`, `s`, `m` or `h`.
/// A bare number is rejected: a unit is required so that `--run-for 5` is never ambiguous.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| UnitError::BadDuration(input.to_string()))?;
    let nanos_per_unit = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        _ => return Err(UnitError::BadDuration(input.to_string())),
    };
    let nanos = value * nanos_per_unit;
    if !nanos.is_finite() || nanos < 0.0 || nanos > u64::MAX as f64 {
        return Err(UnitError::Overflow(input.to_string()));
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("1.0000000001K").is_err());
        assert!(matches!(
            parse_size("99999999999T"),
            Err(UnitError::Overflow(_))
        ));
    }

    #[test]
    fn size_round_trip() {
        for v in [0u64, 1, 4096, 1 << 20, 3 << 29, 64 << 30, 4097] {
            assert_eq!(parse_size(&format_size(v)), Ok(v));
        }
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
        assert_eq!(human_bytes(100), "100 B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}

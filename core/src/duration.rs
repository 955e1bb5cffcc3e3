//! The one duration grammar of vha, for configuration files, command-line flags and API
//! parameters alike: Vault's (Go's `time.ParseDuration` plus `d` for days, and a bare
//! integer counting seconds). Examples: `"90s"`, `"1m30s"`, `"1.5h"`, `"250ms"`, `"2d"`,
//! `"3600"`.

use std::time::Duration;

/// A text that is not a duration in the grammar above (or overflows).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("time: invalid duration {0:?}")]
pub struct InvalidDuration(pub String);

/// Nanoseconds per unit, by Go's unit names (and `d`).
fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3600 * 1_000_000_000,
        "d" => 86_400 * 1_000_000_000,
        _ => return None,
    })
}

/// Parses a duration: a bare integer of seconds, or one or more `<number><unit>` parts
/// (`1h30m`, `1.5h`), exact to the nanosecond. Surrounding whitespace is ignored; signs,
/// inner spaces and unknown units are refused.
pub fn parse(text: &str) -> Result<Duration, InvalidDuration> {
    let invalid = || InvalidDuration(text.to_string());
    let t = text.trim();
    if t.is_empty() {
        return Err(invalid());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (number, after) = rest.split_at(num_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let per = unit_nanos(unit).ok_or_else(invalid)?;
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(invalid());
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| invalid())?
        };
        let mut part = whole.checked_mul(per).ok_or_else(invalid)?;
        // The fraction, digit by digit, so that `0.1s` is exactly 100 ms.
        let mut scale = per;
        for d in frac.chars() {
            let digit = u128::from(d.to_digit(10).ok_or_else(invalid)?);
            scale /= 10;
            part = part.checked_add(digit * scale).ok_or_else(invalid)?;
        }
        total = total.checked_add(part).ok_or_else(invalid)?;
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| invalid())?;
    // The remainder of a division by 10^9 fits in u32.
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| invalid())?;
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vault's forms parse exactly; anything else is refused, never read as something else.
    #[test]
    fn the_grammar() {
        let ok = [
            ("3600", Duration::from_secs(3600)),
            ("90s", Duration::from_secs(90)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("2d", Duration::from_secs(172_800)),
            ("250ms", Duration::from_millis(250)),
            ("0.1s", Duration::from_millis(100)),
            (".5s", Duration::from_millis(500)),
            ("1m0.5s", Duration::from_millis(60_500)),
            ("10us", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            (" 15s ", Duration::from_secs(15)),
            ("0", Duration::ZERO),
        ];
        for (text, want) in ok {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "abc",
            "5x",
            "1 h",
            "-1s",
            "+1s",
            "1h 30m",
            "s",
            ".s",
            "1..5s",
            "1.5",
            "99999999999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse("5x").unwrap_err().to_string(), "time: invalid duration \"5x\"");
    }
}

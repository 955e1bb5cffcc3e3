//! Time helpers shared by the secret-handling code: Vault's RFC 3339 timestamps (Go's
//! `RFC3339Nano`: trailing zeros of the fraction trimmed), unix seconds, and Vault's duration
//! parameters (an integer of seconds, or Go duration text such as `1h30m`, plus `d` for days).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::error::ApiError;

/// Longest accepted duration: 100 years. Bounds every TTL so arithmetic never overflows.
pub(crate) const MAX_DURATION_SECS: u64 = 100 * 365 * 24 * 3600;

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Go's `RFC3339Nano` of `t`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_nanos(t).to_string();
    // "2026-11-29T00:32:23.433452500Z" -> "...23.4334525Z"; ".000000000Z" -> "Z".
    match s.strip_suffix('Z').and_then(|b| b.rsplit_once('.')) {
        Some((head, frac)) => {
            let frac = frac.trim_end_matches('0');
            if frac.is_empty() {
                format!("{head}Z")
            } else {
                format!("{head}.{frac}Z")
            }
        }
        None => s,
    }
}

pub(crate) fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// RFC 3339 of unix seconds.
pub(crate) fn secs_rfc3339(secs: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Parses an RFC 3339 time (as written by [`rfc3339`]).
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
        .ok()
        .or_else(|| humantime::parse_rfc3339(s).ok())
}

/// Parses Go duration text (`1h30m`, `90s`, `1.5h`, `2d`) or plain seconds (`"3600"`), in
/// the one grammar of [`vha_core::duration`], to whole seconds; empty is 0 (Vault's unset).
pub(crate) fn parse_duration_str(s: &str) -> Result<u64, ApiError> {
    if s.trim().is_empty() {
        return Ok(0);
    }
    let d = vha_core::duration::parse(s).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    bound(d.as_secs(), s)
}

fn bound(n: u64, s: &str) -> Result<u64, ApiError> {
    if n > MAX_DURATION_SECS {
        return Err(ApiError::BadRequest(format!("time: invalid duration {s:?}")));
    }
    Ok(n)
}

/// A duration parameter from JSON: a number of seconds or a duration string.
pub(crate) fn parse_duration_value(v: &Value) -> Result<u64, ApiError> {
    match v {
        Value::Null => Ok(0),
        Value::Number(n) => match n.as_u64() {
            Some(x) => bound(x, &n.to_string()),
            None => Err(ApiError::BadRequest(format!("time: invalid duration \"{n}\""))),
        },
        Value::String(s) => parse_duration_str(s),
        other => Err(ApiError::BadRequest(format!("time: invalid duration \"{other}\""))),
    }
}

/// Go's `time.Duration.String()` for whole seconds: `0s`, `45s`, `1m30s`, `1h0m0s`.
pub(crate) fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durations parse as Vault's `parseutil`: seconds, unit sequences, days; junk is a 400.
    #[test]
    fn durations() {
        assert_eq!(parse_duration_str("3600").unwrap(), 3600);
        assert_eq!(parse_duration_str("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration_str("2d").unwrap(), 172800);
        assert_eq!(parse_duration_str("1.5h").unwrap(), 5400);
        assert!(parse_duration_str("abc").is_err());
        assert!(parse_duration_str("5x").is_err());
        assert!(parse_duration_str("99999999999h").is_err());
        assert_eq!(format_duration(3600), "1h0m0s");
        assert_eq!(format_duration(90), "1m30s");
    }

    /// Timestamps trim trailing fraction zeros like Go's RFC3339Nano and parse back.
    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(rfc3339(t), "1970-01-01T00:00:01.5Z");
        assert_eq!(secs_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
    }
}

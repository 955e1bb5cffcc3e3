//! How lockd clients and the daemon authenticate each other, defined once for both sides.
//!
//! Two forms, as etcd and Consul users know them, usable together:
//! - a bearer token: the client sends `Authorization: Bearer <token>` on every request; the
//!   daemon compares it in constant time. Read from a file (`token_file`), trimmed of
//!   surrounding whitespace, held in zeroizing memory and never printed;
//! - mutual TLS: the daemon requires a client certificate signed by its `tls_client_ca_file`;
//!   the client presents `tls_cert_file`/`tls_key_file` and checks the daemon's certificate
//!   against `tls_ca_file` (with `tls_server_name` when the address is not the certificate's
//!   name).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

/// The scheme of the `Authorization` header.
pub const BEARER: &str = "Bearer ";
/// Shortest token accepted: 16 characters, so a token cannot be guessed in the time a
/// client could try (`vha dev` and the README's recipe make 32 random bytes, hex).
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted: far above any generated token, and bounded so a header stays
/// small.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Checks a token's form: length bounds and visible ASCII only (it travels in a header).
pub fn validate_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is {} characters long; at least {MIN_TOKEN_LEN} are required",
            token.len()
        ));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!("the token is longer than {MAX_TOKEN_LEN} characters"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be visible ASCII characters without spaces".into());
    }
    Ok(())
}

/// A token file's content as text, zeroized on drop (also when it is not UTF-8). Errors
/// name the file and never contain its content.
fn read_secret_text(path: &Path) -> Result<Zeroizing<String>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    String::from_utf8(raw).map(Zeroizing::new).map_err(|e| {
        drop(Zeroizing::new(e.into_bytes()));
        format!("{}: the token is not UTF-8", path.display())
    })
}

/// Most tokens a daemon's token file may list: enough for a rotation (old and new) with room
/// to spare, few enough that checking each in constant time stays cheap.
pub const MAX_ACCEPTED_TOKENS: usize = 8;

/// Reads the daemon's token file: one token per non-empty line (surrounding whitespace
/// trimmed), each validated, at most [`MAX_ACCEPTED_TOKENS`]. Several lines let a token be
/// rotated without refusing anyone: list old and new, move every client to the new one, drop
/// the old one. Errors name the file (and line) and never contain a token.
pub fn read_token_list(path: &Path) -> Result<Vec<Zeroizing<String>>, String> {
    let text = read_secret_text(path)?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        validate_token(t).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        tokens.push(Zeroizing::new(t.to_string()));
    }
    if tokens.is_empty() {
        return Err(format!("{}: no token in the file", path.display()));
    }
    if tokens.len() > MAX_ACCEPTED_TOKENS {
        return Err(format!(
            "{}: {} tokens; at most {MAX_ACCEPTED_TOKENS} are accepted",
            path.display(),
            tokens.len()
        ));
    }
    Ok(tokens)
}

/// Reads a token file: its content without surrounding whitespace, validated. The error
/// names the file and never contains the token.
pub fn read_token_file(path: &Path) -> Result<Zeroizing<String>, String> {
    let text = read_secret_text(path)?;
    let token = Zeroizing::new(text.trim().to_string());
    validate_token(&token).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(token)
}

/// How a client proves itself to lockd and checks lockd's certificate.
#[derive(Clone, Default)]
pub struct LockdCredentials {
    /// The bearer token, zeroized on drop.
    pub token: Option<Arc<Zeroizing<String>>>,
    /// CA bundle that signs lockd's server certificate (https addresses).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate chain for mutual TLS (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// The name to verify lockd's certificate against, when not the address's host.
    pub tls_server_name: Option<String>,
    /// Accept any server certificate: tests only.
    pub dangerous_tls_skip_verify: bool,
}

impl std::fmt::Debug for LockdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockdCredentials")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_server_name", &self.tls_server_name)
            .field("dangerous_tls_skip_verify", &self.dangerous_tls_skip_verify)
            .finish()
    }
}

impl LockdCredentials {
    /// Credentials with only a bearer token.
    pub fn token(token: impl Into<String>) -> Result<LockdCredentials, String> {
        let token = Zeroizing::new(token.into());
        validate_token(&token)?;
        Ok(LockdCredentials {
            token: Some(Arc::new(token)),
            ..Default::default()
        })
    }

    /// Credentials with a bearer token read from `path`.
    pub fn token_file(path: &Path) -> Result<LockdCredentials, String> {
        Ok(LockdCredentials {
            token: Some(Arc::new(read_token_file(path)?)),
            ..Default::default()
        })
    }

    /// The `Authorization` header value, marked sensitive (never logged by hyper/http).
    pub fn authorization(&self) -> Result<Option<http::HeaderValue>, String> {
        let Some(t) = &self.token else {
            return Ok(None);
        };
        let line = Zeroizing::new(format!("{BEARER}{}", t.as_str()));
        let mut v =
            http::HeaderValue::from_str(&line).map_err(|_| "the token is not a valid header value".to_string())?;
        v.set_sensitive(true);
        Ok(Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens outside the length bounds, with spaces or control characters are refused with
    /// a message that does not echo them; a token file is trimmed.
    #[test]
    fn token_rules() {
        assert!(validate_token("0123456789abcdef").is_ok());
        for bad in ["short", "0123456789abcdef ghi", "0123456789abcdef\u{7}"] {
            let e = validate_token(bad).unwrap_err();
            assert!(!e.contains(bad), "{e}");
        }
        assert!(validate_token(&"a".repeat(MAX_TOKEN_LEN + 1)).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "  0123456789abcdef0123\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap().as_str(), "0123456789abcdef0123");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token_file(&p).unwrap_err().contains(&p.display().to_string()));
        assert!(read_token_file(&dir.path().join("missing")).is_err());
    }

    /// A daemon's token file lists one token per line (blank lines skipped); a bad line is
    /// named by number without echoing it; an empty file or too many tokens are refused.
    #[test]
    fn token_list_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "old-token-0123456789\n\n  new-token-0123456789 \n").unwrap();
        let got: Vec<String> = read_token_list(&p).unwrap().iter().map(|t| t.to_string()).collect();
        assert_eq!(got, ["old-token-0123456789", "new-token-0123456789"]);
        std::fs::write(&p, "old-token-0123456789\nshort\n").unwrap();
        let e = read_token_list(&p).unwrap_err();
        assert!(e.contains(":2:") && !e.contains("short"), "{e}");
        std::fs::write(&p, " \n").unwrap();
        assert!(read_token_list(&p).is_err());
        std::fs::write(
            &p,
            format!("{}\n", "t0123456789abcdef\n".repeat(MAX_ACCEPTED_TOKENS + 1)),
        )
        .unwrap();
        assert!(read_token_list(&p).unwrap_err().contains("at most"));
    }

    /// The credentials' Debug output never shows the token; the header is marked sensitive.
    #[test]
    fn token_never_printed() {
        let c = LockdCredentials::token("s3cr3t-token-0123456789").unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let h = c.authorization().unwrap().unwrap();
        assert!(h.is_sensitive());
        assert_eq!(h.to_str().unwrap(), "Bearer s3cr3t-token-0123456789");
        assert!(LockdCredentials::default().authorization().unwrap().is_none());
    }
}

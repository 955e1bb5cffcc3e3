//! Shamir secret sharing of the unseal key, in Vault's share format.
//!
//! Vault's shares are the GF(256) evaluations of each secret byte followed by the one-byte x
//! coordinate (33 bytes for a 32-byte key). With `secret_shares = 1` Vault hands out the key
//! itself, unsplit; so do we. The arithmetic is the maintained `blahaj` crate's.

use blahaj::{Share, Sharks};
use zeroize::Zeroizing;

use crate::error::BarrierError;

/// Vault's bounds: at most 255 shares (x is one byte, x = 0 would be the secret itself).
pub const MAX_SHARES: u8 = 255;

/// Checks `secret_shares` / `secret_threshold` as Vault does.
pub fn validate(shares: u64, threshold: u64) -> Result<(u8, u8), BarrierError> {
    let bad = |m: &str| Err(BarrierError::InvalidParameters(m.to_string()));
    if shares == 0 {
        return bad("shares must be at least one");
    }
    if threshold == 0 {
        return bad("threshold must be at least one");
    }
    if shares > MAX_SHARES as u64 {
        return bad("shares must be less than 256");
    }
    if threshold > shares {
        return bad("threshold cannot be larger than shares");
    }
    if shares > 1 && threshold == 1 {
        return bad("threshold must be greater than one for multiple shares");
    }
    Ok((shares as u8, threshold as u8))
}

/// Splits `secret` into `shares` parts, any `threshold` of which recover it.
pub fn split(secret: &[u8], shares: u8, threshold: u8) -> Result<Vec<Zeroizing<Vec<u8>>>, BarrierError> {
    if shares == 1 {
        return Ok(vec![Zeroizing::new(secret.to_vec())]);
    }
    validate(shares as u64, threshold as u64)?;
    Ok(Sharks(threshold)
        .dealer(secret)
        .take(shares as usize)
        .map(|s| {
            // blahaj's byte form is x || y; Vault's is y || x.
            let raw = Zeroizing::new(Vec::<u8>::from(&s));
            let mut out = Vec::with_capacity(raw.len());
            out.extend_from_slice(&raw[1..]);
            out.push(raw[0]);
            Zeroizing::new(out)
        })
        .collect())
}

/// Recovers the secret from Vault-format shares. With `threshold == 1` the single part is
/// the key itself.
pub fn combine(parts: &[Zeroizing<Vec<u8>>], threshold: u8) -> Result<Zeroizing<Vec<u8>>, BarrierError> {
    if threshold <= 1 {
        return parts
            .first()
            .cloned()
            .ok_or_else(|| BarrierError::InvalidKey("no key given".into()));
    }
    let mut shares = Vec::with_capacity(parts.len());
    for p in parts {
        if p.len() < 2 {
            return Err(BarrierError::InvalidKey("share too short".into()));
        }
        let x = p[p.len() - 1];
        if x == 0 {
            return Err(BarrierError::InvalidKey("share has x coordinate 0".into()));
        }
        let mut raw = Zeroizing::new(Vec::with_capacity(p.len()));
        raw.push(x);
        raw.extend_from_slice(&p[..p.len() - 1]);
        shares.push(Share::try_from(raw.as_slice()).map_err(|e| BarrierError::InvalidKey(e.to_string()))?);
    }
    Sharks(threshold)
        .recover(shares.iter())
        .map(Zeroizing::new)
        .map_err(|e| BarrierError::InvalidKey(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any `threshold` of the shares recover the secret; shares are in Vault's 33-byte form.
    #[test]
    fn split_combine_roundtrip() {
        let secret = [7u8; 32];
        let parts = split(&secret, 5, 3).unwrap();
        assert_eq!(parts.len(), 5);
        assert!(parts.iter().all(|p| p.len() == 33), "Vault share = 32 bytes + x");
        for (a, b, c) in [(0, 1, 2), (4, 2, 0), (1, 3, 4)] {
            let got = combine(&[parts[a].clone(), parts[b].clone(), parts[c].clone()], 3).unwrap();
            assert_eq!(got.as_slice(), &secret);
        }
    }

    /// Fewer than `threshold` distinct shares never recover the secret.
    #[test]
    fn too_few_shares_fail() {
        let parts = split(&[1u8; 32], 5, 3).unwrap();
        assert!(combine(&[parts[0].clone(), parts[1].clone()], 3).is_err());
        // A duplicated share does not count twice.
        assert!(combine(&[parts[0].clone(), parts[0].clone(), parts[1].clone()], 3).is_err());
    }

    /// One share is the key itself (Vault's behaviour for secret_shares = 1).
    #[test]
    fn single_share_is_the_key() {
        let parts = split(&[9u8; 32], 1, 1).unwrap();
        assert_eq!(parts[0].as_slice(), &[9u8; 32]);
        assert_eq!(combine(&parts, 1).unwrap().as_slice(), &[9u8; 32]);
    }

    /// Vault's parameter rules.
    #[test]
    fn parameter_validation() {
        assert!(validate(0, 0).is_err());
        assert!(validate(3, 0).is_err());
        assert!(validate(3, 4).is_err());
        assert!(validate(256, 3).is_err());
        assert!(validate(3, 1).is_err());
        assert!(validate(1, 1).is_ok());
        assert!(validate(5, 3).is_ok());
    }

    proptest! {
        /// For random secrets and parameters, every threshold-sized subset recovers the secret.
        #[test]
        fn prop_roundtrip(secret in proptest::collection::vec(any::<u8>(), 1..64), n in 2u8..8, k_off in 0u8..6) {
            let k = 2 + k_off % (n - 1);
            let parts = split(&secret, n, k).unwrap();
            let subset: Vec<_> = parts.iter().rev().take(k as usize).cloned().collect();
            let got = combine(&subset, k).unwrap();
            prop_assert_eq!(got.as_slice(), secret.as_slice());
        }
    }
}

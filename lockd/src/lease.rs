//! The pure lease table: which lock is held by whom, until when, and the fencing tokens.
//!
//! No I/O and no clock of its own: every call takes `now` (a monotonic [`Duration`] since an
//! arbitrary origin, injected by the server) and returns [`Effect`]s the server must make
//! durable (grants, releases, expiries, fence observations) before acknowledging. That keeps
//! the safety rules property-testable (see the tests at the bottom):
//! - at most one lease per key; a lease ends only by release, or when `now >= deadline`;
//! - each grant's token is strictly greater than every token granted or seen for that key,
//!   computed with checked arithmetic (an exhausted token space refuses the grant);
//! - a write fenced with a token below the highest seen is rejected (`Fenced`), and so is one
//!   above every token granted for a lock this table grants (`Invalid`): a token cannot be
//!   forged, so no client can fence the real holder out;
//! - after a restart ([`LeaseTable::replay`] + [`LeaseTable::recovered`]) every lease that was
//!   held is held for a full TTL from the restart.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::LockdError;

/// A granted lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Lease {
    pub value: String,
    pub token: u64,
    pub ttl: Duration,
    /// The lease ends when `now >= deadline` without a renewal.
    pub deadline: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LockState {
    /// Highest token this table granted for this key (0: never granted here, the lock is
    /// held in another store and its tokens can only be observed, as in split mode).
    granted: u64,
    /// Highest token granted or seen on an accepted fenced write for this key. For a lock
    /// granted here it never exceeds `granted`; it moves only with grants and accepted writes.
    highest: u64,
    lease: Option<Lease>,
}

impl LockState {
    /// Refuses a fence token this table could not have granted, and a stale one.
    fn check(&self, lock: &str, token: u64) -> Result<(), LockdError> {
        if self.granted > 0 && token > self.granted {
            return Err(LockdError::Invalid(format!(
                "fence token {token} for lock {lock:?} was never granted (highest granted {})",
                self.granted
            )));
        }
        if token < self.highest {
            return Err(LockdError::Fenced {
                lock: lock.to_string(),
                token,
                highest: self.highest,
            });
        }
        Ok(())
    }
}

/// A lock's two high-water marks (see [`LeaseTable`]'s rules).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Marks {
    /// Highest token granted here (0: never granted here).
    pub granted: u64,
    /// Highest token granted or accepted on a fenced write.
    pub highest: u64,
}

/// Why a lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    Released,
    Expired,
}

/// What happened; the server turns these into log records and watch events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A new lease (durable record needed before the grant is answered).
    Granted {
        key: String,
        value: String,
        token: u64,
        ttl: Duration,
    },
    /// The existing lease was extended (in memory only).
    Renewed { key: String, token: u64, ttl: Duration },
    /// A lease ended (durable record; not urgent for expiries).
    Ended { key: String, token: u64, reason: EndReason },
    /// A fenced write raised the highest token seen for `lock` (durable with the write).
    Observed { lock: String, token: u64 },
    /// Tokens up to `token` were granted for `key` (written by snapshots, so the mark that
    /// bounds fence tokens survives compaction once the grant records are gone).
    GrantedUpTo { key: String, token: u64 },
}

/// The lease table.
#[derive(Clone, Debug, Default)]
pub(crate) struct LeaseTable {
    locks: BTreeMap<String, LockState>,
}

impl LeaseTable {
    /// Takes the lock if free (or if its lease ran out). Acquiring again with the current
    /// holder's value renews that lease (idempotent retry). Otherwise `LockHeld`.
    pub(crate) fn acquire(
        &mut self,
        key: &str,
        value: &str,
        ttl: Duration,
        now: Duration,
    ) -> Result<Vec<Effect>, LockdError> {
        if ttl.is_zero() {
            return Err(LockdError::Invalid("lease ttl must be positive".into()));
        }
        let mut effects = self.expire_key(key, now);
        let st = self.locks.entry(key.to_string()).or_default();
        match &mut st.lease {
            // The lease keeps the TTL it was granted (and logged) with: a different TTL here
            // would not survive a restart.
            Some(l) if l.value == value => {
                l.deadline = now.saturating_add(l.ttl);
                effects.push(Effect::Renewed {
                    key: key.to_string(),
                    token: l.token,
                    ttl: l.ttl,
                });
                Ok(effects)
            }
            Some(l) => Err(LockdError::LockHeld {
                key: key.to_string(),
                token: l.token,
            }),
            None => {
                let token = st.granted.max(st.highest).checked_add(1).ok_or_else(|| {
                    LockdError::Unavailable(format!("the fence token space of lock {key:?} is exhausted"))
                })?;
                st.granted = token;
                st.highest = token;
                st.lease = Some(Lease {
                    value: value.to_string(),
                    token,
                    ttl,
                    deadline: now.saturating_add(ttl),
                });
                effects.push(Effect::Granted {
                    key: key.to_string(),
                    value: value.to_string(),
                    token,
                    ttl,
                });
                Ok(effects)
            }
        }
    }

    /// Extends the lease `(key, token)` by its TTL from `now`. A lease whose deadline passed
    /// is `LeaseExpired` (even before a tick removed it); a token that is not the current
    /// lease is `UnknownLease`.
    pub(crate) fn renew(&mut self, key: &str, token: u64, now: Duration) -> Result<Effect, LockdError> {
        match self.locks.get_mut(key).and_then(|s| s.lease.as_mut()) {
            Some(l) if l.token == token => {
                if now >= l.deadline {
                    return Err(LockdError::LeaseExpired {
                        key: key.to_string(),
                        token,
                    });
                }
                l.deadline = now.saturating_add(l.ttl);
                Ok(Effect::Renewed {
                    key: key.to_string(),
                    token,
                    ttl: l.ttl,
                })
            }
            _ => {
                let highest = self.locks.get(key).map(|s| s.highest).unwrap_or(0);
                if token != 0 && token <= highest {
                    Err(LockdError::LeaseExpired {
                        key: key.to_string(),
                        token,
                    })
                } else {
                    Err(LockdError::UnknownLease {
                        key: key.to_string(),
                        token,
                    })
                }
            }
        }
    }

    /// Ends the lease `(key, token)`. Anyone presenting the key and the current token may
    /// release (see the server's release-by-token notes). A token that is not current is an
    /// error; releasing an already-ended lease is `LeaseExpired`, which callers treat as done.
    pub(crate) fn release(&mut self, key: &str, token: u64, now: Duration) -> Result<Vec<Effect>, LockdError> {
        let mut effects = self.expire_key(key, now);
        match self.locks.get_mut(key) {
            Some(st) if st.lease.as_ref().is_some_and(|l| l.token == token) => {
                st.lease = None;
                effects.push(Effect::Ended {
                    key: key.to_string(),
                    token,
                    reason: EndReason::Released,
                });
                Ok(effects)
            }
            Some(st) if token != 0 && token <= st.highest => {
                if effects.is_empty() {
                    Err(LockdError::LeaseExpired {
                        key: key.to_string(),
                        token,
                    })
                } else {
                    Ok(effects)
                }
            }
            _ => Err(LockdError::UnknownLease {
                key: key.to_string(),
                token,
            }),
        }
    }

    /// Checks a fenced write: `Fenced` when `token` is below the highest seen for `lock`,
    /// `Invalid` when this table grants `lock` and never granted `token`; otherwise records it
    /// as seen (returning `Observed` when it raised the highest, which only a lock granted
    /// elsewhere can do).
    pub(crate) fn fence(&mut self, lock: &str, token: u64) -> Result<Option<Effect>, LockdError> {
        self.check_fence(lock, token)?;
        let highest = self.highest(lock);
        if token > highest {
            self.locks.entry(lock.to_string()).or_default().highest = token;
            return Ok(Some(Effect::Observed {
                lock: lock.to_string(),
                token,
            }));
        }
        Ok(None)
    }

    /// Checks a fence without recording it (for validating a write before it is applied).
    pub(crate) fn check_fence(&self, lock: &str, token: u64) -> Result<(), LockdError> {
        match self.locks.get(lock) {
            Some(st) => st.check(lock, token),
            None => Ok(()),
        }
    }

    /// Ends every lease whose deadline is reached.
    pub(crate) fn tick(&mut self, now: Duration) -> Vec<Effect> {
        let due: Vec<String> = self
            .locks
            .iter()
            .filter(|(_, s)| s.lease.as_ref().is_some_and(|l| now >= l.deadline))
            .map(|(k, _)| k.clone())
            .collect();
        due.iter().flat_map(|k| self.expire_key(k, now)).collect()
    }

    fn expire_key(&mut self, key: &str, now: Duration) -> Vec<Effect> {
        if let Some(st) = self.locks.get_mut(key) {
            if let Some(l) = st.lease.as_ref().filter(|l| now >= l.deadline) {
                let token = l.token;
                st.lease = None;
                return vec![Effect::Ended {
                    key: key.to_string(),
                    token,
                    reason: EndReason::Expired,
                }];
            }
        }
        Vec::new()
    }

    /// The earliest lease deadline, for the server's expiry timer.
    pub(crate) fn next_deadline(&self) -> Option<Duration> {
        self.locks
            .values()
            .filter_map(|s| s.lease.as_ref().map(|l| l.deadline))
            .min()
    }

    pub(crate) fn holder(&self, key: &str) -> Option<&Lease> {
        self.locks.get(key).and_then(|s| s.lease.as_ref())
    }

    pub(crate) fn highest(&self, key: &str) -> u64 {
        self.locks.get(key).map(|s| s.highest).unwrap_or(0)
    }

    /// The highest token granted for `key` here (0 when never granted here).
    pub(crate) fn granted(&self, key: &str) -> u64 {
        self.locks.get(key).map(|s| s.granted).unwrap_or(0)
    }

    pub(crate) fn active_leases(&self) -> usize {
        self.locks.values().filter(|s| s.lease.is_some()).count()
    }

    /// Every lock's marks and lease, for snapshots.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, Marks, Option<&Lease>)> {
        self.locks.iter().map(|(k, s)| {
            (
                k.as_str(),
                Marks {
                    granted: s.granted,
                    highest: s.highest,
                },
                s.lease.as_ref(),
            )
        })
    }

    /// The effects that restore every lock's marks (not its lease): what a snapshot keeps so
    /// that fence checks and the next grant are the same after recovery.
    pub(crate) fn mark_effects(&self) -> Vec<Effect> {
        let mut out = Vec::new();
        for (k, s) in &self.locks {
            if s.granted > 0 {
                out.push(Effect::GrantedUpTo {
                    key: k.clone(),
                    token: s.granted,
                });
            }
            if s.highest > 0 {
                out.push(Effect::Observed {
                    lock: k.clone(),
                    token: s.highest,
                });
            }
        }
        out
    }

    /// Replays a durable effect (from the log or a snapshot) during recovery. Deadlines are
    /// set by [`LeaseTable::recovered`].
    pub(crate) fn replay(&mut self, effect: &Effect) {
        match effect {
            Effect::Granted { key, value, token, ttl } => {
                let st = self.locks.entry(key.clone()).or_default();
                st.granted = st.granted.max(*token);
                st.highest = st.highest.max(*token);
                st.lease = Some(Lease {
                    value: value.clone(),
                    token: *token,
                    ttl: *ttl,
                    deadline: Duration::ZERO,
                });
            }
            Effect::Ended { key, token, .. } => {
                if let Some(st) = self.locks.get_mut(key) {
                    if st.lease.as_ref().is_some_and(|l| l.token == *token) {
                        st.lease = None;
                    }
                }
            }
            Effect::Observed { lock, token } => {
                let st = self.locks.entry(lock.clone()).or_default();
                st.highest = st.highest.max(*token);
            }
            Effect::GrantedUpTo { key, token } => {
                let st = self.locks.entry(key.clone()).or_default();
                st.granted = st.granted.max(*token);
                st.highest = st.highest.max(*token);
            }
            Effect::Renewed { .. } => {}
        }
    }

    /// Ends recovery at `now`: every lease that was held is held for a full TTL from now, so
    /// no second holder is granted while the old one may still act on its last renewal.
    pub(crate) fn recovered(&mut self, now: Duration) {
        for st in self.locks.values_mut() {
            if let Some(l) = st.lease.as_mut() {
                l.deadline = now.saturating_add(l.ttl);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// A released lock is re-granted with a higher token; a held one is refused.
    #[test]
    fn grant_release_regrant() {
        let mut t = LeaseTable::default();
        let e = t.acquire("k", "a", MS(100), MS(0)).unwrap();
        assert!(matches!(e[0], Effect::Granted { token: 1, .. }));
        assert!(matches!(
            t.acquire("k", "b", MS(100), MS(10)),
            Err(LockdError::LockHeld { .. })
        ));
        t.release("k", 1, MS(20)).unwrap();
        let e = t.acquire("k", "b", MS(100), MS(30)).unwrap();
        assert!(matches!(e[0], Effect::Granted { token: 2, .. }));
    }

    /// A lease ends exactly at its deadline; renewing after that is `LeaseExpired`.
    #[test]
    fn expiry_and_late_renew() {
        let mut t = LeaseTable::default();
        t.acquire("k", "a", MS(100), MS(0)).unwrap();
        t.renew("k", 1, MS(50)).unwrap();
        assert!(t.tick(MS(149)).is_empty(), "renewed lease must last ttl from the renew");
        assert!(matches!(t.renew("k", 1, MS(150)), Err(LockdError::LeaseExpired { .. })));
        assert_eq!(t.tick(MS(150)).len(), 1);
        assert!(matches!(t.renew("k", 1, MS(151)), Err(LockdError::LeaseExpired { .. })));
        assert!(matches!(t.renew("k", 9, MS(151)), Err(LockdError::UnknownLease { .. })));
    }

    /// Re-acquiring with the holder's own value returns the same token and extends the lease
    /// by its original TTL (the one that is logged).
    #[test]
    fn idempotent_reacquire() {
        let mut t = LeaseTable::default();
        t.acquire("k", "a", MS(100), MS(0)).unwrap();
        let e = t.acquire("k", "a", MS(5000), MS(90)).unwrap();
        assert_eq!(
            e,
            vec![Effect::Renewed {
                key: "k".into(),
                token: 1,
                ttl: MS(100)
            }]
        );
        assert_eq!(t.holder("k").unwrap().deadline, MS(190));
    }

    /// After replay + recovered(now), a held lease lasts a full TTL from the restart and the
    /// next token exceeds every token granted or observed before it.
    #[test]
    fn restart_holds_for_full_ttl() {
        let mut t = LeaseTable::default();
        let mut log = t.acquire("k", "a", MS(100), MS(0)).unwrap();
        log.extend(t.fence("k", 1).unwrap());
        // A lock granted by another store (split mode): its tokens are only observed.
        log.extend(t.fence("x", 7).unwrap());
        let mut r = LeaseTable::default();
        log.iter().for_each(|e| r.replay(e));
        r.recovered(MS(1000));
        assert!(matches!(
            r.acquire("k", "b", MS(100), MS(1099)),
            Err(LockdError::LockHeld { .. })
        ));
        let e = r.acquire("k", "b", MS(100), MS(1100)).unwrap();
        assert!(e.iter().any(|e| matches!(e, Effect::Granted { token: 2, .. })));
        let e = r.acquire("x", "b", MS(100), MS(1100)).unwrap();
        assert!(e.iter().any(|e| matches!(e, Effect::Granted { token: 8, .. })));
    }

    /// A fence token above every token granted for a lock granted here is refused as
    /// `Invalid` and changes nothing: u64::MAX cannot fence the holder out, and the next grant
    /// is the previous one + 1.
    #[test]
    fn forged_fence_token_refused() {
        let mut t = LeaseTable::default();
        t.acquire("k", "a", MS(100), MS(0)).unwrap();
        for forged in [2, 3, u64::MAX] {
            assert!(matches!(t.fence("k", forged), Err(LockdError::Invalid(_))), "{forged}");
            assert!(
                matches!(t.check_fence("k", forged), Err(LockdError::Invalid(_))),
                "{forged}"
            );
        }
        assert_eq!(t.highest("k"), 1);
        assert_eq!(t.fence("k", 1).unwrap(), None, "the holder keeps writing");
        t.release("k", 1, MS(1)).unwrap();
        let e = t.acquire("k", "b", MS(100), MS(2)).unwrap();
        assert!(e.iter().any(|e| matches!(e, Effect::Granted { token: 2, .. })), "{e:?}");
    }

    /// Grant arithmetic is checked: a lock whose observed token is u64::MAX (only possible
    /// for a lock granted elsewhere) refuses a grant instead of wrapping around or panicking.
    #[test]
    fn exhausted_token_space_refuses_grant() {
        let mut t = LeaseTable::default();
        t.fence("ext", u64::MAX).unwrap();
        assert!(matches!(
            t.acquire("ext", "a", MS(100), MS(0)),
            Err(LockdError::Unavailable(_))
        ));
        assert!(t.holder("ext").is_none());
    }

    /// A snapshot's mark effects restore both marks exactly, so fence checks and the next
    /// grant are the same after compaction, even for a lock that is no longer held.
    #[test]
    fn marks_survive_snapshot_replay() {
        let mut t = LeaseTable::default();
        t.acquire("k", "a", MS(100), MS(0)).unwrap();
        t.release("k", 1, MS(1)).unwrap();
        t.acquire("k", "a", MS(100), MS(2)).unwrap();
        t.fence("ext", 40).unwrap();
        let mut r = LeaseTable::default();
        t.mark_effects().iter().for_each(|e| r.replay(e));
        for k in ["k", "ext", "none"] {
            assert_eq!((r.granted(k), r.highest(k)), (t.granted(k), t.highest(k)), "{k}");
        }
        assert!(matches!(r.fence("k", 3), Err(LockdError::Invalid(_))));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Acquire(usize, usize, u64),
        Renew(usize, usize),
        Release(usize, usize),
        Fence(usize, u64),
        Advance(u64),
        Tick,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 0..3usize, 1..200u64).prop_map(|(k, v, t)| Op::Acquire(k, v, t)),
            (0..3usize, 0..8usize).prop_map(|(k, i)| Op::Renew(k, i)),
            (0..3usize, 0..8usize).prop_map(|(k, i)| Op::Release(k, i)),
            (0..3usize, 0..12u64).prop_map(|(k, t)| Op::Fence(k, t)),
            (0..150u64).prop_map(Op::Advance),
            Just(Op::Tick),
            Just(Op::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Over random acquire/renew/release/expire/restart sequences:
        /// 1. at most one holder per key at any instant, and no grant to a second holder
        ///    while the previous one may still believe it holds (its last acknowledged
        ///    grant/renew + TTL has not passed), unless it released — also across restarts;
        /// 2. tokens per key strictly increase, also across restarts;
        /// 3. a fenced write with a token below one already granted is always rejected, and
        ///    so is one above every token granted for a lock granted here.
        #[test]
        fn lease_safety(ops in proptest::collection::vec(op(), 1..80)) {
            let keys = ["a", "b", "c"];
            let mut t = LeaseTable::default();
            let mut durable: Vec<Effect> = Vec::new();
            let mut now = Duration::ZERO;
            // Per key: tokens granted, in order; and what the current believer may assume.
            let mut granted: HashMap<&str, Vec<u64>> = HashMap::new();
            let mut believed: HashMap<&str, (u64, Duration)> = HashMap::new();
            for op in ops {
                let mut effects = Vec::new();
                match op {
                    Op::Acquire(k, v, ttl) => {
                        if let Ok(e) = t.acquire(keys[k], &format!("v{v}"), MS(ttl), now) { effects = e; }
                    }
                    Op::Renew(k, i) => {
                        let tok = granted.get(keys[k]).and_then(|g| g.get(i % g.len().max(1))).copied().unwrap_or(i as u64);
                        if let Ok(e) = t.renew(keys[k], tok, now) { effects.push(e); }
                    }
                    Op::Release(k, i) => {
                        let tok = granted.get(keys[k]).and_then(|g| g.get(i % g.len().max(1))).copied().unwrap_or(i as u64);
                        if let Ok(e) = t.release(keys[k], tok, now) { effects = e; }
                    }
                    Op::Fence(k, tok) => {
                        let max_granted = granted.get(keys[k]).and_then(|g| g.last()).copied().unwrap_or(0);
                        match t.fence(keys[k], tok) {
                            Ok(e) => {
                                prop_assert!(tok >= max_granted, "stale token {tok} accepted after grant {max_granted}");
                                prop_assert!(max_granted == 0 || tok <= max_granted, "never-granted token {tok} accepted (granted {max_granted})");
                                effects.extend(e);
                            }
                            Err(LockdError::Fenced { .. }) => prop_assert!(tok < t.highest(keys[k])),
                            Err(LockdError::Invalid(_)) => prop_assert!(max_granted > 0 && tok > max_granted, "token {tok} refused as forged (granted {max_granted})"),
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    Op::Advance(ms) => now += MS(ms),
                    Op::Tick => effects = t.tick(now),
                    Op::Restart => {
                        let mut r = LeaseTable::default();
                        durable.iter().for_each(|e| r.replay(e));
                        r.recovered(now);
                        t = r;
                    }
                }
                for e in effects {
                    match &e {
                        Effect::Granted { key, token, ttl, .. } => {
                            let k = keys.iter().find(|k| **k == key.as_str()).copied().unwrap_or("a");
                            if let Some((_, until)) = believed.get(k) {
                                prop_assert!(*until <= now, "grant of {key} at {now:?} while previous holder may act until {until:?}");
                            }
                            let g = granted.entry(k).or_default();
                            if let Some(last) = g.last() { prop_assert!(token > last, "token {token} after {last}"); }
                            g.push(*token);
                            believed.insert(k, (*token, now + *ttl));
                            durable.push(e.clone());
                        }
                        Effect::Renewed { key, token, ttl } => {
                            let k = keys.iter().find(|k| **k == key.as_str()).copied().unwrap_or("a");
                            believed.insert(k, (*token, now + *ttl));
                        }
                        Effect::Ended { key, token, reason } => {
                            let k = keys.iter().find(|k| **k == key.as_str()).copied().unwrap_or("a");
                            if *reason == EndReason::Released {
                                if believed.get(k).is_some_and(|(t, _)| t == token) { believed.remove(k); }
                            } else if let Some((_, until)) = believed.get(k) {
                                prop_assert!(*until <= now, "expired before the holder's deadline");
                            }
                            durable.push(e.clone());
                        }
                        Effect::Observed { .. } | Effect::GrantedUpTo { .. } => durable.push(e.clone()),
                    }
                }
                // At most one holder per key, and it is the latest grant.
                for k in keys {
                    if let Some(l) = t.holder(k) {
                        prop_assert_eq!(Some(l.token), granted.get(k).and_then(|g| g.last()).copied());
                    }
                }
            }
        }
    }
}

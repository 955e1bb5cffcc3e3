//! What the end of an active term does, decided apart from doing it: the lock loop
//! (`ha/mod.rs`) learns why the term ended and carries out the [`EndPlan`] this module
//! returns, in its order: stop serving, drain (or not), close the cluster channel, give the
//! lock up, wait for the channel's lingering connections (or not), then exit or contend again.

use std::time::Duration;

/// Why an active term ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TermEnd {
    /// The lease ran out, or the store refused one of the term's writes as fenced.
    Lost,
    /// `sys/step-down`.
    StepDown,
    /// The node is being sealed.
    Sealed,
    /// The process is shutting down (SIGTERM).
    Shutdown,
}

/// How the term gives up its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// Drop the guard without a release: the lease is gone (or its fence refused), so a
    /// release could only fail or, worse, free a lock another node holds now.
    Abandon,
    /// Release the lock, so the next active takes over without waiting for the lease TTL.
    Release,
}

/// What the lock loop does once the term is torn down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Leave the loop: the process is exiting.
    Exit,
    /// Back to standby (or sealed, when sealing), contending again after `after`.
    Contend { after: Duration },
}

/// The end of one term, decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EndPlan {
    /// Wait (bounded) for the requests already admitted to finish with the term's fence.
    /// Not for a lost term: its fence is stale, the store refuses its writes anyway.
    pub drain: bool,
    pub give_up: GiveUp,
    /// After the lock is given up, stay until the cluster channel's open connections have
    /// lingered: only when the process exits, which would reset them under the proxies'
    /// requests (a live process leaves them to linger in the background).
    pub wait_linger: bool,
    pub next: Next,
}

/// The plan for a term that ended by `end`. `step_down_wait` is Vault's pause after a
/// step-down before contending again, so another node takes the lock.
pub(crate) fn plan(end: TermEnd, step_down_wait: Duration) -> EndPlan {
    let lost = end == TermEnd::Lost;
    EndPlan {
        drain: !lost,
        give_up: if lost { GiveUp::Abandon } else { GiveUp::Release },
        wait_linger: end == TermEnd::Shutdown,
        next: match end {
            TermEnd::Shutdown => Next::Exit,
            TermEnd::StepDown => Next::Contend { after: step_down_wait },
            // Sealed: the loop waits for unseal before it contends anyway.
            TermEnd::Lost | TermEnd::Sealed => Next::Contend { after: Duration::ZERO },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDS: [TermEnd; 4] = [TermEnd::Lost, TermEnd::StepDown, TermEnd::Sealed, TermEnd::Shutdown];

    /// A lost term neither drains nor releases (its fence and lease are another node's
    /// now); every other end drains its admitted requests and releases the lock.
    #[test]
    fn only_a_lost_term_abandons_its_lock_undrained() {
        for end in ENDS {
            let p = plan(end, Duration::from_secs(10));
            let lost = end == TermEnd::Lost;
            assert_eq!(p.drain, !lost, "{end:?}");
            assert_eq!(p.give_up == GiveUp::Abandon, lost, "{end:?}");
        }
    }

    /// Only a shutdown exits, and only a shutdown waits for the channel's linger (a process
    /// that stays leaves its connections to linger in the background).
    #[test]
    fn only_shutdown_exits_and_waits_for_the_linger() {
        for end in ENDS {
            let p = plan(end, Duration::from_secs(10));
            let shutdown = end == TermEnd::Shutdown;
            assert_eq!(p.wait_linger, shutdown, "{end:?}");
            assert_eq!(p.next == Next::Exit, shutdown, "{end:?}");
        }
    }

    /// After a step-down the node waits `step_down_wait` before contending (so another node
    /// takes the lock); after a lost or sealed term it contends at once.
    #[test]
    fn only_a_step_down_holds_off() {
        for wait in [Duration::ZERO, Duration::from_millis(1), Duration::from_secs(10)] {
            assert_eq!(plan(TermEnd::StepDown, wait).next, Next::Contend { after: wait });
            for end in [TermEnd::Lost, TermEnd::Sealed] {
                assert_eq!(plan(end, wait).next, Next::Contend { after: Duration::ZERO }, "{end:?}");
            }
        }
    }
}

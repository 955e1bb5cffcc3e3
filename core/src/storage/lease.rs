//! The holder side of a lock lease, one schedule for every lock client (lockd, etcd):
//! renew every [`LockTiming::renew_interval`], retry sooner after a failed attempt, move
//! the holder deadline forward after each renewal, and fire `lost` when the store says the
//! lease ended or the deadline passes without a renewal. Each store supplies only its
//! renewal call ([`Renew`]).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::LockTiming;

/// The shortest retry delay after a failed renewal, so a store that fails at once is not
/// called in a tight loop.
const MIN_RETRY: Duration = Duration::from_millis(10);

/// What one renewal attempt found.
#[derive(Debug)]
pub enum Renewal {
    /// The store renewed the lease for this long, counted from when the attempt was sent
    /// (capped at the TTL asked for).
    Granted(Duration),
    /// The store says the lease no longer exists: the lock is lost now.
    Ended,
    /// No answer, or a transport error: retried until the deadline.
    Failed(String),
}

/// One store's renewal call.
pub trait Renew: Send {
    /// Renews the lease once, answering within `budget` (the time left before the holder
    /// deadline).
    fn renew(&mut self, budget: Duration) -> impl Future<Output = Renewal> + Send;
}

/// Keeps a lease granted at `first_sent` until `lost` is cancelled (release) or the lease is
/// lost (then cancels `lost`). Every new holder deadline is sent on `deadline_tx`.
pub async fn keep_lease(
    lock: &str,
    mut store: impl Renew,
    first_sent: Instant,
    timing: LockTiming,
    lost: CancellationToken,
    deadline_tx: watch::Sender<Instant>,
) {
    let mut deadline = first_sent + timing.ttl - timing.margin;
    // After a failed attempt, retry sooner than the regular interval.
    let retry = (timing.renew_interval / 4).max(MIN_RETRY);
    let mut next = first_sent + timing.renew_interval;
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep_until(next.min(deadline)) => {}
        }
        if Instant::now() >= deadline {
            tracing::warn!(lock, "lock lease deadline passed without a renewal; lock lost");
            lost.cancel();
            return;
        }
        let sent = Instant::now();
        let budget = deadline.saturating_duration_since(sent);
        let r = tokio::select! {
            _ = lost.cancelled() => return,
            r = store.renew(budget) => r,
        };
        match r {
            Renewal::Granted(granted) => {
                deadline = deadline.max(holder_deadline(sent, granted, timing));
                deadline_tx.send_replace(deadline);
                next = sent + timing.renew_interval;
            }
            Renewal::Ended => {
                tracing::warn!(lock, "the store says the lease ended; lock lost");
                lost.cancel();
                return;
            }
            Renewal::Failed(e) => {
                tracing::debug!(lock, error = %e, "renewal failed; retrying until the deadline");
                next = Instant::now() + retry;
            }
        }
    }
}

/// The holder's deadline after a renewal sent at `sent` that the store granted for
/// `granted`: the margin before the store's earliest re-grant, never more than half the
/// grant.
fn holder_deadline(sent: Instant, granted: Duration, timing: LockTiming) -> Instant {
    let granted = granted.min(timing.ttl);
    sent + granted - timing.margin.min(granted / 2)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Each renewal attempt: when it was made and the budget it was given.
    type Calls = Arc<Mutex<Vec<(Instant, Duration)>>>;

    /// Answers renewals from a script and records each attempt.
    struct Script {
        answers: VecDeque<Renewal>,
        calls: Calls,
    }

    impl Renew for Script {
        async fn renew(&mut self, budget: Duration) -> Renewal {
            self.calls.lock().unwrap().push((Instant::now(), budget));
            self.answers
                .pop_front()
                .unwrap_or(Renewal::Failed("script ended".into()))
        }
    }

    fn run(answers: Vec<Renewal>) -> (CancellationToken, Calls, watch::Receiver<Instant>, Instant) {
        let timing = LockTiming::from_ttl(Duration::from_secs(10));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let lost = CancellationToken::new();
        let start = Instant::now();
        let (tx, rx) = watch::channel(start);
        let s = Script {
            answers: answers.into(),
            calls: calls.clone(),
        };
        tokio::spawn(keep_lease("k", s, start, timing, lost.clone(), tx));
        (lost, calls, rx, start)
    }

    /// Renewals run every TTL/10 and each one moves the deadline to sent + TTL - TTL/5;
    /// once the store stops answering, the lease is lost exactly at the last deadline.
    #[tokio::test(start_paused = true)]
    async fn renews_on_schedule_and_is_lost_at_the_deadline() {
        let (lost, calls, rx, start) = run(vec![
            Renewal::Granted(Duration::from_secs(10)),
            Renewal::Granted(Duration::from_secs(10)),
        ]);
        lost.cancelled().await;
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls[0].0 - start, Duration::from_secs(1));
        assert_eq!(calls[1].0 - start, Duration::from_secs(2));
        // Last renewal at 2 s: deadline 2 + 10 - 2 = 10 s.
        assert_eq!(*rx.borrow() - start, Duration::from_secs(10));
        assert_eq!(Instant::now() - start, Duration::from_secs(10));
        // Failed attempts retried every TTL/40 with a shrinking budget.
        assert_eq!(calls[3].0 - calls[2].0, Duration::from_millis(250));
        assert!(calls.windows(2).all(|w| w[1].1 <= w[0].1));
    }

    /// The store saying the lease ended loses the lock at once, long before the deadline.
    #[tokio::test(start_paused = true)]
    async fn ended_lease_is_lost_at_once() {
        let (lost, _, _, start) = run(vec![Renewal::Ended]);
        lost.cancelled().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
    }

    /// A short grant (etcd rounding its TTL) gives the deadline sent + grant - min(margin,
    /// grant/2); grants over the TTL count as the TTL.
    #[test]
    fn holder_deadline_caps_and_halves() {
        let t = LockTiming::from_ttl(Duration::from_secs(10));
        let now = Instant::now();
        assert_eq!(
            holder_deadline(now, Duration::from_secs(10), t) - now,
            Duration::from_secs(8)
        );
        assert_eq!(
            holder_deadline(now, Duration::from_secs(60), t) - now,
            Duration::from_secs(8)
        );
        assert_eq!(
            holder_deadline(now, Duration::from_secs(2), t) - now,
            Duration::from_secs(1)
        );
    }

    /// Releasing (cancelling `lost`) stops the renewals.
    #[tokio::test(start_paused = true)]
    async fn release_stops_renewing() {
        let (lost, calls, _, _) = run((0..100).map(|_| Renewal::Granted(Duration::from_secs(10))).collect());
        tokio::time::sleep(Duration::from_millis(3500)).await;
        lost.cancel();
        let n = calls.lock().unwrap().len();
        assert_eq!(n, 3);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(calls.lock().unwrap().len(), n);
    }
}

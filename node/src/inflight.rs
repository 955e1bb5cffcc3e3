//! Counts the logical requests (KV, tokens, policies, mounts) running on this node, so a
//! term can end cleanly: at step-down the role flips first (no new request is admitted),
//! then the lock loop waits here for the ones already running, which still write with the
//! term's fencing token, before the token is dropped and the lock released.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The counter; cheap to clone.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Inner>);

#[derive(Default)]
struct Inner {
    n: AtomicUsize,
    idle: Notify,
}

/// One running request; dropping it ends the request.
pub struct InFlightGuard(Arc<Inner>);

impl InFlight {
    pub fn enter(&self) -> InFlightGuard {
        self.0.n.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.n.load(Ordering::SeqCst)
    }

    /// Returns once no request is running.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `wait_idle` returns at once with nothing running, and only after the last guard of
    /// several is dropped otherwise.
    #[tokio::test]
    async fn waits_for_the_last_guard() {
        let f = InFlight::default();
        f.wait_idle().await;
        let a = f.enter();
        let b = f.enter();
        let waiter = tokio::spawn({
            let f = f.clone();
            async move { f.wait_idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "returned with a request still running");
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("wait_idle returned")
            .unwrap();
        assert_eq!(f.count(), 0);
    }
}

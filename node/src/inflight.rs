//! The admission gate of logical requests (KV, tokens, policies, mounts) and their count,
//! so a term can end cleanly: the lock loop opens the gate when the node becomes active; at
//! the end of the term it closes it (no new request is admitted: they get the loop guard's
//! "not active"), then waits here for the ones already running, which still write with the
//! term's fencing token, before the token is dropped and the lock released. Admission and
//! closing take the same lock, so no request slips in after the drain began.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The gate and counter; cheap to clone.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// (requests running, gate open)
    state: Mutex<(usize, bool)>,
    idle: Notify,
}

/// One running request; dropping it ends the request.
pub struct InFlightGuard(Arc<Inner>);

impl InFlight {
    /// A gate that starts open (a node without HA) or closed (HA: opened per term).
    pub fn new(open: bool) -> InFlight {
        let f = InFlight::default();
        f.set_open(open);
        f
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, bool)> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a request, or `None` while the gate is closed.
    pub fn enter(&self) -> Option<InFlightGuard> {
        let mut st = self.lock();
        if !st.1 {
            return None;
        }
        st.0 += 1;
        Some(InFlightGuard(self.0.clone()))
    }

    /// Opens (a term starts) or closes (it ends) the gate.
    pub fn set_open(&self, open: bool) {
        self.lock().1 = open;
    }

    pub fn count(&self) -> usize {
        self.lock().0
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
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 -= 1;
        if st.0 == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A closed gate admits nothing; `wait_idle` returns at once with nothing running, and
    /// only after the last guard of several is dropped otherwise.
    #[tokio::test]
    async fn gate_and_waits_for_the_last_guard() {
        let f = InFlight::new(false);
        assert!(f.enter().is_none(), "a closed gate admitted a request");
        f.set_open(true);
        f.wait_idle().await;
        let a = f.enter().expect("open");
        let b = f.enter().expect("open");
        f.set_open(false);
        assert!(f.enter().is_none(), "admitted after closing");
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

//! The lock loop's decisions, apart from carrying them out: a pure state machine that takes
//! what happened ([`Event`]) and the time, and returns what to do next ([`Command`]s, in
//! order). The loop in `ha/mod.rs` only turns the world into events (the seal state, the
//! shutdown token, the outcome of the one operation it has pending, a term's end signals)
//! and carries the commands out; every choice (when to contend, what a term's end does,
//! which late signal to ignore) is made here, where the tests below drive it.
//!
//! ```text
//!            Unsealed                HoldOffElapsed          Acquired(t)
//!   Sealed ───────────► HoldingOff ───────────────► Contending ────────► SettingUp(t)
//!     ▲   (FollowActive)    ▲   (Contend)      │ AcquireFailed   (StopFollowing,   │ SetUp
//!     │                     └──────────────────┘ (HoldOff retry)  SetUp)           ▼
//!     │ ReportSealed                                                        Active(t)
//!     └──────────── Draining(t) ◄── Lost(t) / Fenced(t) / StepDown(t) / Sealed / Shutdown
//!                      │ Drained: close the channel, delete the advertisement, give the
//!                      ▼ lock up, then Exit, ReportSealed, or FollowActive + HoldOff
//! ```
//! Every signal of a term carries the term (its fencing token): a step-down or fencing
//! report that reaches the loop after its term ended for another reason belongs to no
//! running term and changes nothing, so it can never end the next one.

use std::time::Duration;

use tokio::time::Instant;

use super::term::{self, EndPlan, GiveUp, Next, TermEnd};

/// Pause after a failed lock attempt (storage unreachable) before trying again: short
/// enough to take over quickly once the store is back, long enough not to hammer it.
pub(crate) const ACQUIRE_RETRY: Duration = Duration::from_millis(250);
/// Pause after a failed leadership setup (listener bind or advertisement write failed).
pub(crate) const SETUP_RETRY: Duration = Duration::from_secs(1);

/// What the lock loop saw. `term` is the fencing token of the lock grant it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The barrier was unsealed.
    Unsealed,
    /// The barrier is being sealed.
    Sealed,
    /// The process is shutting down (SIGTERM).
    Shutdown,
    /// The hold-off sleep before contending is over.
    HoldOffElapsed,
    /// The lock attempt won grant `term`.
    Acquired { term: u64 },
    /// The lock attempt failed (store unreachable).
    AcquireFailed,
    /// The term's key, certificate, cluster channel and advertisement are in place.
    SetUp,
    /// The term's setup failed (nothing stays advertised).
    SetupFailed,
    /// The lease of grant `term` ran out.
    Lost { term: u64 },
    /// The store refused a write of grant `term` as fenced.
    Fenced { term: u64 },
    /// `sys/step-down` asked grant `term` to step down.
    StepDown { term: u64 },
    /// The requests admitted in the ending term are done (or the drain timed out).
    Drained,
}

/// Something measured at a transition, for the loop to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Observation {
    /// Contending took this long.
    LockAcquired(Duration),
    /// A term was lost after serving this long.
    TermLost(Duration),
    /// A step-down gave its lock up; measured from `since` (the end of the term) to when
    /// the loop carries this out, after the release.
    SteppedDown { since: Instant },
    /// A leadership setup failed.
    SetupFailed,
}

/// What the lock loop does, in the order given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// Report standby (no fence) and follow the active: learn who it is, heartbeat to it.
    FollowActive,
    /// Stop following the active.
    StopFollowing,
    /// Sleep, then [`Event::HoldOffElapsed`].
    HoldOff(Duration),
    /// Contend for the lock with a fresh lock value: [`Event::Acquired`] or
    /// [`Event::AcquireFailed`].
    Contend,
    /// Drop the pending sleep or lock attempt (nothing is held yet).
    Cancel,
    /// A fresh key and certificate, the cluster channel, the advertisement written with the
    /// grant's fence, stale advertisements deleted: [`Event::SetUp`] or
    /// [`Event::SetupFailed`].
    SetUp,
    /// Open the request gate, report active, and watch the term's end signals.
    Activate,
    /// Report standby and close the request gate: nothing new is admitted. The term's
    /// signals are dropped with it.
    StopServing,
    /// Wait (bounded) for the requests already admitted: [`Event::Drained`].
    Drain,
    /// Forget the term's fence and identity: nothing this node runs later can write.
    DropFence,
    /// Stop accepting on the cluster channel; its open connections linger.
    CloseChannel,
    /// Delete this term's advertisement (best effort, bounded).
    DeleteAdvertisement,
    /// Give the lock up.
    GiveUp(GiveUp),
    /// Wait until the closed channel's connections are done.
    WaitLinger,
    /// Report sealed.
    ReportSealed,
    /// Record a measurement.
    Observe(Observation),
    /// Leave the loop.
    Exit,
}

/// Where the loop is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Sealed (or not yet unsealed): nothing held, nothing pending.
    Sealed,
    /// A standby waiting before it contends.
    HoldingOff,
    /// A standby contending for the lock since `since`.
    Contending { since: Instant },
    /// Holding grant `term`, setting the term up.
    SettingUp { term: u64 },
    /// Active in grant `term` since `since`.
    Active { term: u64, since: Instant },
    /// Grant `term` ended by `end` at `ended`; waiting for its requests to drain.
    Draining {
        term: u64,
        end: TermEnd,
        plan: EndPlan,
        ended: Instant,
    },
    /// The loop is over.
    Exited,
}

/// The lock loop's state.
#[derive(Clone, Debug)]
pub(crate) struct Machine {
    phase: Phase,
    sealed: bool,
    shutdown: bool,
    /// How long the next standby phase waits before contending.
    hold_off: Duration,
    /// Vault's `step_down_wait`.
    step_down_wait: Duration,
}

impl Machine {
    /// A machine for a node that starts sealed.
    pub(crate) fn new(step_down_wait: Duration) -> Machine {
        Machine {
            phase: Phase::Sealed,
            sealed: true,
            shutdown: false,
            hold_off: Duration::ZERO,
            step_down_wait,
        }
    }

    /// Where the machine is (the tests' view of it).
    #[cfg(test)]
    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// The seal state the machine knows of (the loop reports a change as an event).
    pub(crate) fn sealed(&self) -> bool {
        self.sealed
    }

    /// True once the machine knows of the shutdown.
    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown
    }

    pub(crate) fn exited(&self) -> bool {
        self.phase == Phase::Exited
    }

    /// What to do about `event`, seen at `now`.
    pub(crate) fn on(&mut self, event: Event, now: Instant) -> Vec<Command> {
        use Command as C;
        match (event, self.phase) {
            (_, Phase::Exited) => Vec::new(),
            (Event::Shutdown, _) if self.shutdown => Vec::new(),
            (Event::Sealed, _) if self.sealed => Vec::new(),
            (Event::Unsealed, _) if !self.sealed => Vec::new(),

            (Event::Shutdown, phase) => {
                self.shutdown = true;
                match phase {
                    Phase::Sealed => self.exit(Vec::new()),
                    Phase::HoldingOff | Phase::Contending { .. } => self.exit(vec![C::Cancel, C::StopFollowing]),
                    Phase::Active { term, since } => self.end_term(term, since, TermEnd::Shutdown, now),
                    // Setting up: its outcome ends the term at once. Draining: the teardown
                    // that follows exits.
                    Phase::SettingUp { .. } | Phase::Draining { .. } | Phase::Exited => Vec::new(),
                }
            }
            (Event::Sealed, phase) => {
                self.sealed = true;
                match phase {
                    Phase::HoldingOff | Phase::Contending { .. } => {
                        self.phase = Phase::Sealed;
                        vec![C::Cancel, C::StopFollowing, C::ReportSealed]
                    }
                    Phase::Active { term, since } => self.end_term(term, since, TermEnd::Sealed, now),
                    _ => Vec::new(),
                }
            }
            (Event::Unsealed, phase) => {
                self.sealed = false;
                match phase {
                    Phase::Sealed => self.follow(now),
                    _ => Vec::new(),
                }
            }
            (Event::HoldOffElapsed, Phase::HoldingOff) => {
                self.phase = Phase::Contending { since: now };
                vec![C::Contend]
            }
            (Event::Acquired { term }, Phase::Contending { since }) => {
                self.phase = Phase::SettingUp { term };
                vec![
                    C::Observe(Observation::LockAcquired(now.saturating_duration_since(since))),
                    C::StopFollowing,
                    C::SetUp,
                ]
            }
            // A grant the machine did not wait for (its attempt was cancelled as it won):
            // the loop holds a lock it must not keep.
            (Event::Acquired { .. }, _) => vec![C::GiveUp(GiveUp::Release)],
            (Event::AcquireFailed, Phase::Contending { .. }) => {
                self.phase = Phase::HoldingOff;
                vec![C::HoldOff(ACQUIRE_RETRY)]
            }
            (Event::SetUp, Phase::SettingUp { term }) => {
                if self.shutdown || self.sealed {
                    // Sealed or stopping while setting up: never activate; tear the set-up
                    // term down as if it had ended at once.
                    let end = if self.shutdown {
                        TermEnd::Shutdown
                    } else {
                        TermEnd::Sealed
                    };
                    return self.end_term(term, now, end, now);
                }
                self.phase = Phase::Active { term, since: now };
                vec![C::Activate]
            }
            (Event::SetupFailed, Phase::SettingUp { .. }) => {
                self.hold_off = SETUP_RETRY;
                let mut cmds = vec![C::Observe(Observation::SetupFailed), C::GiveUp(GiveUp::Release)];
                cmds.extend(self.after_term(false, now));
                cmds
            }
            (Event::Lost { term } | Event::Fenced { term }, Phase::Active { term: t, since }) if term == t => {
                self.end_term(t, since, TermEnd::Lost, now)
            }
            (Event::StepDown { term }, Phase::Active { term: t, since }) if term == t => {
                self.end_term(t, since, TermEnd::StepDown, now)
            }
            (Event::Drained, Phase::Draining { end, plan, ended, .. }) => self.finish_term(end, plan, ended, now),
            // Late or stale: an outcome nothing waits for, a signal of a term that is over.
            _ => Vec::new(),
        }
    }

    /// Standby: follow the active, and contend after the pending hold-off.
    fn follow(&mut self, now: Instant) -> Vec<Command> {
        let wait = std::mem::take(&mut self.hold_off);
        if wait.is_zero() {
            self.phase = Phase::Contending { since: now };
            vec![Command::FollowActive, Command::Contend]
        } else {
            self.phase = Phase::HoldingOff;
            vec![Command::FollowActive, Command::HoldOff(wait)]
        }
    }

    fn exit(&mut self, mut cmds: Vec<Command>) -> Vec<Command> {
        self.phase = Phase::Exited;
        cmds.push(Command::Exit);
        cmds
    }

    /// The term `term`, active since `since`, ended by `end` at `now`: stop serving at once,
    /// then drain or go straight to the teardown.
    fn end_term(&mut self, term: u64, since: Instant, end: TermEnd, now: Instant) -> Vec<Command> {
        let plan = term::plan(end, self.step_down_wait);
        let mut cmds = vec![Command::StopServing];
        if end == TermEnd::Lost {
            cmds.push(Command::Observe(Observation::TermLost(
                now.saturating_duration_since(since),
            )));
        }
        if plan.drain {
            self.phase = Phase::Draining {
                term,
                end,
                plan,
                ended: now,
            };
            cmds.push(Command::Drain);
        } else {
            cmds.extend(self.finish_term(end, plan, now, now));
        }
        cmds
    }

    /// The teardown after the drain: the fence goes, the channel closes, the advertisement
    /// is deleted, the lock is given up; then exit, sealed, or standby again.
    fn finish_term(&mut self, end: TermEnd, plan: EndPlan, ended: Instant, now: Instant) -> Vec<Command> {
        let mut cmds = vec![
            Command::DropFence,
            Command::CloseChannel,
            Command::DeleteAdvertisement,
            Command::GiveUp(plan.give_up),
        ];
        if end == TermEnd::StepDown && plan.give_up == GiveUp::Release {
            cmds.push(Command::Observe(Observation::SteppedDown { since: ended }));
        }
        if let Next::Contend { after } = plan.next {
            self.hold_off = after;
        }
        // A shutdown that arrived during the teardown exits too, so it waits for the
        // channel's connections like a term ended by the shutdown itself.
        let exiting = plan.next == Next::Exit || self.shutdown;
        cmds.extend(self.after_term(exiting && (plan.wait_linger || self.shutdown), now));
        cmds
    }

    /// Nothing is held any more: exit, report sealed, or follow the active again.
    fn after_term(&mut self, wait_linger: bool, now: Instant) -> Vec<Command> {
        let mut cmds = Vec::new();
        if self.shutdown {
            if wait_linger {
                cmds.push(Command::WaitLinger);
            }
            return self.exit(cmds);
        }
        if self.sealed {
            self.phase = Phase::Sealed;
            cmds.push(Command::ReportSealed);
            return cmds;
        }
        cmds.extend(self.follow(now));
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WAIT: Duration = Duration::from_secs(3);

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    /// Drives a machine to active in grant `term`.
    fn active(m: &mut Machine, term: u64, now: Instant) {
        m.on(Event::Unsealed, now);
        assert_eq!(m.phase(), Phase::Contending { since: now });
        m.on(Event::Acquired { term }, now);
        m.on(Event::SetUp, now);
        assert_eq!(m.phase(), Phase::Active { term, since: now });
    }

    /// The stale-permit race: a term ends by losing its lease while a step-down and a
    /// fencing report for the same term are in flight. Those reports arrive after the
    /// node's next term began; they belong to the old grant and change nothing, so the
    /// next term keeps serving.
    #[test]
    fn a_late_signal_of_an_ended_term_never_ends_the_next_one() {
        let t0 = Instant::now();
        let mut m = Machine::new(WAIT);
        active(&mut m, 7, t0);
        let cmds = m.on(Event::Lost { term: 7 }, at(t0, 10));
        assert!(cmds.contains(&Command::GiveUp(GiveUp::Abandon)), "{cmds:?}");
        assert_eq!(&cmds[cmds.len() - 2..], &[Command::FollowActive, Command::Contend]);
        m.on(Event::Acquired { term: 9 }, at(t0, 20));
        assert_eq!(m.on(Event::SetUp, at(t0, 30)), vec![Command::Activate]);
        for late in [
            Event::StepDown { term: 7 },
            Event::Fenced { term: 7 },
            Event::Lost { term: 7 },
        ] {
            assert_eq!(m.on(late, at(t0, 40)), Vec::new(), "{late:?}");
            assert_eq!(
                m.phase(),
                Phase::Active {
                    term: 9,
                    since: at(t0, 30)
                }
            );
        }
        // The running term's own signal still ends it.
        let cmds = m.on(Event::StepDown { term: 9 }, at(t0, 50));
        assert_eq!(cmds, vec![Command::StopServing, Command::Drain]);
    }

    /// A step-down drains, releases, measures, and contends again only after
    /// `step_down_wait`, following the new active meanwhile.
    #[test]
    fn a_step_down_releases_and_holds_off_before_contending() {
        let t0 = Instant::now();
        let mut m = Machine::new(WAIT);
        active(&mut m, 3, t0);
        m.on(Event::StepDown { term: 3 }, at(t0, 5));
        assert_eq!(
            m.on(Event::Drained, at(t0, 6)),
            vec![
                Command::DropFence,
                Command::CloseChannel,
                Command::DeleteAdvertisement,
                Command::GiveUp(GiveUp::Release),
                Command::Observe(Observation::SteppedDown { since: at(t0, 5) }),
                Command::FollowActive,
                Command::HoldOff(WAIT),
            ]
        );
        assert_eq!(m.on(Event::HoldOffElapsed, at(t0, 3006)), vec![Command::Contend]);
    }

    /// A shutdown that arrives while a step-down drains exits after the teardown, and waits
    /// for the channel's connections as a shutdown does.
    #[test]
    fn a_shutdown_during_a_drain_exits_after_the_teardown() {
        let t0 = Instant::now();
        let mut m = Machine::new(WAIT);
        active(&mut m, 3, t0);
        m.on(Event::StepDown { term: 3 }, t0);
        assert_eq!(m.on(Event::Shutdown, t0), Vec::new());
        let cmds = m.on(Event::Drained, t0);
        assert_eq!(&cmds[cmds.len() - 2..], &[Command::WaitLinger, Command::Exit]);
        assert!(m.exited());
    }

    /// Sealed while setting up: the term never activates, and is torn down at once.
    #[test]
    fn sealed_while_setting_up_never_activates() {
        let t0 = Instant::now();
        let mut m = Machine::new(WAIT);
        m.on(Event::Unsealed, t0);
        m.on(Event::Acquired { term: 1 }, t0);
        assert_eq!(m.on(Event::Sealed, t0), Vec::new());
        let cmds = m.on(Event::SetUp, t0);
        assert!(!cmds.contains(&Command::Activate), "{cmds:?}");
        assert_eq!(cmds, vec![Command::StopServing, Command::Drain]);
        let cmds = m.on(Event::Drained, t0);
        assert_eq!(cmds.last(), Some(&Command::ReportSealed));
        assert_eq!(m.phase(), Phase::Sealed);
    }

    /// A failed lock attempt retries after [`ACQUIRE_RETRY`] without leaving standby.
    #[test]
    fn a_failed_attempt_retries_after_a_pause() {
        let t0 = Instant::now();
        let mut m = Machine::new(WAIT);
        m.on(Event::Unsealed, t0);
        assert_eq!(m.on(Event::AcquireFailed, t0), vec![Command::HoldOff(ACQUIRE_RETRY)]);
        assert_eq!(m.on(Event::HoldOffElapsed, t0), vec![Command::Contend]);
    }

    /// What the loop holds, replayed from the commands (the model the properties check).
    #[derive(Debug, Default)]
    struct World {
        sealed: bool,
        shutdown: bool,
        following: bool,
        holding: bool,
        serving: bool,
        fenced_in: bool,
        channel_open: bool,
        /// The operation an outcome event can answer.
        pending: Option<Pending>,
        exited: bool,
        /// The current grant and how it ended (`None` while it runs).
        term: Option<(u64, Option<TermEnd>)>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Pending {
        HoldOff,
        Contend,
        SetUp,
        Term,
        Drain,
    }

    impl World {
        fn apply(&mut self, cmd: Command) {
            assert!(!self.exited, "{cmd:?} after Exit");
            match cmd {
                Command::FollowActive => {
                    assert!(!self.following, "following twice");
                    assert!(!self.holding && !self.serving, "following while holding the lock");
                    self.following = true;
                }
                Command::StopFollowing => {
                    assert!(self.following);
                    self.following = false;
                }
                Command::HoldOff(_) => self.set_pending(Pending::HoldOff),
                Command::Contend => {
                    assert!(!self.holding, "contending while holding a lock");
                    assert!(!self.sealed && !self.shutdown, "contending while sealed or stopping");
                    assert!(self.following, "a contender follows the active");
                    self.set_pending(Pending::Contend);
                }
                Command::Cancel => {
                    assert!(matches!(self.pending, Some(Pending::HoldOff | Pending::Contend)));
                    self.pending = None;
                }
                Command::SetUp => {
                    assert!(self.holding);
                    self.set_pending(Pending::SetUp);
                    self.channel_open = true;
                }
                Command::Activate => {
                    assert!(self.holding && self.channel_open);
                    assert!(!self.sealed && !self.shutdown, "activated while sealed or stopping");
                    assert!(!self.following);
                    self.serving = true;
                    self.fenced_in = true;
                    self.set_pending(Pending::Term);
                }
                Command::StopServing => {
                    self.serving = false;
                    self.pending = None;
                }
                Command::Drain => self.set_pending(Pending::Drain),
                Command::DropFence => {
                    assert!(!self.serving);
                    self.fenced_in = false;
                }
                Command::CloseChannel => self.channel_open = false,
                Command::DeleteAdvertisement => assert!(!self.serving),
                Command::GiveUp(g) => {
                    assert!(self.holding, "giving up a lock not held");
                    assert!(!self.serving && !self.fenced_in, "lock given up while serving");
                    let lost = matches!(self.term, Some((_, Some(TermEnd::Lost))));
                    assert_eq!(g == GiveUp::Abandon, lost, "abandon exactly a lost grant");
                    self.holding = false;
                }
                Command::WaitLinger => assert!(self.shutdown && !self.holding),
                Command::ReportSealed => assert!(self.sealed && !self.holding && !self.serving),
                Command::Observe(_) => {}
                Command::Exit => {
                    assert!(self.shutdown);
                    assert!(
                        !self.holding && !self.serving && !self.following,
                        "exit holding something"
                    );
                    self.exited = true;
                }
            }
        }

        fn set_pending(&mut self, p: Pending) {
            assert_eq!(self.pending, None, "{p:?} while {:?} is pending", self.pending);
            self.pending = Some(p);
        }
    }

    /// Feeds one event to the machine and the model.
    fn feed(m: &mut Machine, w: &mut World, ev: Event, now: Instant) {
        if let Event::Lost { term } | Event::Fenced { term } | Event::StepDown { term } = ev {
            if let Some((t, end @ None)) = w.term.as_mut() {
                if *t == term && w.serving {
                    *end = Some(if matches!(ev, Event::StepDown { .. }) {
                        TermEnd::StepDown
                    } else {
                        TermEnd::Lost
                    });
                }
            }
        }
        let before = m.clone();
        let cmds = m.on(ev, now);
        if matches!(ev, Event::Sealed) {
            w.sealed = true;
        }
        if matches!(ev, Event::Unsealed) {
            w.sealed = false;
        }
        if matches!(ev, Event::Shutdown) {
            w.shutdown = true;
        }
        if let Event::Lost { term } | Event::Fenced { term } | Event::StepDown { term } = ev {
            let current = matches!(before.phase(), Phase::Active { term: t, .. } if t == term);
            if !current {
                assert!(cmds.is_empty(), "stale {ev:?} gave {cmds:?}");
                assert_eq!(m.phase(), before.phase(), "stale {ev:?} moved the machine");
            }
        }
        if let Event::Acquired { term } = ev {
            w.holding = true;
            w.term = Some((term, None));
        }
        for c in cmds {
            w.apply(c);
        }
    }

    proptest! {
        /// Whatever happens in whatever order, the commands keep the HA rules: never
        /// active while sealed or stopping; the lock is given up exactly once per grant,
        /// abandoned exactly when the grant was lost, and only after serving stopped and
        /// the fence was dropped; nobody contends while holding a lock or sealed; a
        /// signal of a term that is not running changes nothing; one operation is pending
        /// at a time; and a shutdown always ends in `Exit` with nothing held.
        #[test]
        fn the_lock_loop_keeps_the_ha_rules(steps in proptest::collection::vec((0u8..10, 0u64..3, 0u64..50), 1..80)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut m = Machine::new(WAIT);
            let mut w = World { sealed: true, ..World::default() };
            let mut next_term = 1u64;
            for (choice, back, dt) in steps {
                now += Duration::from_millis(dt);
                let current = w.term.map_or(0, |(t, _)| t);
                let ev = match (choice, w.pending) {
                    (0, _) => Event::Sealed,
                    (1, _) => Event::Unsealed,
                    (2, _) => Event::Shutdown,
                    (3, _) => Event::Lost { term: current.saturating_sub(back) },
                    (4, _) => Event::Fenced { term: current.saturating_sub(back) },
                    (5, _) => Event::StepDown { term: current.saturating_sub(back) },
                    (_, Some(Pending::HoldOff)) => Event::HoldOffElapsed,
                    (6 | 7, Some(Pending::Contend)) => {
                        next_term += 1 + back;
                        Event::Acquired { term: next_term }
                    }
                    (_, Some(Pending::Contend)) => Event::AcquireFailed,
                    (6..=8, Some(Pending::SetUp)) => Event::SetUp,
                    (_, Some(Pending::SetUp)) => Event::SetupFailed,
                    (_, Some(Pending::Drain)) => Event::Drained,
                    // Nothing pending, or a running term (it ends only by a signal): a
                    // late outcome the machine must ignore.
                    (_, _) => [Event::Drained, Event::HoldOffElapsed, Event::SetUp][usize::from(choice % 3)],
                };
                if matches!(ev, Event::Drained | Event::HoldOffElapsed | Event::SetUp)
                    && !matches!((ev, w.pending), (Event::Drained, Some(Pending::Drain)) | (Event::HoldOffElapsed, Some(Pending::HoldOff)) | (Event::SetUp, Some(Pending::SetUp)))
                {
                    let before = m.phase();
                    prop_assert_eq!(m.on(ev, now), Vec::new());
                    prop_assert_eq!(m.phase(), before);
                    continue;
                }
                if matches!(ev, Event::HoldOffElapsed | Event::Acquired { .. } | Event::AcquireFailed | Event::SetUp | Event::SetupFailed | Event::Drained) {
                    w.pending = None;
                }
                feed(&mut m, &mut w, ev, now);
                if w.exited {
                    break;
                }
            }
            // Shut down and let every pending operation finish: the loop exits, clean.
            feed(&mut m, &mut w, Event::Shutdown, now);
            for _ in 0..4 {
                let ev = match w.pending {
                    Some(Pending::SetUp) => Event::SetUp,
                    Some(Pending::Drain) => Event::Drained,
                    _ => break,
                };
                w.pending = None;
                feed(&mut m, &mut w, ev, now);
            }
            prop_assert!(w.exited && m.exited(), "no exit: {:?} {:?}", m.phase(), w);
        }
    }
}

//! Lock failover with the holder in another process (`vha lockd hold`): after SIGKILL of the
//! holder another client acquires within the documented bound (the lease TTL from the
//! holder's last renewal, plus expiry-timer slack), and a holder frozen with SIGSTOP past
//! its TTL gives up (its holder-side deadline) no later than lockd grants the lock elsewhere.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use vha_core::storage::lockd::LockTiming;
use vha_core::storage::HaBackend;
use vha_testkit::lockd::{field, spawn_holder};
use vha_testkit::{wait_until, ChildProc, TestLockd};

/// The holders' lease TTL in these tests: short so the tests are quick, long enough that a
/// busy CI machine does not expire a live holder.
const TTL: Duration = Duration::from_secs(2);

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

fn wait_line(p: &ChildProc, prefix: &str, timeout: Duration) -> String {
    wait_until(
        || p.output().lines().find(|l| l.starts_with(prefix)).map(str::to_string),
        &format!("holder prints {prefix:?}"),
        timeout,
    )
}

/// SIGKILL of the holder process: another client acquires within TTL + 1.5 s of the kill
/// (the documented bound is the TTL from the last renewal; the rest is a wide margin), and
/// never before the lease could have expired (the kill itself is no proof of death to
/// lockd). Five rounds; the distribution is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_holder_failover_within_ttl() {
    let l = TestLockd::start();
    let c = l.client().with_timing(LockTiming::from_ttl(TTL));
    let mut took = Vec::new();
    let mut last_token = 0;
    for round in 0..5 {
        let key = "failover/lock";
        let log = l.scratch().join(format!("holder-{round}.log"));
        let mut h = spawn_holder(&l, key, &format!("holder-{round}"), "2s", &log);
        let line = wait_line(&h, "acquired", Duration::from_secs(30));
        let token = field(&line, "token").unwrap() as u64;
        assert!(token > last_token as u64, "tokens increase across holders");
        // Let it renew a few times, so the kill lands at a random point of a renew cycle.
        tokio::time::sleep(Duration::from_millis(300 + 170 * round)).await;
        let killed = Instant::now();
        h.kill();
        let g = tokio::time::timeout(TTL * 5, c.acquire(key, "taker", Default::default()))
            .await
            .expect("acquire after holder death")
            .unwrap()
            .unwrap();
        let dt = killed.elapsed();
        assert!(g.fence().token > token);
        last_token = g.fence().token as u128;
        took.push(dt);
        g.release().await.unwrap();
    }
    took.sort();
    eprintln!("failover after SIGKILL of the holder (TTL {TTL:?}): {took:?}");
    for dt in &took {
        assert!(
            *dt <= TTL + Duration::from_millis(1500),
            "failover took {dt:?}, bound is TTL {TTL:?} + margin"
        );
        assert!(
            *dt >= TTL - TTL / 10 - Duration::from_millis(200),
            "lock handed over too early: {dt:?}"
        );
    }
}

/// A holder frozen with SIGSTOP past its TTL: lockd grants the lock to another client after
/// the lease expires; after SIGCONT the holder reports `lost`, and its holder-side deadline
/// (last renew sent + TTL - margin) is no later than lockd's grant to the other client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_holder_loses_before_regrant() {
    let l = TestLockd::start();
    let key = "frozen/lock";
    let log = l.scratch().join("holder.log");
    let h = spawn_holder(&l, key, "frozen", "2s", &log);
    let line = wait_line(&h, "acquired", Duration::from_secs(30));
    let token = field(&line, "token").unwrap() as u64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.signal(Signal::SIGSTOP);
    let c = l.client().with_timing(LockTiming::from_ttl(TTL));
    let g = tokio::time::timeout(TTL * 5, c.acquire(key, "taker", Default::default()))
        .await
        .expect("lockd grants after the frozen holder's lease expires")
        .unwrap()
        .unwrap();
    let granted_ms = unix_ms();
    assert!(g.fence().token > token);
    let cont = unix_ms();
    h.signal(Signal::SIGCONT);
    let lost = wait_line(&h, "lost", Duration::from_secs(10));
    let deadline_ms = field(&lost, "deadline_unix_ms").unwrap();
    let lost_ms = field(&lost, "unix_ms").unwrap();
    eprintln!(
        "frozen holder: deadline {} ms before lockd's grant; reported lost {} ms after SIGCONT",
        granted_ms as i128 - deadline_ms as i128,
        lost_ms as i128 - cont as i128
    );
    assert!(
        deadline_ms <= granted_ms,
        "holder deadline {deadline_ms} must not be after the grant {granted_ms}"
    );
    assert!(
        lost_ms >= cont && lost_ms - cont < 2000,
        "lost reported promptly after SIGCONT"
    );
    g.release().await.unwrap();
}

/// A grant that came after a long blocking wait (longer than the TTL) is not mistaken for an
/// expired one: the holder-side deadline counts from when lockd granted (`waited_ms`), not
/// from when the acquire was sent, so the new holder keeps the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_after_long_wait_is_kept() {
    let l = TestLockd::start();
    let short = LockTiming::from_ttl(TTL);
    let a = l.client().with_timing(short);
    let b = l.client().with_timing(short);
    let ga = a.acquire("wait/lock", "a", Default::default()).await.unwrap().unwrap();
    let waiter = tokio::spawn(async move { b.acquire("wait/lock", "b", Default::default()).await });
    tokio::time::sleep(TTL + TTL / 4).await;
    assert!(!ga.is_lost(), "a renewing holder keeps its lock past one TTL");
    ga.release().await.unwrap();
    let gb = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !gb.is_lost(),
        "a grant after a wait longer than the TTL must not be lost at once"
    );
    assert_eq!(
        l.client().holder("wait/lock").await.unwrap().map(|h| h.value),
        Some("b".to_string())
    );
    gb.release().await.unwrap();
}

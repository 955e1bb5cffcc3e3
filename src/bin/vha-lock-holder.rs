//! `vha-lock-holder`: a test helper, not part of the `vha` CLI. It holds one lockd lock in a
//! process of its own, so a test can freeze it (SIGSTOP) or kill it and watch the lock pass
//! on (`tests/lockd_failover.rs`, through `vha_testkit::lockd::spawn_holder`).
//!
//! `vha-lock-holder --address URL --key K --value V [--ttl 2s] [lockd client credentials]`
//! prints `acquired token=N unix_ms=T` once it holds the lock, then
//! `lost deadline_unix_ms=D unix_ms=T` when the lease is lost, and exits.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tokio_util::sync::CancellationToken;
use vha_core::storage::lockd::{LockTiming, LockdBackend};
use vha_lockd::cli::ClientCreds;

#[derive(Parser, Debug)]
#[command(
    name = "vha-lock-holder",
    about = "Holds a lockd lock until it is lost (test helper)"
)]
struct Args {
    #[arg(long)]
    address: String,
    #[command(flatten)]
    creds: ClientCreds,
    #[arg(long)]
    key: String,
    #[arg(long)]
    value: String,
    #[arg(long, default_value = "10s")]
    ttl: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let res = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            let c = args.creds.client(&args.address)?;
            rt.block_on(hold(&c, &args.key, &args.value, &args.ttl))
        });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vha-lock-holder: {e}");
            ExitCode::FAILURE
        }
    }
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// The wall-clock time of a tokio deadline.
fn wall(deadline: tokio::time::Instant) -> SystemTime {
    let (ni, ns) = (tokio::time::Instant::now(), SystemTime::now());
    if deadline >= ni {
        ns + (deadline - ni)
    } else {
        ns - (ni - deadline)
    }
}

async fn hold(c: &LockdBackend, key: &str, value: &str, ttl: &str) -> Result<(), String> {
    let ttl = vha_core::duration::parse(ttl).map_err(|e| e.to_string())?;
    let c = c.with_timing(LockTiming::from_ttl(ttl));
    let Some((guard, deadline)) = c
        .acquire_lease(key, value, CancellationToken::new())
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err("acquire cancelled".into());
    };
    println!(
        "acquired token={} unix_ms={}",
        guard.fence().token,
        unix_ms(SystemTime::now())
    );
    guard.lost().cancelled().await;
    let d = *deadline.borrow();
    println!(
        "lost deadline_unix_ms={} unix_ms={}",
        unix_ms(wall(d)),
        unix_ms(SystemTime::now())
    );
    // Keep the lock state as is (no release: it is lost already) and exit.
    std::mem::forget(guard);
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

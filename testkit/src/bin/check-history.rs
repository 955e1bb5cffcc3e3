//! Re-checks a history saved by a checked-history test (JSON lines, see
//! `vha_testkit::history`): `cargo run -p vha-testkit --bin check-history -- <file>`.
//! Prints the figures and every non-linearizable key with its operations; exits 1 when the
//! history is not linearizable (or a key's search did not end in time), 2 on a usage error.

use std::time::Duration;

use vha_testkit::history;

/// How long the search may take in all: a replay is run by hand, so be generous.
const DEADLINE: Duration = Duration::from_secs(600);

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: check-history <history.jsonl>");
        std::process::exit(2);
    };
    let ops = match history::load(std::path::Path::new(&path)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(2);
        }
    };
    let c = history::counts(&ops);
    let r = history::check(&ops, DEADLINE);
    for key in &r.violations {
        println!("NOT LINEARIZABLE: {key}");
        for op in history::ops_of(&ops, key) {
            println!("  {}", serde_json::to_string(op).unwrap_or_default());
        }
    }
    for key in &r.inconclusive {
        println!("INCONCLUSIVE (search did not end within {DEADLINE:?}): {key}");
    }
    println!(
        "{path}: {} operations ({} ok, {} failed, {} indeterminate), {} checked over {} keys, {} violations, {} inconclusive",
        ops.len(),
        c.ok,
        c.failed,
        c.indeterminate,
        r.checked,
        r.keys,
        r.violations.len(),
        r.inconclusive.len()
    );
    std::process::exit(if r.passed() { 0 } else { 1 });
}

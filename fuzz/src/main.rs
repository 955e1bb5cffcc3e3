//! vha's stable-toolchain fuzzer: a bounded mutational driver (no nightly, no libFuzzer).
//!
//! For each target: replay every file under `regressions/<target>/` first (a crash there
//! fails at once), then, until the time budget runs out, take a seed (built-in seeds, the
//! regressions, and inputs found so far), mutate it (bit flips, byte edits, inserts, deletes,
//! splices, dictionary tokens), and run the target under `catch_unwind`. A panic writes the
//! input to `regressions/<target>/crash-<hash>` and exits 1. Targets also assert properties
//! (a forged barrier envelope never opens, a normalized mount path has no `..`, ...), so a
//! broken property is a crash too.
//!
//! Usage: `vha-fuzz [--seconds N] [--seed S] [TARGET...]` (all targets when none is named);
//! prints `target <name>: <executions> executions, <regressions> regressions replayed`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod targets;

/// A small, fast, seeded PRNG (xorshift64*), so a run can be repeated with `--seed`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// One fuzz target: seeds, a dictionary of interesting tokens, and the function under test.
pub struct Target {
    pub name: &'static str,
    pub seeds: fn() -> Vec<Vec<u8>>,
    pub dict: &'static [&'static str],
    /// Runs one input; true if it got past the first decoding stage (worth mutating further).
    pub run: fn(&[u8]) -> bool,
}

const MAX_INPUT: usize = 8 * 1024;

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>], dict: &[&str]) {
    let n = 1 + rng.below(4);
    for _ in 0..n {
        match rng.below(9) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next_u64() as u8;
            }
            2 if !input.is_empty() => {
                let i = rng.below(input.len());
                let len = 1 + rng.below(16.min(input.len() - i));
                input.drain(i..i + len);
            }
            3 => {
                let i = rng.below(input.len() + 1);
                let len = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                input.splice(i..i, bytes);
            }
            4 | 5 if !dict.is_empty() => {
                let i = rng.below(input.len() + 1);
                let tok = dict[rng.below(dict.len())].as_bytes().to_vec();
                input.splice(i..i, tok);
            }
            6 if !pool.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(input.len() + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            7 if !input.is_empty() => {
                // Duplicate a chunk (deep nesting, repeated keys).
                let i = rng.below(input.len());
                let len = 1 + rng.below(32.min(input.len() - i));
                let chunk = input[i..i + len].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, chunk);
            }
            8 => {
                // Interesting bytes: boundaries of integers, NUL, high bit, invalid UTF-8.
                const SPECIAL: &[u8] = &[0, 0x7f, 0x80, 0xff, 0xfe, 0xc0, 0xed, b'"', b'\\', b'/', b'.', b'%'];
                let i = rng.below(input.len() + 1);
                input.insert(i, SPECIAL[rng.below(SPECIAL.len())]);
            }
            _ => {}
        }
    }
    input.truncate(MAX_INPUT);
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Runs `input`: `Some(deep)` if it returned, `None` on a panic (the input is then saved as a
/// regression when `save`).
fn exec(t: &Target, input: &[u8], dir: &Path, save: bool) -> Option<bool> {
    let r = panic::catch_unwind(AssertUnwindSafe(|| (t.run)(input))).ok();
    if r.is_none() && save {
        let _ = std::fs::create_dir_all(dir);
        let path = dir.join(format!("crash-{:016x}", hash(input)));
        let _ = std::fs::write(&path, input);
        eprintln!("target {}: CRASH, input saved to {}", t.name, path.display());
    }
    r
}

fn regressions(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_file() && p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')) {
                if let Ok(b) = std::fs::read(&p) {
                    out.push((p, b));
                }
            }
        }
    }
    out.sort();
    out
}

fn main() {
    let mut seconds = 20u64;
    let mut seed = 0x5eed_u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).expect("--seed S"),
            "--list" => {
                for t in targets::all() {
                    println!("{}", t.name);
                }
                return;
            }
            _ => names.push(a),
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let all = targets::all();
    let selected: Vec<&Target> = if names.is_empty() {
        all.iter().collect()
    } else {
        names
            .iter()
            .map(|n| {
                all.iter()
                    .find(|t| t.name == n)
                    .unwrap_or_else(|| panic!("unknown target {n}"))
            })
            .collect()
    };
    // Panics are expected to be caught and reported; keep stderr readable.
    panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    println!("seed {seed}, {seconds} s per target");
    let mut failed = false;
    for t in selected {
        let dir = root.join(t.name);
        let regs = regressions(&dir);
        for (p, b) in &regs {
            if exec(t, b, &dir, false).is_none() {
                eprintln!("target {}: regression {} fails", t.name, p.display());
                failed = true;
            }
        }
        let mut pool: Vec<Vec<u8>> = (t.seeds)();
        pool.extend(regs.iter().map(|(_, b)| b.clone()));
        for s in pool.clone() {
            if exec(t, &s, &dir, true).is_none() {
                failed = true;
            }
        }
        // Seeds stay in the pool; adopted mutants rotate through the slots after them.
        let fixed = pool.len();
        let mut rng = Rng::new(seed ^ hash(t.name.as_bytes()));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut execs: u64 = pool.len() as u64 + regs.len() as u64;
        let mut crashes = 0u64;
        while Instant::now() < deadline {
            for _ in 0..64 {
                let mut input = pool[rng.below(pool.len())].clone();
                mutate(&mut rng, &mut input, &pool, t.dict);
                execs += 1;
                let Some(deep) = exec(t, &input, &dir, true) else {
                    crashes += 1;
                    failed = true;
                    break;
                };
                // Keep a bounded, diverse pool: sometimes adopt a mutant that got past the
                // first decoding stage (inputs rejected at once would make the pool degenerate).
                if deep && rng.below(8) == 0 {
                    if pool.len() < 512 {
                        pool.push(input);
                    } else {
                        let i = fixed + rng.below(pool.len() - fixed);
                        pool[i] = input;
                    }
                }
            }
            if crashes > 0 {
                break;
            }
        }
        println!(
            "target {}: {execs} executions, {} regressions replayed, {crashes} crashes",
            t.name,
            regs.len()
        );
    }
    if failed {
        std::process::exit(1);
    }
}

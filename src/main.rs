//! `vha`: the one multi-call binary. Each subcommand lives in its crate (the servers in
//! node, proxy and lockd; the tooling in ops and bench); this file only dispatches. Go-style single-dash flags (`-config=FILE`, `-format=json`) are accepted as
//! Vault's CLI spells them.

use std::process::ExitCode;

/// mimalloc instead of glibc's allocator: a profile of a forwarding proxy under load spent
/// about 20% of its CPU in glibc malloc/free/memmove (Pingora allocates per request).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let args = normalize_flags(args);
    let Some(cmd) = args.get(1).cloned() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<String> = args[2..].to_vec();
    match cmd.as_str() {
        "server" => {
            vha_core::huge_pages::run_without();
            vha_node::cli::server(rest)
        }
        "lockd" if rest.first().map(String::as_str) == Some("bench") => vha_ops::lockd_bench::main(rest[1..].to_vec()),
        "lockd" => vha_lockd::cli::main(rest),
        "dev" => vha_ops::dev::main(rest),
        "proxy" => {
            vha_core::huge_pages::run_without();
            vha_proxy::cli::main(rest)
        }
        "bench" => vha_bench::cli::main(rest),
        "status" => vha_ops::cmd::status(rest),
        "operator" => vha_ops::cmd::operator(rest),
        "version" | "--version" | "-v" => {
            println!("vha v{}", vha_core::VERSION);
            ExitCode::SUCCESS
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("vha: unknown command {other:?}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

const USAGE: &str = "usage: vha <command> [args]

commands:
  server --config FILE   run a node (Vault-compatible API, HA lock, barrier)
  lockd [--config FILE]  run the embedded HA store (see `vha lockd --help`)
  proxy --config FILE    run the proxy of a pair (same HCL file as its node)
  bench [scenarios]      load-test forwarding throughput side by side (see `vha bench --help`)
  dev [--nodes N]        run a local HA cluster: lockd + N nodes (see `vha dev --help`)
  status [-address=URL]  seal and HA status of a server (like `vault status`)
  operator <init|unseal|seal|step-down|members>  operate a cluster (-format=json)
  version                print the version";

/// Turns Go-style `-flag` / `-flag=value` (two or more letters after one dash) into
/// `--flag` forms clap understands. Negative numbers and single-letter flags are left alone.
fn normalize_flags(args: Vec<String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let is_go_flag = i > 0
                && a.starts_with('-')
                && !a.starts_with("--")
                && a[1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphabetic() || *c == '-' || *c == '_')
                    .count()
                    >= 2;
            if is_go_flag {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

//! The one log set-up of every vha process (node, proxy, lockd): plain text on stderr at a
//! level in Vault's names, `RUST_LOG` winning over the configured level when set, and a way
//! to change the level later (a SIGHUP reload of the configuration).

use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

/// Sets a new log level (Vault's names: `trace`, `debug`, `info`, `warn`/`warning`, `err`/
/// `error`); an unknown name means `info`.
pub type SetLevel = Box<dyn Fn(&str) + Send + Sync>;

/// The filter of `level` for the process's own code, and `info` for each of `libraries`
/// (crates whose debug output would drown ours when the process runs at `debug`).
fn filter(level: &str, libraries: &[&str]) -> EnvFilter {
    let mut directives = LogLevel::parse(level).map_or("info", |l| l.as_str()).to_string();
    for lib in libraries {
        directives.push_str(&format!(",{lib}=info"));
    }
    EnvFilter::new(directives)
}

/// Installs the process's log subscriber at `level`, unless `RUST_LOG` names a valid filter,
/// which then decides at start and on every later change. Returns how to change the level
/// (`None` when `RUST_LOG` fixes it). Colours only on a terminal and without `NO_COLOR`.
pub fn init(level: &str, libraries: &'static [&'static str]) -> Option<SetLevel> {
    let from_env = EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let start = from_env.unwrap_or_else(|| filter(level, libraries));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(start)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_filter_reloading();
    let handle = builder.reload_handle();
    // A second call in one process (tests) keeps the first subscriber.
    let _ = builder.try_init();
    (!fixed).then(|| {
        Box::new(move |level: &str| {
            if let Err(e) = handle.reload(filter(level, libraries)) {
                tracing::warn!(error = %e, "could not change the log level");
            }
        }) as SetLevel
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vault's level names map onto tracing's, unknown names fall back to `info`, and the
    /// named libraries are held at `info`.
    #[test]
    fn filters_speak_vaults_level_names() {
        assert_eq!(filter("warning", &[]).to_string(), "warn");
        assert_eq!(filter("err", &[]).to_string(), "error");
        assert_eq!(filter("nonsense", &[]).to_string(), "info");
        let f = filter("debug", &["pingora", "h2"]).to_string();
        assert!(
            f.contains("pingora=info") && f.contains("h2=info") && f.contains("debug"),
            "{f}"
        );
    }
}

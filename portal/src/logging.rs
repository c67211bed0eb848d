//! Logging of both binaries (the portal and the operator): the level is a tracing filter
//! (`info`, `debug`, `info,portal::health=debug`) given on the command line, else `RUST_LOG`,
//! else `info`; lines go to stderr as text or as JSON objects, one per line. Text is coloured
//! only when stderr is a terminal (and `NO_COLOR` is unset), so files and `kubectl logs`
//! get plain text.
//!
//! May import: `config`.

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;

pub use crate::config::LogFormat;

/// A log level or format that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log level {level:?}: {message} (examples: info, debug, warn,portal=debug)")]
    Level { level: String, message: String },
    #[error("invalid log format {0:?}: text or json")]
    Format(String),
    #[error("logging already set up: {0}")]
    Init(String),
}

impl FromStr for LogFormat {
    type Err = LogError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            // Empty, as an environment variable set to "" is: the default.
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(LogError::Format(other.into())),
        }
    }
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a level (a tracing filter directive) without installing it.
pub fn check_level(level: &str) -> Result<(), LogError> {
    filter(Some(level)).map(|_| ())
}

/// The filter: `level` when given, else `RUST_LOG`, else info.
pub fn filter(level: Option<&str>) -> Result<EnvFilter, LogError> {
    match level.map(str::trim).filter(|l| !l.is_empty()) {
        Some(level) => EnvFilter::try_new(level).map_err(|e| LogError::Level {
            level: level.into(),
            message: e.to_string(),
        }),
        None => Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))),
    }
}

/// Whether text lines get ANSI colours: only on a terminal, and never with `NO_COLOR` set.
pub fn use_ansi() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber: stderr, `level` (see [`filter`]), `format`.
pub fn init(level: Option<&str>, format: LogFormat) -> Result<(), LogError> {
    let filter = filter(level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.with_ansi(use_ansi()).try_init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .try_init(),
    };
    result.map_err(|e| LogError::Init(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_print() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!(LogFormat::Json.to_string(), "json");
        assert_eq!("".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert!("yaml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn levels_are_checked() {
        check_level("info").unwrap();
        check_level("warn,portal::health=debug").unwrap();
        let e = check_level("portal=loud").unwrap_err().to_string();
        assert!(e.contains("portal=loud"), "{e}");
    }
}

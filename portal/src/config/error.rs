//! Why a configuration was refused: [`ConfigError`], made of [`FieldError`]s that each name
//! the field they are about.
//!
//! May import: nothing outside `config`.

use std::fmt;

/// One thing wrong with a configuration, with the field it is about (`backends[1].address`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not have the shape of a configuration.
    #[error("{0}")]
    Parse(FieldError),
    /// The YAML has the right shape but values that cannot work.
    #[error("{}", join(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// The fields named by this error (the first is the most relevant).
    pub fn fields(&self) -> Vec<&str> {
        match self {
            ConfigError::Read { .. } => Vec::new(),
            ConfigError::Parse(e) => vec![e.field.as_str()],
            ConfigError::Invalid(errors) => errors.iter().map(|e| e.field.as_str()).collect(),
        }
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

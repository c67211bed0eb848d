//! Configuration: the shared `DatabasePortal` spec, its parsing from YAML with errors that name
//! the field, and validation into [`Config`], the typed value the portal runs on. This file
//! owns the parsing ([`parse_yaml`], [`load_file`]) and re-exports every type, so that
//! `crate::config::X` names each of them.
//!
//! - the spec: `spec` (the resource and most sections) with `spec_tls`, `spec_pods`,
//!   `pooling`, `spec_portal` (portal-only keys), `spec_read_only` (the read-only listener)
//!   and `spec_status`; `engine` (the engine and
//!   the routing modes);
//! - the values they are written in: `duration`, `address`, [`ByteSize`] (in `pooling`);
//! - `validate` into `resolved` (the [`Config`]); `error`: why a configuration was refused;
//!   `text`: checks of text values and bounded reads.
//!
//! Every file imports only files below it: `duration`, `text`, `error` and `engine` at the
//! bottom; then `address` and `pooling`; the `spec_*` files; `spec`; `resolved`; `validate`.
//!
//! May import: nothing from the rest of the crate; every layer reads it.

mod address;
mod duration;
mod engine;
mod error;
mod pooling;
mod resolved;
mod spec;
mod spec_pods;
mod spec_portal;
mod spec_read_only;
mod spec_status;
mod spec_tls;
mod text;
mod validate;

use std::path::Path;

pub use address::{Address, AddressError};
pub use duration::{Duration, DurationError, DURATION_PATTERN};
pub use engine::*;
pub use error::*;
pub use pooling::{
    ByteSize, Multiplex, PgPool, Pooling, PoolingAuth, PoolingMode, BYTE_SIZE_PATTERN,
};
pub use resolved::*;
pub use spec::*;
pub use spec_pods::*;
pub use spec_portal::*;
pub use spec_read_only::*;
pub use spec_status::*;
pub use spec_tls::*;
pub use text::*;

/// Reads and validates a standalone configuration file.
pub fn load_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_yaml(&text)?.validate_standalone()
}

/// Parses YAML into a spec. Unknown keys are refused (a typo must not silently become a
/// default), and every error names the field it is about.
pub fn parse_yaml(text: &str) -> Result<DatabasePortalSpec, ConfigError> {
    if text.trim().is_empty() || text.trim() == "---" {
        return Err(ConfigError::Parse(FieldError {
            field: "(document)".into(),
            message: "the configuration is empty".into(),
        }));
    }
    let mut unknown = Vec::new();
    let deserializer = serde_norway::Deserializer::from_str(text);
    let mut on_unknown = |path: serde_ignored::Path| unknown.push(field_path(&path));
    let ignoring = serde_ignored::Deserializer::new(deserializer, &mut on_unknown);
    let spec: DatabasePortalSpec = serde_path_to_error::deserialize(ignoring).map_err(|e| {
        let mut field = e.path().to_string();
        if field == "." {
            field.clear();
        }
        let message = e.into_inner().to_string();
        // serde names a missing field only in its message; put it in the path too.
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            field = if field.is_empty() {
                missing.to_string()
            } else {
                format!("{field}.{missing}")
            };
        }
        if field.is_empty() {
            field = "(document)".into();
        }
        ConfigError::Parse(FieldError { field, message })
    })?;
    if !unknown.is_empty() {
        return Err(ConfigError::Invalid(
            unknown
                .into_iter()
                .map(|path| FieldError {
                    field: path,
                    message: "unknown field".into(),
                })
                .collect(),
        ));
    }
    Ok(spec)
}

/// `backends[0].foo` rather than serde_ignored's `backends.0.foo`.
fn field_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

#[cfg(test)]
mod tests;

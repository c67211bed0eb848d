//! `validate`: the first step of a reconcile. Checks what the CRD schema cannot (CIDRs,
//! addresses, name lengths, log levels) without touching the network.
//!
//! May import: `error`.

use kube::ResourceExt;
use portal::config::{Config, DatabasePortal, FieldError};

use crate::error::{Error, Result};

/// Longest DatabasePortal name: `<name>-portal-<i>` must be a DNS label, and a StatefulSet's
/// pods carry a `controller-revision-hash` label of `<name>-portal-<10 chars>` (at most 63).
pub const MAX_NAME_LEN: usize = 45;

/// A DatabasePortal whose spec passed validation, with the keys every child needs.
#[derive(Clone, Debug)]
pub struct Validated {
    pub name: String,
    pub namespace: String,
    /// The portal configuration, every default resolved.
    pub config: Config,
}

/// Checks `dp` whole and reports every problem, each naming its field.
pub fn validate(dp: &DatabasePortal) -> Result<Validated> {
    let namespace = dp.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let name = dp.name_any();
    let mut errors = Vec::new();

    if let Err(message) = check_name(&name) {
        errors.push(FieldError {
            field: "metadata.name".into(),
            message,
        });
    }
    let level = &dp.spec.portal.log_level;
    if !level.is_empty() {
        if let Err(e) = portal::logging::check_level(level) {
            errors.push(FieldError {
                field: "portal.logLevel".into(),
                message: e.to_string(),
            });
        }
    }
    let config = match dp.spec.validate() {
        Ok(config) => Some(config),
        Err(e) => {
            match e {
                portal::config::ConfigError::Invalid(mut list) => errors.append(&mut list),
                portal::config::ConfigError::Parse(one) => errors.push(one),
                other => errors.push(FieldError {
                    field: "spec".into(),
                    message: other.to_string(),
                }),
            }
            None
        }
    };
    match config {
        Some(config) if errors.is_empty() => Ok(Validated {
            name,
            namespace,
            config,
        }),
        _ => Err(Error::InvalidSpec(errors)),
    }
}

/// Portal names become Service names, which must be DNS-1035 labels.
fn check_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "at most {MAX_NAME_LEN} characters (the portal Services are named <name>-portal-<n>), found {}",
            name.len()
        ));
    }
    let ok = name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(
            "must be a DNS label starting with a letter (lowercase letters, digits and '-'), as Service names are"
                .into(),
        );
    }
    Ok(())
}

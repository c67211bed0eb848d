//! The operator's one error type. A variant's name is its `error` label in the failure metric.
//!
//! May import: nothing of the crate.

use portal::config::FieldError;

/// Why a reconcile did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec passed the schema but cannot work; permanent until the spec changes.
    #[error("invalid spec: {}", join(.0))]
    InvalidSpec(Vec<FieldError>),

    /// Server-side apply of a child failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    /// Listing or deleting children the spec no longer needs failed.
    #[error("removing unneeded {kind}: {source}")]
    Cleanup {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },

    /// Writing the status subresource failed.
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),

    /// A child could not be turned into JSON (a bug, never expected).
    #[error("serializing {kind}: {message}")]
    Serialize { kind: &'static str, message: String },

    /// The object lacks what every stored object has (namespace, uid).
    #[error("object is missing {0}")]
    MissingObjectKey(&'static str),
}

impl Error {
    /// The variant's name, used as the `error` label of the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::Apply { .. } => "Apply",
            Error::Cleanup { .. } => "Cleanup",
            Error::Status(_) => "Status",
            Error::Serialize { .. } => "Serialize",
            Error::MissingObjectKey(_) => "MissingObjectKey",
        }
    }

    /// The API server answered with this HTTP status code.
    pub fn api_code(&self) -> Option<u16> {
        let source = match self {
            Error::Apply { source, .. } | Error::Cleanup { source, .. } | Error::Status(source) => {
                source
            }
            _ => return None,
        };
        api_code(source)
    }
}

/// The HTTP status code of an API error response, if it was one.
pub fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

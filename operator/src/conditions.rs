//! `conditions`: the DatabasePortal's condition types, the reasons they and the operator's
//! events carry, and the order of importance of the Degraded reasons.
//!
//! May import: nothing of the crate.

/// Condition types.
pub const READY: &str = "Ready";
pub const DEGRADED: &str = "Degraded";

/// Reasons of the Ready and Degraded conditions, and of the operator's own events.
pub mod reason {
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const CERT_MANAGER_MISSING: &str = "CertManagerMissing";
    pub const CERTIFICATE_NOT_READY: &str = "CertificateNotReady";
    pub const PDB_UNSUPPORTED: &str = "PodDisruptionBudgetUnsupported";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const ALL_PORTALS_READY: &str = "AllPortalsReady";
    pub const PORTALS_NOT_READY: &str = "PortalsNotReady";
    pub const LEADER_DISAGREEMENT: &str = "LeaderDisagreement";
    pub const NO_HEALTHY_BACKEND: &str = "NoHealthyBackend";
    pub const CONFIG_STALE: &str = "ConfigStale";

    /// Event reason of a change of `status.leader`.
    pub const LEADER_CHANGED: &str = "LeaderChanged";

    /// Rank of a Degraded reason: the condition carries the most important one (lowest);
    /// InvalidSpec, which stops the reconcile before anything else, comes first.
    pub fn rank(reason: &str) -> u8 {
        match reason {
            INVALID_SPEC => 0,
            NO_HEALTHY_BACKEND => 1,
            LEADER_DISAGREEMENT => 2,
            CERT_MANAGER_MISSING => 3,
            CERTIFICATE_NOT_READY => 4,
            CONFIG_STALE => 5,
            PDB_UNSUPPORTED => 6,
            _ => 7,
        }
    }
}

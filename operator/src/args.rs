//! Command line and environment of the operator binary.
//!
//! May import: `build` (the settings it fills).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use clap::{ArgAction, Parser, Subcommand};

use portal::config::LogFormat;

use crate::build::Settings;

/// dbportal operator: reconciles DatabasePortals into portal pods, Services, ConfigMaps and
/// Certificates.
#[derive(Parser, Clone, Debug)]
#[command(name = "operator", version)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Namespace to watch; empty watches all namespaces.
    #[arg(long, env = "DBPORTAL_WATCH_NAMESPACE", default_value = "")]
    pub namespace: String,

    /// Portal image for DatabasePortals that name none.
    #[arg(long, env = "DBPORTAL_PORTAL_IMAGE", default_value_t = Settings::default_portal_image())]
    pub portal_image: String,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    #[arg(long, env = "DBPORTAL_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    pub metrics_address: SocketAddr,

    /// Elect one active replica through a Lease (turn off for a single replica).
    #[arg(long, env = "DBPORTAL_LEADER_ELECTION", default_value_t = true, action = ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "DBPORTAL_LEASE_NAME", default_value = "dbportal-operator")]
    pub lease_name: String,

    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "dbportal-system")]
    pub lease_namespace: String,

    /// This replica's identity in the Lease; default: the pod name, else host name and PID.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// DatabasePortals reconciled at the same time.
    #[arg(long, env = "DBPORTAL_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// The operator's log level, a tracing filter (`info`, `debug`, `warn,operator=debug`);
    /// default `RUST_LOG`, else info.
    #[arg(long, env = "DBPORTAL_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// The operator's log format: text (coloured only on a terminal) or json.
    #[arg(long, env = "DBPORTAL_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Log level of the portal pods of DatabasePortals that set no `spec.portal.logLevel`;
    /// default: the portal's own (info).
    #[arg(long, env = "DBPORTAL_PORTAL_LOG_LEVEL", value_parser = parse_level)]
    pub portal_log_level: Option<String>,

    /// Log format of the portal pods of DatabasePortals that set no `spec.portal.logFormat`:
    /// text or json; default (or empty): the portal's own (text).
    #[arg(long, env = "DBPORTAL_PORTAL_LOG_FORMAT", value_parser = parse_format)]
    pub portal_log_format: Option<String>,

    /// Give each DatabasePortal a NetworkPolicy that lets anyone reach the database port and
    /// only the pods named by `--admin-allowed-from` (and the node's kubelet) reach the admin
    /// port (8404). Off: no NetworkPolicy is made (one made earlier is removed).
    #[arg(long, env = "DBPORTAL_NETWORK_POLICY", default_value_t = true, action = ArgAction::Set)]
    pub network_policy: bool,

    /// Pods, in any namespace, allowed to reach the portals' admin port (metrics scrapers), as
    /// a label selector of `key=value` pairs separated by commas.
    #[arg(long, env = "DBPORTAL_ADMIN_ALLOWED_FROM", default_value = "app.kubernetes.io/name=prometheus", value_parser = parse_selector)]
    pub admin_allowed_from: BTreeMap<String, String>,
}

/// `key=value[,key=value…]`, with keys and values as Kubernetes labels allow them.
fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let (key, value) = (key.trim(), value.trim());
        let ok = |s: &str, max: usize| {
            s.len() <= max
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        };
        if key.is_empty() || !ok(key, 316) || !ok(value, 63) || value.contains('/') {
            return Err(format!("{pair:?} is not a valid label key=value"));
        }
        labels.insert(key.to_string(), value.to_string());
    }
    if labels.is_empty() {
        return Err("name at least one label key=value".into());
    }
    Ok(labels)
}

fn parse_format(format: &str) -> Result<String, portal::logging::LogError> {
    format.parse::<LogFormat>()?;
    Ok(format.to_string())
}

fn parse_level(level: &str) -> Result<String, portal::logging::LogError> {
    portal::logging::check_level(level)?;
    Ok(level.to_string())
}

#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// Print the DatabasePortal CustomResourceDefinition as YAML.
    Crd,
}

impl Args {
    /// The namespace to watch, None for all.
    pub fn watch_namespace(&self) -> Option<&str> {
        Some(self.namespace.as_str()).filter(|ns| !ns.is_empty())
    }

    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "operator".into());
            format!("{host}-{}", std::process::id())
        })
    }

    pub fn settings(&self) -> Settings {
        Settings {
            portal_image: self.portal_image.clone(),
            portal_log_level: self.portal_log_level.clone().filter(|l| !l.is_empty()),
            // Validated when parsed; empty is no choice.
            portal_log_format: self
                .portal_log_format
                .as_deref()
                .filter(|f| !f.is_empty())
                .and_then(|f| f.parse().ok()),
            network_policy: self.network_policy,
            admin_allowed_from: self.admin_allowed_from.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_policy_flags() {
        let args = Args::try_parse_from(["operator"]).unwrap();
        let settings = args.settings();
        assert!(settings.network_policy);
        assert_eq!(
            settings.admin_allowed_from,
            [(
                "app.kubernetes.io/name".to_string(),
                "prometheus".to_string()
            )]
            .into()
        );
        let args = Args::try_parse_from([
            "operator",
            "--network-policy=false",
            "--admin-allowed-from",
            "app.kubernetes.io/name=prometheus, team=obs",
        ])
        .unwrap();
        assert!(!args.network_policy);
        assert_eq!(args.admin_allowed_from.len(), 2);
        for bad in ["", "prometheus", "a=b c", "a=b/c"] {
            assert!(
                Args::try_parse_from(["operator", "--admin-allowed-from", bad]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn defaults_and_subcommand() {
        let args = Args::try_parse_from(["operator"]).unwrap();
        assert!(args.leader_election);
        assert_eq!(args.watch_namespace(), None);
        assert!(args.portal_image.ends_with(env!("CARGO_PKG_VERSION")));
        let args = Args::try_parse_from([
            "operator",
            "--namespace",
            "shop",
            "--leader-election",
            "false",
            "crd",
        ])
        .unwrap();
        assert!(!args.leader_election);
        assert_eq!(args.watch_namespace(), Some("shop"));
        assert!(matches!(args.command, Some(Command::Crd)));
    }

    #[test]
    fn portal_log_flags_reach_the_settings() {
        let args = Args::try_parse_from([
            "operator",
            "--portal-log-level",
            "debug",
            "--portal-log-format",
            "json",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(args.log_format, LogFormat::Json);
        let settings = args.settings();
        assert_eq!(settings.portal_log_level.as_deref(), Some("debug"));
        assert_eq!(settings.portal_log_format, Some(LogFormat::Json));
        let bad = Args::try_parse_from(["operator", "--portal-log-level", "portal=loud"]);
        assert!(bad.unwrap_err().to_string().contains("portal=loud"));
        assert!(Args::try_parse_from(["operator", "--log-format", "yaml"]).is_err());
        assert!(Args::try_parse_from(["operator", "--portal-log-format", "yaml"]).is_err());
        // Empty (a chart value left empty, passed as an environment variable): no choice.
        let empty =
            Args::try_parse_from(["operator", "--portal-log-format", "", "--log-format", ""])
                .unwrap();
        assert_eq!(empty.settings().portal_log_format, None);
        assert_eq!(empty.log_format, LogFormat::Text);
    }
}

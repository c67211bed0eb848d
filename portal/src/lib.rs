//! dbportal's portal: a TCP proxy in front of database nodes with TLS, an allow-list of client
//! networks, connection limits, timeouts and leader following.
//!
//! The layers and the one direction of imports are drawn in `portal/README.md`.
//!
//! May import: nothing; it only declares the modules.

pub mod admin;
pub mod admission;
pub mod allow;
pub mod cluster;
pub mod config;
pub mod control;
pub mod error;
pub mod exec;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod pod_report;
pub mod proxy_protocol;
pub mod reload;
pub mod route;
pub mod server;
pub mod session;
pub mod splice;
pub mod standalone;
pub mod tls;
pub mod wire;

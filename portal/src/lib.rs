//! dbportal's portal: a TCP proxy in front of database nodes with TLS, an allow-list of client
//! networks, connection limits, timeouts and leader following.

pub mod config;
pub mod health;

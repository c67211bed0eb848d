//! The portal's integration-test harness; every test file declares `mod common;`.
//!
//! - `harness`: temporary directories, loopback ports, child processes stopped by PID,
//!   polling, the real command-line clients (`psql`, `redis_cli`, `run`) and admin HTTP;
//! - `portals`: [`PortalBuilder`] and the handles it returns, in-process or the binary;
//! - `net`: TCP servers and clients run by the tests, RESP commands;
//! - `servers`, `etcd`: real Redis, PostgreSQL, MariaDB and etcd servers;
//! - `tls`: a throwaway CA and its certificates; `fake_redis`: a scripted Redis for probes.
//!
//! Everything listens on loopback ports chosen by the kernel (or just freed by it), works in
//! private temporary directories, and stops what it started by PID or by dropping its task.
//! The local Kubernetes control plane (`control_plane.rs`) is declared by the cluster tests
//! alone, as it brings in the Kubernetes client.
#![allow(dead_code, unused_imports)]

pub mod etcd;
pub mod fake_redis;
pub mod net;
pub mod portals;
pub mod servers;
pub mod tls;

/// Loaded by `tls.rs`, which the library's unit tests include alone.
pub use tls::harness;

pub use etcd::*;
pub use harness::*;
pub use net::*;
pub use portals::*;
pub use servers::*;

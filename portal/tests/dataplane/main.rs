//! The data plane end to end on loopback: the portal in-process (and one binary) in front of a
//! real redis-server and small TCP servers.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod binary;
mod routing;
mod sessions;

use std::{sync::Arc, time::Duration};

use common::*;
use portal::{health::HealthView, proxy_protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHORT: Duration = Duration::from_secs(3);

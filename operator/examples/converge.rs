//! Benchmark (prints figures): time for the operator, run as its own process with the chart's
//! RBAC, to converge N DatabasePortals (default 1000) on a private local control plane, and
//! the operator's resident memory.
//!
//!   bench/operator.sh [N]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{ListParams, PostParams};
use kube::Api;
use operator::DatabasePortal;

const NAMESPACES: usize = 10;

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn portal(ns: &str, i: usize) -> DatabasePortal {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "dbportal.dev/v1alpha1",
        "kind": "DatabasePortal",
        "metadata": {"name": format!("db{i}"), "namespace": ns},
        "spec": {
            "engine": "redis",
            "backends": [
                {"name": "a", "address": format!("db{i}-0.db{i}.{ns}.svc:6379")},
                {"name": "b", "address": format!("db{i}-1.db{i}.{ns}.svc:6379")}
            ],
            "allowedCIDRs": ["10.0.0.0/8"],
            "tls": {"mode": "disabled"}
        }
    }))
    .unwrap()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1000);
    let exe = std::env::current_exe()?;
    let operator_bin = exe.parent().unwrap().parent().unwrap().join("operator");
    anyhow::ensure!(
        operator_bin.exists(),
        "build the operator binary first: {}",
        operator_bin.display()
    );

    let plane = common::ControlPlane::start("bench")?;
    let admin = plane.admin().await?;
    common::install(&admin).await?;
    let namespaces: Vec<String> = (0..NAMESPACES).map(|i| format!("bench-{i}")).collect();
    for ns in &namespaces {
        common::create_namespace(&admin, ns).await?;
    }

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new(&operator_bin)
        .env("KUBECONFIG", &plane.operator_kubeconfig)
        .env("POD_NAMESPACE", common::OPERATOR_NAMESPACE)
        .env("POD_NAME", "bench")
        .env("DBPORTAL_METRICS_ADDRESS", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    let pid = child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_rss, _) = rss_kib(pid);

    let started = Instant::now();
    let creates = futures::stream::iter(0..n)
        .map(|i| {
            let admin = admin.clone();
            let ns = namespaces[i % NAMESPACES].clone();
            async move {
                Api::<DatabasePortal>::namespaced(admin, &ns)
                    .create(&PostParams::default(), &portal(&ns, i))
                    .await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    for c in creates {
        c?;
    }
    let created = started.elapsed();
    let (created_rss, _) = rss_kib(pid);

    let all: Api<DatabasePortal> = Api::all(admin.clone());
    let mut peak_rss = 0;
    let mut next_progress = Duration::from_secs(10);
    let converged = loop {
        let (rss, _) = rss_kib(pid);
        peak_rss = peak_rss.max(rss);
        let list = all.list(&ListParams::default()).await?;
        let done = list
            .items
            .iter()
            .filter(|d| d.status.as_ref().and_then(|s| s.observed_generation) == Some(1))
            .count();
        if done == n {
            break started.elapsed();
        }
        if started.elapsed() >= next_progress {
            next_progress += Duration::from_secs(10);
            eprintln!(
                "{:>4.0} s: {done}/{n} converged, operator RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                rss as f64 / 1024.0
            );
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "only {done}/{n} converged in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=dbportal-operator");
    let configmaps = Api::<ConfigMap>::all(admin.clone())
        .list_metadata(&managed)
        .await?
        .items
        .len();
    let services = Api::<Service>::all(admin.clone())
        .list_metadata(&managed)
        .await?
        .items
        .len();
    // Let the operator settle (StatefulSet status updates trigger more reconciles), then measure.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, hwm) = rss_kib(pid);
    let metrics = scrape(port).await.unwrap_or_default();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = child.wait();

    println!("DatabasePortals:        {n} (in {NAMESPACES} namespaces)");
    println!("created in:             {:.1} s", created.as_secs_f64());
    println!(
        "converged in:           {:.1} s (all status.observedGeneration = 1)",
        converged.as_secs_f64()
    );
    println!("children:               {configmaps} ConfigMaps, {services} Services");
    println!(
        "operator RSS idle:      {:.1} MiB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "operator RSS created:   {:.1} MiB (all DatabasePortals created)",
        created_rss as f64 / 1024.0
    );
    println!("operator RSS after:     {:.1} MiB", rss as f64 / 1024.0);
    println!(
        "operator RSS peak:      {:.1} MiB (VmHWM)",
        hwm.max(peak_rss) as f64 / 1024.0
    );
    for name in [
        "dbportal_operator_reconciles_total",
        "dbportal_operator_child_applies_total",
        "dbportal_operator_status_writes_total",
    ] {
        for line in metrics.lines().filter(|l| l.starts_with(name)) {
            println!("operator metric:        {line}");
        }
    }
    drop(plane);
    Ok(())
}

/// The operator's Prometheus text (`/metrics`).
async fn scrape(port: u16) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    Ok(body)
}

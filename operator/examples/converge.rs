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

    let operator_cpu_before = cpu_seconds(pid);
    let machine_cpu_before = machine_busy_seconds();
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

    // Convergence is followed through a watch: polling lists of 1,000 DatabasePortals would
    // load the API server the benchmark measures.
    let all: Api<DatabasePortal> = Api::all(admin.clone());
    let mut events = std::pin::pin!(kube::runtime::watcher(all, Default::default()));
    let mut converged_names = std::collections::HashSet::new();
    let mut peak_rss = 0;
    let mut next_progress = Duration::from_secs(10);
    let deadline = tokio::time::sleep(Duration::from_secs(600));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let converged = loop {
        tokio::select! {
            event = events.next() => {
                let dbp = match event {
                    Some(Ok(kube::runtime::watcher::Event::Apply(d)))
                    | Some(Ok(kube::runtime::watcher::Event::InitApply(d))) => d,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        eprintln!("watch: {e}");
                        continue;
                    }
                    None => anyhow::bail!("the DatabasePortal watch ended"),
                };
                let key = (dbp.metadata.namespace.clone(), dbp.metadata.name.clone());
                if dbp.status.as_ref().and_then(|s| s.observed_generation) == Some(1) {
                    converged_names.insert(key);
                }
                if converged_names.len() == n {
                    break started.elapsed();
                }
            }
            _ = tick.tick() => {
                let (rss, _) = rss_kib(pid);
                peak_rss = peak_rss.max(rss);
                if started.elapsed() >= next_progress {
                    next_progress += Duration::from_secs(10);
                    eprintln!(
                        "{:>4.0} s: {}/{n} converged, operator RSS {:.1} MiB",
                        started.elapsed().as_secs_f64(),
                        converged_names.len(),
                        rss as f64 / 1024.0
                    );
                }
            }
            _ = &mut deadline => {
                anyhow::bail!("only {}/{n} converged in 10 min", converged_names.len())
            }
        }
    };
    let operator_cpu = cpu_seconds(pid) - operator_cpu_before;
    let machine_cpu = machine_busy_seconds() - machine_cpu_before;
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
    println!("operator CPU:           {operator_cpu:.1} s while converging (user + system)");
    println!(
        "machine CPU busy:       {machine_cpu:.1} s of {:.1} s ({} cores; everything running)",
        converged.as_secs_f64() * cores() as f64,
        cores()
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

/// User + system CPU seconds of a process (`/proc/<pid>/stat`, clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields after it are fixed.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds the whole machine spent busy (not idle or waiting for I/O), from `/proc/stat`.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / 100.0
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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

//! A real etcd cluster for tests: `n` members on free loopback ports in a private temporary
//! directory, clients over HTTP or HTTPS, each member stopped by PID; `etcdctl` at hand.
#![allow(dead_code)]

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use super::harness::{free_port, http_blocking, run_blocking, wait_until, Proc, TempDir};

/// One member of an etcd cluster.
#[derive(Debug)]
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    proc: Option<Proc>,
    /// The CA of the member's HTTPS client URL, when it has one.
    ca: Option<PathBuf>,
    /// The `etcd` arguments it was started with.
    args: Vec<String>,
}

impl EtcdMember {
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The client URL, `http://` or `https://`.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Stops the member (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Starts a stopped member again with its data: it rejoins the cluster.
    pub fn restart(&mut self) {
        if self.proc.is_none() {
            let mut cmd = Command::new("etcd");
            cmd.args(&self.args);
            self.proc = Some(Proc::spawn(cmd, "TERM"));
        }
        wait_until("etcd member back", Duration::from_secs(20), || {
            self.healthy()
        });
    }

    /// Whether the member says it is healthy.
    pub fn healthy(&self) -> bool {
        match &self.ca {
            None => {
                let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
                http_blocking(addr, "GET", "/health", None, "")
                    .is_ok_and(|(_, body)| body.contains("\"true\""))
            }
            Some(_) => self.etcdctl(&["endpoint", "health"]).is_some(),
        }
    }

    /// Runs `etcdctl` against this member alone; its output on success.
    pub fn etcdctl(&self, args: &[&str]) -> Option<String> {
        let mut all = vec![
            format!("--endpoints={}", self.url()),
            "--command-timeout=3s".to_string(),
        ];
        if let Some(ca) = &self.ca {
            all.push(format!("--cacert={}", ca.display()));
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let (ok, out, _) = run_blocking("etcdctl", &all, &[("ETCDCTL_API", "3")]);
        ok.then_some(out)
    }
}

/// How to start an etcd cluster besides its size.
#[derive(Debug, Default, Clone)]
pub struct EtcdOptions {
    /// Serve clients over HTTPS with this certificate, key and (for the helper's etcdctl) CA;
    /// peers stay on HTTP.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// More flags for every member (e.g. `--quota-backend-bytes=...`).
    pub extra: Vec<String>,
}

/// An etcd cluster of `n` members on loopback.
#[derive(Debug)]
pub struct Etcd {
    pub members: Vec<EtcdMember>,
    dir: TempDir,
}

impl Etcd {
    pub fn cluster(n: usize) -> Etcd {
        Etcd::start(n, &EtcdOptions::default())
    }

    pub fn start(n: usize, options: &EtcdOptions) -> Etcd {
        let dir = TempDir::new("etcd");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.path().join(format!("m{i}"));
            let mut args = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls={scheme}://127.0.0.1:{client}"),
                format!("--advertise-client-urls={scheme}://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster={initial}"),
                "--initial-cluster-state=new".to_string(),
                "--initial-cluster-token=dbportal-test".to_string(),
            ];
            args.extend(options.extra.iter().cloned());
            if let Some((cert, key, _)) = &options.tls {
                args.push(format!("--cert-file={}", cert.display()));
                args.push(format!("--key-file={}", key.display()));
            }
            let mut cmd = Command::new("etcd");
            cmd.args(&args);
            members.push(EtcdMember {
                name: format!("m{i}"),
                client_port: *client,
                proc: Some(Proc::spawn(cmd, "TERM")),
                ca: options.tls.as_ref().map(|(_, _, ca)| ca.clone()),
                args,
            });
        }
        let etcd = Etcd { members, dir };
        for m in &etcd.members {
            wait_until("etcd member", Duration::from_secs(20), || m.healthy());
        }
        etcd
    }
}

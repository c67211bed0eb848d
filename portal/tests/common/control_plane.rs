//! A private local control plane (etcd + kube-apiserver + kube-controller-manager on loopback)
//! per test binary, started through `e2e/local-control-plane.sh` and stopped (by PID) when
//! dropped, or by the script's watchdog if the test process dies first. Besides the admin
//! identity it has the operator's (the script's `operator.kubeconfig`) and a portal user, both
//! with no rights until a test grants some.
//!
//! The portal's and the operator's tests share this file (the operator's through `#[path]`).
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};

/// The user name of the portal's identity.
pub const PORTAL_USER: &str = "dbportal-portal-test";

/// The repository's root, from the `CARGO_MANIFEST_DIR` cargo sets when it runs the test
/// rather than the one compiled in: a build cache shared by two checkouts must not send one
/// checkout's tests to the other's scripts.
pub fn repo_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().unwrap_or(Path::new("..")).to_path_buf()
}

fn script() -> PathBuf {
    repo_root().join("e2e/local-control-plane.sh")
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A running control plane; stopped and its state removed on drop.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub admin_kubeconfig: PathBuf,
    /// Kubeconfig of the operator's identity.
    pub operator_kubeconfig: PathBuf,
    /// Kubeconfig of [`PORTAL_USER`].
    pub portal_kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Builds the Kubernetes binaries if they are missing (cached under ~/.cache/dbportal), then
    /// starts a control plane in a private temporary directory.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let bin_dir = PathBuf::from(output(Command::new(script()).arg("bin-dir"))?.trim());
        let missing = ["kube-apiserver", "kube-controller-manager", "kubectl"]
            .iter()
            .any(|b| !bin_dir.join(b).exists());
        if missing {
            eprintln!(
                "building the local control plane (once; cached in {})",
                bin_dir.display()
            );
            if !Command::new(script()).arg("build").status()?.success() {
                bail!("local-control-plane.sh build failed");
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("dbportal-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let token = format!("{nanos:x}{:x}", std::process::id());
        let tokens = dir.join("extra-tokens.csv");
        std::fs::write(&tokens, format!("{token},{PORTAL_USER},{PORTAL_USER}\n"))?;
        let started = Instant::now();
        let out = output(
            Command::new(script())
                .arg("start")
                .arg(&dir)
                .env("DBPORTAL_LCP_WATCH_PID", std::process::id().to_string())
                .env("DBPORTAL_LCP_EXTRA_TOKENS", &tokens),
        )
        .with_context(|| format!("starting the control plane in {}", dir.display()));
        let plane = ControlPlane {
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            operator_kubeconfig: dir.join("operator.kubeconfig"),
            portal_kubeconfig: dir.join("portal.kubeconfig"),
            dir,
        };
        let out = out?;
        let last = out.lines().last().unwrap_or_default();
        anyhow::ensure!(
            Path::new(last) == plane.admin_kubeconfig,
            "unexpected start output: {out}"
        );
        // The portal's kubeconfig: the admin's cluster and CA with the portal's token.
        let mut kc = Kubeconfig::read_from(&plane.admin_kubeconfig)?;
        for auth in &mut kc.auth_infos {
            auth.name = PORTAL_USER.into();
            if let Some(info) = auth.auth_info.as_mut() {
                info.token = Some(token.clone().into());
            }
        }
        for ctx in &mut kc.contexts {
            if let Some(c) = ctx.context.as_mut() {
                c.user = Some(PORTAL_USER.into());
            }
        }
        std::fs::write(&plane.portal_kubeconfig, serde_norway::to_string(&kc)?)?;
        eprintln!(
            "control plane up in {:.1?} ({})",
            started.elapsed(),
            plane.dir.display()
        );
        Ok(plane)
    }

    pub async fn admin(&self) -> anyhow::Result<Client> {
        client(&self.admin_kubeconfig).await
    }

    pub async fn operator(&self) -> anyhow::Result<Client> {
        client(&self.operator_kubeconfig).await
    }

    pub async fn portal(&self) -> anyhow::Result<Client> {
        client(&self.portal_kubeconfig).await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
        if std::env::var_os("DBPORTAL_KEEP_STATE").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("control plane state kept in {}", self.dir.display());
        }
    }
}

pub async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Retries `f` every 100 ms until it succeeds or `timeout` passes; then fails with its error.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: not within {timeout:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

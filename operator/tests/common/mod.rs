//! A private local control plane (etcd + kube-apiserver + kube-controller-manager on
//! loopback) per test binary, started through `e2e/local-control-plane.sh`, and helpers to
//! install the CRD, grant the operator exactly the chart's RBAC, and poll with deadlines.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub const OPERATOR_NAMESPACE: &str = "dbportal-system";
pub const OPERATOR_SA: &str = "dbportal-operator";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn script() -> PathBuf {
    repo_root().join("e2e/local-control-plane.sh")
}

/// A running control plane; stopped (processes killed by PID, state removed) on drop.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub admin_kubeconfig: PathBuf,
    pub operator_kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Builds the Kubernetes binaries if they are missing (cached under ~/.cache/dbportal),
    /// then starts a control plane in a private temporary directory.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let bin_dir = output(Command::new(script()).arg("bin-dir"))?;
        let bin_dir = PathBuf::from(bin_dir.trim());
        let missing = ["kube-apiserver", "kube-controller-manager", "kubectl"]
            .iter()
            .any(|b| !bin_dir.join(b).exists());
        if missing {
            eprintln!(
                "building the local control plane (once; cached in {})",
                bin_dir.display()
            );
            let status = Command::new(script()).arg("build").status()?;
            if !status.success() {
                bail!("local-control-plane.sh build failed");
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("dbportal-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let started = Instant::now();
        let out = output(Command::new(script()).arg("start").arg(&dir))
            .with_context(|| format!("starting the control plane in {}", dir.display()));
        let plane = ControlPlane {
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            operator_kubeconfig: dir.join("operator.kubeconfig"),
            dir,
        };
        let out = out?;
        let last = out.lines().last().unwrap_or_default();
        anyhow::ensure!(
            Path::new(last) == plane.admin_kubeconfig,
            "unexpected start output: {out}"
        );
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

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}

pub async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Retries `f` every 200 ms until it succeeds or `timeout` passes; then fails with its error.
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
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Creates a CRD through the API (as `kubectl create --validate=false` would) and waits until
/// it is established.
pub async fn install_crd(admin: &Client, crd: CustomResourceDefinition) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let name = crd.metadata.name.clone().unwrap();
    api.create(&PostParams::default(), &crd).await?;
    eventually("CRD established", Duration::from_secs(30), || async {
        let crd = api.get(&name).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        anyhow::ensure!(established, "not established");
        Ok(())
    })
    .await
}

pub async fn create_namespace(admin: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(admin.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &ns).await?;
    Ok(())
}

fn rules(file: &str) -> anyhow::Result<Vec<PolicyRule>> {
    let path = repo_root().join("charts/dbportal/files").join(file);
    Ok(serde_yaml::from_str(&std::fs::read_to_string(path)?)?)
}

/// Grants the operator identity exactly the chart's ClusterRole and leader-election Role.
pub async fn grant_chart_rbac(admin: &Client) -> anyhow::Result<()> {
    let pp = PostParams::default();
    let meta = |name: &str, ns: Option<&str>| ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        ..Default::default()
    };
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: OPERATOR_SA.into(),
        namespace: Some(OPERATOR_NAMESPACE.into()),
        ..Default::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .create(
            &pp,
            &ClusterRole {
                metadata: meta(OPERATOR_SA, None),
                rules: Some(rules("clusterrole-rules.yaml")?),
                ..Default::default()
            },
        )
        .await?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(
            &pp,
            &ClusterRoleBinding {
                metadata: meta(OPERATOR_SA, None),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: OPERATOR_SA.into(),
                },
                subjects: Some(vec![subject.clone()]),
            },
        )
        .await?;
    let le = format!("{OPERATOR_SA}-leader-election");
    Api::<Role>::namespaced(admin.clone(), OPERATOR_NAMESPACE)
        .create(
            &pp,
            &Role {
                metadata: meta(&le, Some(OPERATOR_NAMESPACE)),
                rules: Some(rules("leader-election-rules.yaml")?),
            },
        )
        .await?;
    Api::<RoleBinding>::namespaced(admin.clone(), OPERATOR_NAMESPACE)
        .create(
            &pp,
            &RoleBinding {
                metadata: meta(&le, Some(OPERATOR_NAMESPACE)),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: le.clone(),
                },
                subjects: Some(vec![subject]),
            },
        )
        .await?;
    Ok(())
}

/// CRD, operator namespace and RBAC: what `helm install` would set up.
pub async fn install(admin: &Client) -> anyhow::Result<()> {
    use kube::CustomResourceExt;
    install_crd(admin, operator::DatabasePortal::crd()).await?;
    create_namespace(admin, OPERATOR_NAMESPACE).await?;
    grant_chart_rbac(admin).await
}

/// cert-manager's Certificate CRD, from the test fixture.
pub fn cert_manager_crd() -> anyhow::Result<CustomResourceDefinition> {
    let path = repo_root().join("operator/tests/fixtures/cert-manager.io_certificates.yaml");
    Ok(serde_yaml::from_str(&std::fs::read_to_string(path)?)?)
}

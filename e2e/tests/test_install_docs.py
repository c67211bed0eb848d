"""The install path as the README writes it, on the local API server (Kubernetes 1.20, the
oldest version the docs claim): every command that installs or upgrades the CRD or the chart
is taken from the docs' own text and run word for word (kubectl 1.20 validating on the
client, as it does by default; `helm` is charts/bin/helm, Helm 4's library), then the
README's example DatabasePortal is applied and `kubectl explain` reads the schema.

Needs the Kubernetes binaries (`e2e/local-control-plane.sh build`, .ci/run's first step).
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LCP = ROOT / "e2e" / "local-control-plane.sh"
CRD_NAME = "databaseportals.dbportal.dev"


def doc_commands(path: Path) -> list[str]:
    """The shell commands a page writes: lines of ```sh blocks and `inline` spans that start
    with kubectl or helm, joined where a line ends in a backslash."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        commands += [line.split(" #")[0].strip() for line in block.splitlines()]
    commands += re.findall(r"`((?:kubectl|helm) [^`]+)`", text.replace("\n", " "))
    return [c for c in commands if c.startswith(("kubectl ", "helm "))]


def install_commands() -> list[str]:
    """The README's commands that install or upgrade the chart or the CRD from a checkout."""
    wanted = []
    for command in doc_commands(ROOT / "README.md") + doc_commands(ROOT / "docs" / "operations.md"):
        if (command.startswith("helm install ") and " charts/dbportal " in command) or (
                command.startswith("kubectl apply") and "crds/databaseportal.yaml" in command):
            if command not in wanted:
                wanted.append(command)
    return wanted


def test_the_docs_name_the_install_commands():
    commands = install_commands()
    assert "helm install dbportal charts/dbportal -n dbportal-system --create-namespace" in commands
    assert "kubectl apply --server-side --force-conflicts -f crds/databaseportal.yaml" in commands


@pytest.fixture(scope="module")
def cluster():
    bin_dir = subprocess.run(["bash", str(LCP), "bin-dir"], capture_output=True, text=True,
                             check=True).stdout.strip()
    for name in ("kube-apiserver", "kubectl"):
        assert os.access(Path(bin_dir) / name, os.X_OK), (
            f"{bin_dir}/{name} missing: run `bash e2e/local-control-plane.sh build` first")
    state = Path(tempfile.mkdtemp(prefix="dbportal-install-docs-"))
    env = dict(os.environ, DBPORTAL_LCP_WATCH_PID=str(os.getpid()))
    try:
        subprocess.run(["bash", str(LCP), "start", str(state)], env=env, check=True,
                       stdout=subprocess.DEVNULL, timeout=180)
        lines = (state / "env").read_text().splitlines()
        env = dict(os.environ)
        env.update(line.split("=", 1) for line in lines if "=" in line)
        env["PATH"] = f"{ROOT / 'charts' / 'bin'}:{bin_dir}:{env['PATH']}"
        yield env
    finally:
        subprocess.run(["bash", str(LCP), "stop", str(state)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(state, ignore_errors=True)


def sh(env, command, **kwargs):
    """One command as a user types it, from the checkout's root."""
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180, **kwargs)


def kubectl_json(env, *args):
    r = sh(env, "kubectl " + " ".join(args) + " -o json")
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_readme_install_commands_work_on_the_oldest_supported_version(cluster):
    env = cluster
    version = sh(env, "kubectl version --short")
    assert "Server Version: v1.20" in version.stdout, version.stdout + version.stderr

    # A first install with plain client-side apply and kubectl's own validation: a CRD with a
    # field this version does not know (a CEL rule) fails here.
    r = sh(env, "kubectl apply -f crds/databaseportal.yaml")
    assert r.returncode == 0, r.stderr
    r = sh(env, "kubectl delete -f crds/databaseportal.yaml --wait=true")
    assert r.returncode == 0, r.stderr

    commands = install_commands()
    # The chart first, as a new user does; then the upgrade step the docs give.
    commands.sort(key=lambda c: not c.startswith("helm install"))
    for command in commands:
        r = sh(env, command)
        assert r.returncode == 0, f"{command}\n{r.stdout}\n{r.stderr}"

    crd = kubectl_json(env, "get crd", CRD_NAME)
    established = [c for c in crd["status"]["conditions"] if c["type"] == "Established"]
    assert established and established[0]["status"] == "True", crd["status"]
    deployment = kubectl_json(env, "-n dbportal-system get deployment dbportal-operator")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "dbportal-operator"
    assert sh(env, "kubectl get clusterrole dbportal-operator-dbportal-system").returncode == 0
    # Helm recorded the release (its Secret), so `helm upgrade` and `helm uninstall` find it.
    r = sh(env, "helm status dbportal -n dbportal-system")
    assert r.returncode == 0 and "STATUS: deployed" in r.stdout, r.stdout + r.stderr

    # The upgrade steps of docs/operations.md from a checkout: the chart's CRD applied from
    # `helm show crds`, then `helm upgrade` keeping the values and changing one.
    r = sh(env, "helm show crds charts/dbportal | "
                "kubectl apply --server-side --force-conflicts -f -")
    assert r.returncode == 0, r.stderr
    r = sh(env, "helm upgrade dbportal charts/dbportal -n dbportal-system --reuse-values "
                "--set replicas=1")
    assert r.returncode == 0 and "REVISION: 2" in r.stdout, r.stdout + r.stderr
    deployment = kubectl_json(env, "-n dbportal-system get deployment dbportal-operator")
    assert deployment["spec"]["replicas"] == 1


def test_readme_example_is_accepted_and_explained(cluster):
    env = cluster
    r = sh(env, "kubectl apply --server-side --force-conflicts -f crds/databaseportal.yaml")
    assert r.returncode == 0, r.stderr
    readme = (ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)
                   if "kind: DatabasePortal" in b)
    portal = next(d for d in yaml.safe_load_all(example) if d and d["kind"] == "DatabasePortal")
    sh(env, f"kubectl create namespace {portal['metadata']['namespace']}")
    r = sh(env, "kubectl apply -f -", input=yaml.safe_dump(portal))
    assert r.returncode == 0, r.stderr
    got = kubectl_json(env, f"-n {portal['metadata']['namespace']} get databaseportal",
                       portal["metadata"]["name"])
    assert got["spec"]["engine"] == portal["spec"]["engine"]
    # The schema refuses what it describes as invalid (an unknown engine), on the server.
    bad = dict(portal, spec=dict(portal["spec"], engine="oracle"))
    r = sh(env, "kubectl apply -f -", input=yaml.safe_dump(bad))
    assert r.returncode != 0 and "engine" in r.stderr, r.stderr
    r = sh(env, "kubectl explain databaseportal.spec.timeouts")
    assert r.returncode == 0 and "connect" in r.stdout, r.stderr

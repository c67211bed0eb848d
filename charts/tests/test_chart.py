"""charts/dbportal rendered and linted by Helm's own library (helm-python-sdk, Helm 4), every
rendered object checked against the Kubernetes schemas (kubernetes-validate), and the
monitoring objects checked against the metrics the code really exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import promql_parser
import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHART = ROOT / "charts" / "dbportal"
sys.path.insert(0, str(ROOT / "charts"))
sys.path.insert(0, str(HERE))

import code_metrics  # noqa: E402
from crd_schema import openapi_to_jsonschema  # noqa: E402
import render  # noqa: E402

# Versions the rendered objects are validated against: the oldest the schemas package has
# and the newest the project supports (1.33, the operator's API types). (The chart also
# supports 1.20, checked by the PDB test below and installed by e2e/tests/test_install_docs.py.)
KUBE_VERSIONS = ["1.25.0", "1.30.0", "1.33.0"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
DIGEST = "sha256:" + "ab" * 32

MONITORING_ON = {
    "monitoring": {
        "operator": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}},
        "portals": {"podMonitor": {"enabled": True}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    }
}

SCENARIOS = {
    "defaults": {},
    "single replica": {"replicas": 1, "leaderElection": False},
    "watch one namespace": {"watchNamespace": "shop"},
    "monitoring": MONITORING_ON,
    "pdb": {"podDisruptionBudget": {"enabled": True}},
    "digest and pull secrets": {"image": {"digest": DIGEST},
                                "imagePullSecrets": [{"name": "regcred"}]},
    "everything": {
        **MONITORING_ON,
        "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
        "serviceAccount": {"create": True, "name": "ops", "annotations": {"a": "b"}},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops",
                         "effect": "NoSchedule"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "priorityClassName": "system-cluster-critical",
        "podLabels": {"team": "data"},
        "podAnnotations": {"note": "x"},
        "extraArgs": ["--concurrency=4"],
        "portalNetworkPolicy": False,
        "portalAdminAllowedFrom": "app=prom",
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "logFormat": "json",
        "portalLogLevel": "debug",
        "portalLogFormat": "json",
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "DoNotSchedule"}],
    },
}


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind):
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objects):
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(objects):
    return {e["name"]: e.get("value") for e in container(objects)["env"]}


# --- lint and render ----------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_is_clean_in_strict_mode(scenario):
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace="dbportal-system")
    assert report["total_charts_linted"] == 1
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_lint_for_the_oldest_supported_kubernetes():
    # Chart.yaml says >=1.20; the e2e suite's local cluster is 1.20.
    assert helm.Chart.load(CHART).metadata["kubeVersion"] == ">=1.20.0-0"
    values = {"podDisruptionBudget": {"enabled": True}, **MONITORING_ON}
    report = helm.lint(CHART, values, strict=True, kube_version="v1.20.0")
    assert not [m for m in report["messages"] if m["severity"] >= 2], report
    kinds = {o["kind"]: o["apiVersion"] for o in render.render(values, kube_version="1.20.2")}
    assert kinds["PodDisruptionBudget"] == "policy/v1beta1"
    assert kinds["Deployment"] == "apps/v1"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid_kubernetes(scenario, version):
    objects = render.render(SCENARIOS[scenario])
    assert objects
    checked = 0
    for obj in objects:
        if obj["kind"] in MONITORING_KINDS:
            continue  # no Kubernetes schema; checked against the metrics below
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 5


def test_crds_are_valid_and_the_repository_copy():
    crds = render.crds()
    assert [c["metadata"]["name"] for c in crds] == ["databaseportals.dbportal.dev"]
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(crds[0], version, strict=True)
    assert crds == list(yaml.safe_load_all((ROOT / "crds" / "databaseportal.yaml").read_text()))


def test_defaults():
    objects = render.render({})
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                            "RoleBinding", "Service", "Deployment"])
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == "dbportal-operator"
    assert deployment["metadata"]["namespace"] == "dbportal-system"
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "dbportal-operator"
    assert one(objects, "ServiceAccount")["metadata"]["name"] == "dbportal-operator"
    # The two replicas go to different nodes when there are several, and still both run on
    # a single node.
    [spread] = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # Today's restricted security contexts.
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532,
                                      "runAsGroup": 65532,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    c = container(objects)
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["image"] == "ghcr.io/dbportal/operator:0.1.0"
    assert "args" not in c and "imagePullSecrets" not in pod and "priorityClassName" not in pod
    e = env(objects)
    assert e["DBPORTAL_LEADER_ELECTION"] == "true"
    assert e["DBPORTAL_LEASE_NAME"] == "dbportal-operator"
    assert e["DBPORTAL_LOG_FORMAT"] == "text"
    assert e["RUST_LOG"] == "info"
    assert e["DBPORTAL_PORTAL_IMAGE"] == "ghcr.io/dbportal/portal:0.1.0"
    assert "DBPORTAL_PORTAL_LOG_LEVEL" not in e and "DBPORTAL_PORTAL_LOG_FORMAT" not in e
    # The operator's permissions are exactly the rules file the integration tests use.
    rules = yaml.safe_load((CHART / "files" / "clusterrole-rules.yaml").read_text())
    assert one(objects, "ClusterRole")["rules"] == rules
    lease_rules = yaml.safe_load((CHART / "files" / "leader-election-rules.yaml").read_text())
    assert one(objects, "Role")["rules"] == lease_rules


def test_single_replica_without_leader_election():
    objects = render.render({"replicas": 1, "leaderElection": False})
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert "topologySpreadConstraints" not in deployment["spec"]["template"]["spec"]
    assert env(objects)["DBPORTAL_LEADER_ELECTION"] == "false"
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    # Leader election off runs one replica whatever replicas says.
    assert one(render.render({"replicas": 3, "leaderElection": False}),
               "Deployment")["spec"]["replicas"] == 1


def test_watching_one_namespace_uses_a_role_there():
    objects = render.render({"watchNamespace": "shop"})
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(objects, "Role")}
    assert roles == {("shop", "dbportal-operator"),
                     ("dbportal-system", "dbportal-operator-leader-election")}
    binding = next(b for b in by_kind(objects, "RoleBinding")
                   if b["metadata"]["namespace"] == "shop")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "dbportal-operator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dbportal-operator",
                                    "namespace": "dbportal-system"}]
    rules = yaml.safe_load((CHART / "files" / "clusterrole-rules.yaml").read_text())
    assert next(r for r in by_kind(objects, "Role")
                if r["metadata"]["namespace"] == "shop")["rules"] == rules
    assert env(objects)["DBPORTAL_WATCH_NAMESPACE"] == "shop"


def test_digest_and_pull_secrets():
    objects = render.render(SCENARIOS["digest and pull secrets"])
    assert container(objects)["image"] == f"ghcr.io/dbportal/operator@{DIGEST}"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert container(render.render({"image": {"tag": "1.2.3"}}))["image"] == \
        "ghcr.io/dbportal/operator:1.2.3"


def test_operator_pod_disruption_budget():
    pdb = one(render.render({"podDisruptionBudget": {"enabled": True}}), "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    old = one(render.render({"podDisruptionBudget": {"enabled": True, "minAvailable": "50%"}},
                            kube_version="1.20.0"), "PodDisruptionBudget")
    assert old["apiVersion"] == "policy/v1beta1"
    assert old["spec"]["minAvailable"] == "50%" and "maxUnavailable" not in old["spec"]
    assert not by_kind(render.render({}), "PodDisruptionBudget")


def test_every_option_reaches_the_pod():
    objects = render.render(SCENARIOS["everything"])
    pod = one(objects, "Deployment")["spec"]["template"]
    spec = pod["spec"]
    assert pod["metadata"]["labels"]["team"] == "data"
    assert pod["metadata"]["annotations"] == {"note": "x"}
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["affinity"] == SCENARIOS["everything"]["affinity"]
    assert spec["tolerations"] == SCENARIOS["everything"]["tolerations"]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["serviceAccountName"] == "ops"
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["name"] == "ops" and sa["metadata"]["annotations"] == {"a": "b"}
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "ops"
    # A constraint given without labelSelector selects this release's operator pods.
    [spread] = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "dbportal"
    c = container(objects)
    assert c["args"] == ["--network-policy=false", "--admin-allowed-from=app=prom",
                         "--concurrency=4"]
    e = env(objects)
    assert e["HTTPS_PROXY"] == "http://proxy:3128"
    assert e["DBPORTAL_LOG_FORMAT"] == "json"
    assert e["DBPORTAL_PORTAL_LOG_LEVEL"] == "debug"
    assert e["DBPORTAL_PORTAL_LOG_FORMAT"] == "json"
    # The security contexts can be changed.
    objects = render.render({"securityContext": {"readOnlyRootFilesystem": False}})
    assert container(objects)["securityContext"]["readOnlyRootFilesystem"] is False


def test_existing_service_account():
    objects = render.render({"serviceAccount": {"create": False, "name": "mine"}})
    assert not by_kind(objects, "ServiceAccount")
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"
    with pytest.raises(helm.HelmError, match="serviceAccount.name is required"):
        render.render({"serviceAccount": {"create": False}})


def names(objects):
    return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects}


@pytest.mark.parametrize("second", [("other", "dbportal-system"), ("dbportal", "elsewhere")])
def test_two_releases_never_collide(second):
    first = render.render(MONITORING_ON | {"podDisruptionBudget": {"enabled": True}})
    other = render.render(MONITORING_ON | {"podDisruptionBudget": {"enabled": True}},
                          name=second[0], namespace=second[1])
    assert len(names(first)) == len(first)
    assert not names(first) & names(other)
    # Nor do their Leases, nor do their selectors pick the other's pods.
    if second[1] == "dbportal-system":
        assert env(first)["DBPORTAL_LEASE_NAME"] != env(other)["DBPORTAL_LEASE_NAME"]
        assert one(first, "Deployment")["spec"]["selector"] != \
            one(other, "Deployment")["spec"]["selector"]


def test_release_names():
    assert one(render.render({}, name="db"), "Deployment")["metadata"]["name"] == "db-operator"
    assert one(render.render({}, name="dbportal-operator"),
               "Deployment")["metadata"]["name"] == "dbportal-operator"
    assert one(render.render({"fullnameOverride": "portals"}),
               "Deployment")["metadata"]["name"] == "portals"
    cluster_role = one(render.render({}, name="db", namespace="ops"), "ClusterRole")
    assert cluster_role["metadata"]["name"] == "db-operator-ops"


def test_notes_say_what_to_do_next():
    notes = render.notes({})
    assert "kind: DatabasePortal" in notes
    assert "tls: {mode: disabled}" in notes
    assert "redis-cli" in notes
    assert "helm show crds" in notes and "--server-side" in notes
    assert "deployment/dbportal-operator" in notes
    # The DatabasePortal it shows is valid against the CRD's schema.
    manifest = re.search(r"\n\n(    apiVersion: dbportal.dev/v1alpha1\n.*?)\n\n", notes, re.S).group(1)
    check_against_crd(yaml.safe_load(manifest))
    assert "kubectl apply -f cache.yaml" in notes


def check_against_crd(obj):
    import jsonschema
    crd = render.crds()[0]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert obj["apiVersion"] == "dbportal.dev/v1alpha1" and obj["kind"] == "DatabasePortal"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
    assert obj["metadata"]["name"]
    jsonschema.validate(obj["spec"], openapi_to_jsonschema(schema["properties"]["spec"]))


# --- the values schema ----------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"replica": 3}, "additional properties 'replica' not allowed"),
    ({"image": {"tags": "v1"}}, "additional properties 'tags' not allowed"),
    ({"monitoring": {"operator": {"serviceMonitor": {"enable": True}}}},
     "additional properties 'enable' not allowed"),
    ({"podDisruptionBudget": {"enabeld": True}}, "additional properties 'enabeld' not allowed"),
    ({"replicas": "3"}, "got string, want integer"),
    ({"leaderElection": "yes"}, "got string, want boolean"),
    ({"replicas": 0}, "minimum"),
    ({"logFormat": "xml"}, "logFormat"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"imagePullSecrets": ["regcred"]}, "want object"),
    ({"extraArgs": "--x"}, "want array"),
    ({"portalAdminAllowedFrom": "prometheus"}, "portalAdminAllowedFrom"),
])
def test_values_that_break_the_schema_fail(values, message):
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        helm.Chart.load(CHART).validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render.render(values)
    report = helm.lint(CHART, values, strict=True)
    assert any(message in e for e in report["errors"]), report


def test_schema_refuses_unknown_keys_at_every_level():
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_maps = []

    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            if node.get("additionalProperties") is not False:
                open_maps.append(path)
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}")

    walk(schema, "")
    assert not open_maps, f"objects that accept unknown keys: {open_maps}"


def test_schema_and_values_yaml_have_the_same_keys():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(node, path=""):
        out = set()
        for key, sub in node.items():
            out.add(path + key)
            if isinstance(sub, dict) and sub.get("type") == "object" and "properties" in sub:
                out |= keys(sub["properties"], f"{path}{key}.")
        return out

    def value_keys(node, schema_node, path=""):
        out = set()
        for key, sub in node.items():
            out.add(path + key)
            sub_schema = schema_node.get(key, {})
            if isinstance(sub, dict) and "properties" in sub_schema:
                out |= value_keys(sub, sub_schema["properties"], f"{path}{key}.")
        return out

    schema_keys = keys(schema["properties"]) - {"global"}
    assert value_keys(values, schema["properties"]) == schema_keys
    helm.Chart.load(CHART).validate_schema(values)


def test_chart_readme_documents_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Za-z0-9.]+)` \|", readme, re.M))

    def keys(props, path=""):
        out = set()
        for key, sub in props.items():
            if key == "global":
                continue
            out.add(path + key)
            if "properties" in sub:
                assert sub.get("description"), path + key
                out |= keys(sub["properties"], f"{path}{key}.")
            else:
                assert sub.get("description"), f"{path}{key} has no description in the schema"
        return out

    assert keys(schema["properties"]) == documented
    assert "kubectl apply --server-side" in readme


# --- render.py, the command ---------------------------------------------------------------

def run_render(*args):
    return subprocess.run([sys.executable, str(ROOT / "charts" / "render.py"), *args],
                          capture_output=True, text=True, check=False)


def test_render_command_prints_the_manifests():
    out = run_render("--name", "dbportal", "--namespace", "ops", "--set", "replicas=1",
                     "--set", "leaderElection=false", "--set-string", "image.tag=dev",
                     "--crds", "--create-namespace")
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert [d["kind"] for d in docs[:2]] == ["Namespace", "CustomResourceDefinition"]
    assert docs[0]["metadata"]["name"] == "ops"
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["namespace"] == "ops"
    assert deployment["spec"]["replicas"] == 1
    assert container(docs)["image"] == "ghcr.io/dbportal/operator:dev"
    # Helm's install order: the ServiceAccount and RBAC before the Deployment.
    kinds = [d["kind"] for d in docs]
    assert kinds.index("ServiceAccount") < kinds.index("ClusterRole") < kinds.index("Deployment")


def test_render_command_values_file_and_typo(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("watchNamespace: shop\nimage:\n  pullPolicy: Never\n")
    out = run_render("-f", str(values), "--set", "image.pullPolicy=Always")
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert container(docs)["imagePullPolicy"] == "Always"
    assert not by_kind(docs, "ClusterRole")
    bad = run_render("--set", "replica=3")
    assert bad.returncode == 1 and bad.stdout == ""
    assert "additional properties 'replica' not allowed" in bad.stderr
    bad = run_render("--set", "image.tags=v2")
    assert bad.returncode == 1 and "'tags' not allowed" in bad.stderr


# --- monitoring ---------------------------------------------------------------------------

def monitoring_objects(values=None):
    return render.render(values or MONITORING_ON)


def test_service_monitor_scrapes_the_operator_service():
    objects = monitoring_objects()
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["dbportal-system"]}
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_pod_monitor_scrapes_the_portal_pods():
    monitor = one(monitoring_objects(), "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    # The labels and the admin port the operator gives every portal pod.
    build = "".join(p.read_text() for p in (ROOT / "operator" / "src").glob("build*/**/*.rs")) + \
        (ROOT / "operator" / "src" / "build.rs").read_text()
    assert 'name: Some("admin".into())' in build
    assert selector == {"app.kubernetes.io/name": "dbportal",
                        "app.kubernetes.io/component": "portal",
                        "app.kubernetes.io/managed-by": "dbportal-operator"}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            "targetLabel": "dbportal"} in endpoint["relabelings"]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    scoped = one(monitoring_objects(MONITORING_ON | {"watchNamespace": "shop"}), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["shop"]}


def prometheus_rules(values=None):
    return one(monitoring_objects(values), "PrometheusRule")


def alerts(values=None):
    return [r for g in prometheus_rules(values)["spec"]["groups"] for r in g["rules"]]


def metric_names_in(expr):
    """Series names a PromQL expression reads (it must parse)."""
    promql_parser.parse(expr)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", re.sub(r'"[^"]*"', '""', expr)))
    return {w for w in words if w.startswith("dbportal_")}


def test_alerts_cover_the_cases_and_read_real_metrics():
    rules = alerts()
    names = {r["alert"] for r in rules}
    assert {"DbportalNoLeader", "DbportalLeaderDisagreement", "DbportalPortalNotReady",
            "DbportalCertificateExpiresSoon", "DbportalConfigRefused",
            "DbportalRejectionsRising"} <= names
    series = code_metrics.series_names()
    for rule in rules:
        used = metric_names_in(rule["expr"])
        assert used, rule["alert"]
        assert used <= series, f"{rule['alert']} reads metrics the code does not export: " \
                               f"{used - series}"
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        for key in ("summary", "description", "runbook", "runbook_url"):
            assert rule["annotations"].get(key), f"{rule['alert']} has no {key}"
        assert "@" not in rule["expr"] + rule["annotations"]["runbook_url"]


def test_alert_runbooks_are_sections_of_the_operations_guide():
    operations = (ROOT / "docs" / "operations.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", operations, re.M)}
    for rule in alerts():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("https://github.com/dbportal/dbportal/blob/main/docs/operations.md#")
        assert url.split("#")[1] in anchors, f"no section {rule['alert']} in docs/operations.md"


def test_alert_thresholds_come_from_values():
    rules = alerts(MONITORING_ON | {"monitoring": {
        **MONITORING_ON["monitoring"],
        "prometheusRule": {"enabled": True, "certificateExpiryDays": 3,
                           "rejectionsPerSecond": 0.5, "runbookBaseURL": "https://x/ops"}}})
    by_name = {r["alert"]: r for r in rules}
    assert "< 259200" in by_name["DbportalCertificateExpiresSoon"]["expr"]
    assert "> 0.5" in by_name["DbportalRejectionsRising"]["expr"]
    assert by_name["DbportalNoLeader"]["annotations"]["runbook_url"] == \
        "https://x/ops#dbportalnoleader"


def test_dashboard_reads_real_metrics():
    configmap = next(c for c in by_kind(monitoring_objects(), "ConfigMap")
                     if c["metadata"]["name"].endswith("-dashboard"))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["dbportal.json"])
    assert dashboard == json.loads((CHART / "files" / "dashboard.json").read_text())
    series = code_metrics.series_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        concrete = (expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")
                    .replace("$dbportal", ".*"))
        if concrete.startswith("label_values("):
            concrete = re.match(r"label_values\((.*), \w+\)$", concrete).group(1)
        found = metric_names_in(concrete)
        assert found, expr
        assert found <= series, f"{expr} reads metrics the code does not export"
        used |= found
    # Panels for the main families of both binaries.
    for name in ("dbportal_ready", "dbportal_backend_leader", "dbportal_rejections_total",
                 "dbportal_tls_certificate_expiry_seconds", "dbportal_operator_leader"):
        assert name in used


def test_monitoring_is_off_by_default():
    kinds = {o["kind"] for o in render.render({})}
    assert not kinds & MONITORING_KINDS
    assert "ConfigMap" not in kinds

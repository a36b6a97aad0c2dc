"""deploy/compose/: the compose file parses, and its services, mounts, ports and settings agree with each other, with
the Dockerfile, with brokerproxy's config and with the files in the repository (no Docker engine here).

Every depends_on names a service that can satisfy its condition, without cycles; every bind-mounted file exists;
the Airflow components reach the broker and the result backend only through brokerproxy, over TLS, with a client
certificate that gen-certs.py makes and whose CN is an ACL user with the right Celery role; Redis is on a network
only the proxy joins; Prometheus scrapes the proxy's metrics port and loads the alert rules; Grafana gets the
dashboard. gen-certs.py is run, and the proxy's config loads with its output. Each rule is then broken once.
``tests/integration/test_container_cmd.py`` runs the proxy with this config and these certificates.
"""

from __future__ import annotations

import ast
import copy
import functools
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from brokerproxy import config as bp_config
from tests.unit.test_container import DOCKERFILE, parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
GEN_CERTS = COMPOSE_DIR / "gen-certs.py"
Doc = dict[str, Any]

CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
PROXY = "brokerproxy"


@functools.cache
def _compose() -> Doc:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def compose() -> Doc:
    return copy.deepcopy(_compose())


def depends(service: Doc) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def mounts(service: Doc) -> list[tuple[str, str]]:
    """(source, target) of each volume, short syntax or long."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1]))
        else:
            out.append((v.get("source", ""), v["target"]))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def mounted_source(service: Doc, target: str) -> str | None:
    """The bind-mount source (relative to deploy/compose) a file at ``target`` in the container comes from."""
    for source, tgt in mounts(service):
        if tgt == target:
            return source
    return None


def volume_for(service: Doc, path: str) -> tuple[str, str] | None:
    """(source, target) of the mount a path lies under (the longest target that is a prefix)."""
    found = [(s, t) for s, t in mounts(service) if path == t or path.startswith(t.rstrip("/") + "/")]
    return max(found, key=lambda m: len(m[1])) if found else None


def env(service: Doc) -> dict[str, str]:
    value = service.get("environment", {})
    if isinstance(value, list):
        return dict(item.partition("=")[::2] for item in value)
    return {k: "" if v is None else str(v) for k, v in value.items()}


def host_ports(service: Doc) -> list[tuple[str | None, int, int]]:
    """(host ip or None, host port, container port) of each published port."""
    out = []
    for p in service.get("ports", []):
        parts = str(p).split("/")[0].split(":")
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append((None, int(parts[0]), int(parts[1])))
        else:
            out.append((None, int(parts[0]), int(parts[0])))
    return out


def is_airflow(service: Doc) -> bool:
    return str(service.get("image", "")).split("/")[-1].startswith("airflow") or "apache/airflow" in str(
        service.get("image", "")
    )


def builds_our_dockerfile(service: Doc) -> bool:
    build = service.get("build")
    if build is None:
        return False
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return (COMPOSE_DIR / context / dockerfile).resolve() == DOCKERFILE.resolve()


def image_config_path() -> str:
    return parse_dockerfile(DOCKERFILE.read_text()).final.env()["BROKERPROXY_CONFIG"]


def proxy_config(doc: Doc) -> tuple[Path, dict[str, Any]]:
    """The config file mounted where the image reads its config, and its TOML."""
    source = mounted_source(doc["services"][PROXY], image_config_path())
    assert source is not None, f"nothing is mounted at {image_config_path()}"
    path = (COMPOSE_DIR / source).resolve()
    return path, tomllib.loads(path.read_text())


def address_port(value: str) -> int:
    return int(value.rpartition(":")[2])


def proxy_ports(cfg: dict[str, Any]) -> dict[str, int]:
    return {k: address_port(cfg[k]) for k in ("listen", "tls_listen", "metrics_listen") if cfg.get(k)}


def generated(tmp: Path) -> Path:
    """Run gen-certs.py as the compose file's "certs" service does (without the ownership, which needs root)."""
    out = tmp / "certs"
    if not (out / "ca.crt").exists():
        subprocess.run([sys.executable, str(GEN_CERTS), str(out)], check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated(tmp_path_factory.mktemp("compose"))


def common_name(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# ----------------------------------------------------------------------------------------------------- the rules


def problems(doc: Doc, certs: Path) -> list[str]:
    """What is wrong with the compose file (empty: all good). ``certs``: gen-certs.py's output for this run."""
    out: list[str] = []
    services: dict[str, Doc] = doc.get("services", {})
    for name in (PROXY, "redis", "postgres", "airflow-scheduler", "airflow-worker", "prometheus", "grafana"):
        if name not in services:
            out.append(f"no service {name}")
    if out:
        return out

    # depends_on: existing services, satisfiable conditions, no cycle
    for name, service in services.items():
        for dep, condition in depends(service).items():
            if dep not in services:
                out.append(f"{name} depends on {dep}, which is no service")
                continue
            if condition not in CONDITIONS:
                out.append(f"{name}: unknown condition {condition} on {dep}")
            target = services[dep]
            if condition == "service_healthy" and "healthcheck" not in target and not builds_our_dockerfile(target):
                out.append(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            if condition == "service_completed_successfully" and target.get("restart") in ("always", "unless-stopped"):
                out.append(f"{name} waits for {dep} to complete, but {dep} restarts")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            out.append(f"depends_on cycle: {' -> '.join([*path, node])}")
            return
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in depends(services[node]):
            if dep in services:
                visit(dep, [*path, node])
        state[node] = 2

    for name in services:
        visit(name, [])

    # mounts: files exist, named volumes and networks are declared
    for name, service in services.items():
        for source, _target in mounts(service):
            if is_bind(source):
                if not (COMPOSE_DIR / source).exists():
                    out.append(f"{name} mounts {source}, which is not in the repository")
            elif source and source not in (doc.get("volumes") or {}):
                out.append(f"{name} mounts volume {source}, which is not declared")
        for net in service.get("networks", []):
            if net not in (doc.get("networks") or {}):
                out.append(f"{name} joins network {net}, which is not declared")
    published = [p[1] for s in services.values() for p in host_ports(s)]
    for port in {p for p in published if published.count(p) > 1}:
        out.append(f"host port {port} is published twice")

    # the proxy: built from our Dockerfile, its config, its ports, its drain
    proxy = services[PROXY]
    if not builds_our_dockerfile(proxy):
        out.append("brokerproxy is not built from the repository's Dockerfile")
    try:
        config_path, cfg = proxy_config(doc)
    except AssertionError as exc:
        return [*out, str(exc)]
    ports = proxy_ports(cfg)
    for _ip, _host, container in host_ports(proxy):
        if container not in ports.values():
            out.append(f"brokerproxy publishes {container}, which it does not listen on")
    for ip, host, _container in host_ports(proxy):
        if ip not in ("127.0.0.1", "::1"):
            out.append(f"brokerproxy's port {host} is published on every interface")
    acl_file = cfg.get("acl", {}).get("file")
    if acl_file:
        target = str(PurePosixPath(image_config_path()).parent / acl_file)
        source = mounted_source(proxy, target)
        if source is None:
            out.append(f"[acl] file {acl_file} is not mounted at {target}")
        elif (COMPOSE_DIR / source).resolve() != (config_path.parent / acl_file).resolve():
            out.append(f"{target} is mounted from {source}, not the {acl_file} beside the config")
    for table in ("tls", "upstream_tls"):
        for key in ("cert_file", "key_file", "ca_file"):
            path = cfg.get(table, {}).get(key)
            if path and volume_for(proxy, path) is None:
                out.append(f"brokerproxy's {table}.{key} {path} is on no volume")
    known = {"BROKERPROXY_CONFIG"} | {bp_config.ENV_PREFIX + k.upper() for k in bp_config.SCALARS}
    for key in env(proxy):
        if key.startswith(bp_config.ENV_PREFIX) and key not in known:
            out.append(f"brokerproxy's {key} is no setting brokerproxy reads")
    grace = proxy.get("stop_grace_period", "10s")
    seconds = float(re.sub(r"s$", "", str(grace))) if re.fullmatch(r"[\d.]+s?", str(grace)) else 0
    if seconds <= float(cfg.get("drain_timeout", bp_config.DEFAULT_DRAIN_TIMEOUT)):
        out.append(f"brokerproxy's stop_grace_period {grace} is not above drain_timeout")

    # Redis: reachable by the proxy only
    redis_nets = set(services["redis"].get("networks", ["default"]))
    for name, service in services.items():
        if name not in (PROXY, "redis") and redis_nets & set(service.get("networks", ["default"])):
            out.append(f"{name} shares a network with Redis: it could bypass the proxy")
    if services["redis"].get("ports"):
        out.append("Redis publishes a port: it could be reached without the proxy")
    if not redis_nets & set(services[PROXY].get("networks", ["default"])):
        out.append("brokerproxy shares no network with Redis")
    upstream = urlsplit(env(proxy).get("BROKERPROXY_UPSTREAM", cfg.get("upstream", "")))
    if upstream.hostname != "redis":
        out.append(f"brokerproxy's upstream is {upstream.hostname}, not the redis service")

    # Airflow: CeleryExecutor, everything through the proxy, with certificates gen-certs.py makes
    roles = {r["name"]: r["role"] for r in cfg.get("acl", {}).get("roles", [])}
    expect_role = {"airflow-worker": "worker(", "airflow-scheduler": "producer("}
    airflow = {n: s for n, s in services.items() if is_airflow(s)}
    if not airflow:
        out.append("no Airflow service")
    for name, service in airflow.items():
        e = env(service)
        if e.get("AIRFLOW__CORE__EXECUTOR") != "CeleryExecutor":
            out.append(f"{name}: executor is {e.get('AIRFLOW__CORE__EXECUTOR')}, not CeleryExecutor")
        certs_mount = volume_for(service, "/certs/ca.crt")
        for var in ("AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND"):
            url = urlsplit(e.get(var, ""))
            if url.hostname != PROXY or url.port not in ports.values():
                out.append(f"{name}: {var} does not point at brokerproxy's listeners ({url.hostname}:{url.port})")
                continue
            if url.scheme != "rediss" or url.port != ports.get("tls_listen"):
                out.append(f"{name}: {var} does not use brokerproxy's TLS port")
                continue
            if var.endswith("RESULT_BACKEND"):
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if query.get("ssl_cert_reqs") not in ("required", "CERT_REQUIRED"):
                    out.append(f"{name}: the result backend URL does not verify the proxy (ssl_cert_reqs)")
                tls_files = {k: unquote(query.get(k, "")) for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")}
            else:
                if e.get("AIRFLOW__CELERY__SSL_ACTIVE", "").lower() != "true":
                    out.append(f"{name}: AIRFLOW__CELERY__SSL_ACTIVE is not true (the broker would skip TLS checks)")
                tls_files = {
                    "ssl_ca_certs": e.get("AIRFLOW__CELERY__SSL_CACERT", ""),
                    "ssl_certfile": e.get("AIRFLOW__CELERY__SSL_CERT", ""),
                    "ssl_keyfile": e.get("AIRFLOW__CELERY__SSL_KEY", ""),
                }
            for key, path in tls_files.items():
                where = volume_for(service, path) if path else None
                if where is None or certs_mount is None or where != certs_mount:
                    out.append(f"{name}: {var} {key} {path!r} is not in the certificates volume")
                    continue
                if not (certs / path.removeprefix(where[1]).lstrip("/")).is_file():
                    out.append(f"{name}: {var} {key} {path} is not a file gen-certs.py makes")
            cert = tls_files.get("ssl_certfile", "")
            local = certs / cert.removeprefix(certs_mount[1] if certs_mount else "").lstrip("/")
            if local.is_file():
                user = common_name(local)
                if user not in roles:
                    out.append(f"{name}: {var} authenticates as {user}, which has no Celery role")
                command = str(service.get("command", ""))
                kind = (
                    "airflow-worker" if "worker" in command else "airflow-scheduler" if "scheduler" in command else ""
                )
                if kind and (user != kind or not roles.get(user, "").startswith(expect_role[kind])):
                    out.append(f"{name}: {var} connects as {user}, not as {kind} with its role")

    # Prometheus and Grafana
    prometheus = services["prometheus"]
    prom_source = mounted_source(prometheus, "/etc/prometheus/prometheus.yml")
    if prom_source is None:
        out.append("prometheus.yml is not mounted")
    else:
        prom = yaml.safe_load((COMPOSE_DIR / prom_source).read_text())
        targets = [t for job in prom.get("scrape_configs", []) for sc in job.get("static_configs", [])
                   for t in sc.get("targets", [])]  # fmt: skip
        if f"{PROXY}:{ports.get('metrics_listen')}" not in targets:
            out.append(f"Prometheus does not scrape {PROXY}:{ports.get('metrics_listen')} (targets: {targets})")
        for rules in prom.get("rule_files", []):
            source = mounted_source(prometheus, rules)
            if source is None:
                out.append(f"Prometheus rule file {rules} is not mounted")
            elif (COMPOSE_DIR / source).resolve() != (ROOT / "deploy" / "prometheus" / "alerts.yml").resolve():
                out.append(f"Prometheus rule file {rules} is {source}, not deploy/prometheus/alerts.yml")
        if not prom.get("rule_files"):
            out.append("Prometheus loads no alert rules")
    grafana = services["grafana"]
    dashboard_target = next(
        (t for s, t in mounts(grafana) if (COMPOSE_DIR / s).resolve() == (ROOT / "deploy/grafana/brokerproxy.json")),
        None,
    )
    if dashboard_target is None:
        out.append("Grafana does not mount deploy/grafana/brokerproxy.json")
    provisioning = {t.split("/")[-2]: s for s, t in mounts(grafana) if t.startswith("/etc/grafana/provisioning/")}
    if "datasources" not in provisioning or "dashboards" not in provisioning:
        out.append("Grafana's data source or dashboard provisioning is not mounted")
    else:
        sources = yaml.safe_load((COMPOSE_DIR / provisioning["datasources"]).read_text())["datasources"]
        urls = {urlsplit(d["url"]).hostname for d in sources if d["type"] == "prometheus"}
        if "prometheus" not in urls:
            out.append(f"Grafana's Prometheus data source is {urls}, not the prometheus service")
        providers = yaml.safe_load((COMPOSE_DIR / provisioning["dashboards"]).read_text())["providers"]
        folders = {p["options"]["path"].rstrip("/") for p in providers}
        if dashboard_target is not None and str(PurePosixPath(dashboard_target).parent) not in folders:
            out.append(f"Grafana loads dashboards from {folders}, not where brokerproxy.json is mounted")
    return out


# ----------------------------------------------------------------------------------------------------- the tests


def test_the_compose_file_keeps_every_rule(certs: Path) -> None:
    assert problems(compose(), certs) == []


def test_the_proxy_config_loads_with_the_generated_certificates(certs: Path, tmp_path: Path) -> None:
    config_path, cfg = proxy_config(compose())
    text = config_path.read_text().replace('"/certs/', f'"{certs}/')
    local = tmp_path / "etc" / "config.toml"
    local.parent.mkdir()
    local.write_text(text)
    acl = cfg["acl"]["file"]
    (local.parent / acl).write_text((config_path.parent / acl).read_text())
    upstream = env(compose()["services"][PROXY])["BROKERPROXY_UPSTREAM"]
    loaded = bp_config.load(str(local), {"BROKERPROXY_UPSTREAM": upstream})
    names = {u.name for u in loaded.acl_users}
    assert {"airflow-worker", "airflow-scheduler", "flower", "ops"} <= names
    assert loaded.authenticator().required and loaded.tls.identity == "cn"
    # every client certificate gen-certs.py makes names a user of this config
    for leaf in certs.glob("*/tls.crt"):
        if leaf.parent.name != PROXY:
            assert common_name(leaf) in names, leaf


def test_gen_certs_makes_a_verifiable_set_and_keeps_it(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    for leaf in certs.glob("*/tls.crt"):
        cert = x509.load_pem_x509_certificate(leaf.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert oct((leaf.parent / "tls.key").stat().st_mode & 0o777) == "0o400"
    server = x509.load_pem_x509_certificate((certs / PROXY / "tls.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Airflow dials the service name; redis-py checks the hostname
    dialed = urlsplit(env(compose()["services"]["airflow-worker"])["AIRFLOW__CELERY__BROKER_URL"]).hostname
    assert dialed in sans.get_values_for_type(x509.DNSName)
    keys = [p for p in certs.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert sorted(p.name for p in keys) == ["tls.key"] * len(keys)  # the CA's key is never written
    assert len(keys) == len(list(certs.glob("*/tls.crt")))
    before = (certs / "ca.crt").read_bytes()
    subprocess.run([sys.executable, str(GEN_CERTS), str(certs)], check=True, capture_output=True, timeout=60)
    assert (certs / "ca.crt").read_bytes() == before  # "docker compose up" again keeps the certificates


def test_no_private_key_or_password_is_checked_in() -> None:
    for path in COMPOSE_DIR.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "PRIVATE KEY-----\n" not in text, path
    acl = (COMPOSE_DIR / "users.acl").read_text()
    assert not re.search(r"(^|\s)[>#]", acl), "users.acl holds a password or a password hash"


def test_the_demo_dag_is_python_with_dependent_tasks() -> None:
    tree = ast.parse((COMPOSE_DIR / "brokerproxy_demo.py").read_text())
    tasks = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and any(
        getattr(d, "id", None) == "task" for d in n.decorator_list)]  # fmt: skip
    assert len(tasks) >= 3
    mount = [t for s, t in mounts(compose()["services"]["airflow-worker"]) if s.endswith("brokerproxy_demo.py")]
    assert mount and mount[0].startswith("/opt/airflow/dags/")


def _svc(doc: Doc, name: str) -> Doc:
    return doc["services"][name]


def _mount(doc: Doc, name: str, index: int, spec: str) -> None:
    _svc(doc, name)["volumes"][index] = spec


def _env_set(doc: Doc, name: str, key: str, value: str) -> None:
    service = _svc(doc, name)
    service["environment"] = {**env(service), key: value}


MUTATIONS: list[tuple[str, Callable[[Doc], None], str]] = [
    ("depends on a missing service",
     lambda d: _svc(d, "airflow-scheduler")["depends_on"].update({"rabbitmq": {"condition": "service_started"}}),
     "rabbitmq, which is no service"),
    ("healthy without a healthcheck",
     lambda d: _svc(d, "airflow-worker")["depends_on"].update({"grafana": {"condition": "service_healthy"}}),
     "grafana has no healthcheck"),
    ("cycle", lambda d: _svc(d, "redis").update(depends_on={"airflow-worker": {"condition": "service_started"}}),
     "cycle"),
    ("worker straight to Redis",
     lambda d: _env_set(d, "airflow-worker", "AIRFLOW__CELERY__BROKER_URL", "redis://redis:6379/0"),
     "does not point at brokerproxy"),
    ("plaintext broker", lambda d: _env_set(d, "airflow-worker", "AIRFLOW__CELERY__BROKER_URL",
                                            "redis://brokerproxy:6380/0"), "TLS port"),
    ("no broker_use_ssl", lambda d: _env_set(d, "airflow-worker", "AIRFLOW__CELERY__SSL_ACTIVE", "false"),
     "SSL_ACTIVE"),
    ("unverified result backend", lambda d: _env_set(
        d, "airflow-worker", "AIRFLOW__CELERY__RESULT_BACKEND",
        env(_svc(d, "airflow-worker"))["AIRFLOW__CELERY__RESULT_BACKEND"].replace("required", "none")),
     "ssl_cert_reqs"),
    ("worker with the scheduler's certificate",
     lambda d: _env_set(d, "airflow-worker", "AIRFLOW__CELERY__SSL_CERT", "/certs/airflow-scheduler/tls.crt"),
     "not as airflow-worker"),
    ("certificate gen-certs does not make",
     lambda d: _env_set(d, "airflow-scheduler", "AIRFLOW__CELERY__SSL_CACERT", "/certs/root.crt"),
     "not a file gen-certs.py makes"),
    ("not CeleryExecutor", lambda d: _env_set(d, "airflow-scheduler", "AIRFLOW__CORE__EXECUTOR", "LocalExecutor"),
     "not CeleryExecutor"),
    ("Airflow on the Redis network", lambda d: _svc(d, "airflow-worker").update(networks=["apps", "redis"]),
     "could bypass the proxy"),
    ("Redis published", lambda d: _svc(d, "redis").update(ports=["6379:6379"]), "Redis publishes"),
    ("Prometheus config without the proxy",
     lambda d: _mount(d, "prometheus", 0, "../prometheus/alerts.yml:/etc/prometheus/prometheus.yml"),
     "does not scrape"),
    ("missing mounted file",
     lambda d: _mount(d, "grafana", 2, "../grafana/nope.json:/var/lib/grafana/dashboards/x.json"),
     "not in the repository"),
    ("config not where the image reads it",
     lambda d: _mount(d, PROXY, 0, "./brokerproxy.toml:/etc/brokerproxy.toml:ro"),
     "nothing is mounted at"),
    ("ACL file not mounted", lambda d: _svc(d, PROXY)["volumes"].pop(1), "[acl] file users.acl is not mounted"),
    ("published on every interface", lambda d: _svc(d, PROXY).update(ports=["6390:6390"]), "every interface"),
    ("published port it does not serve", lambda d: _svc(d, PROXY)["ports"].append("127.0.0.1:6379:6379"),
     "publishes 6379"),
    ("short grace", lambda d: _svc(d, PROXY).update(stop_grace_period="10s"), "stop_grace_period"),
    ("undeclared volume", lambda d: _svc(d, "grafana")["volumes"].append("grafana-data:/var/lib/grafana"),
     "not declared"),
    ("unknown env", lambda d: _env_set(d, PROXY, "BROKERPROXY_TLS_PORT", "6390"), "BROKERPROXY_TLS_PORT"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "mutate", "expected"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_rule_catches_its_mistake(what: str, mutate: Callable[[Doc], None], expected: str, tmp_path: Path) -> None:
    doc = copy.deepcopy(compose())
    mutate(doc)
    found = problems(doc, generated(tmp_path))
    assert any(expected in p for p in found), found


def test_mount_sources_are_relative_to_the_compose_file() -> None:
    # the bind mounts that leave deploy/compose reach the shared deploy files, not anything else
    for name, service in compose()["services"].items():
        for source, _target in mounts(service):
            if is_bind(source) and source.startswith(".."):
                resolved = (COMPOSE_DIR / source).resolve()
                assert resolved.is_relative_to(ROOT / "deploy") or resolved == ROOT, (name, source)
    assert os.path.isfile(COMPOSE_DIR / "gen-certs.py")

"""deploy/kubernetes/: the manifests parse, and the fields that decide whether the proxy works in a cluster agree with
each other and with brokerproxy's own config (no API server here, so this is the validation).

For each Deployment running the brokerproxy image: its config comes from a ConfigMap key mounted where
BROKERPROXY_CONFIG points, and loads with brokerproxy's own loader (certificates generated per run); the probes ask
/healthz and /readyz on the port metrics_listen names; the preStop hook and the drain fit in the grace period; every
certificate, key and password file the config names is a Secret item on a mount Kubernetes updates in place; the
container cannot run as root. The sidecar's worker points its broker and result backend at the sidecar's loopback
listener; the standalone Service, PodDisruptionBudget and Certificate select and name what they should. Each rule
is then broken on purpose, once, to show it notices.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
import yaml

from brokerproxy import config as bp_config
from tests.unit.test_container import DOCKERFILE, parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
Doc = dict[str, Any]

#: Files the config may name that must come from a Secret.
SECRET_KEYS = ("cert_file", "key_file", "ca_file", "key_passphrase_file")


def documents() -> list[Doc]:
    docs: list[Doc] = []
    for path in sorted(KUBE.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def image_user() -> int:
    user = parse_dockerfile(DOCKERFILE.read_text()).final.last("USER")
    assert user is not None
    return int(user.args.split(":")[0])


def image_config_path() -> str:
    return parse_dockerfile(DOCKERFILE.read_text()).final.env()["BROKERPROXY_CONFIG"]


def is_proxy(container: Doc) -> bool:
    return container["image"].rsplit("/", 1)[-1].split(":")[0] == "brokerproxy"


def proxy_container(deployment: Doc) -> tuple[Doc, bool]:
    """The brokerproxy container and whether it is an init container (a native sidecar)."""
    spec = deployment["spec"]["template"]["spec"]
    for key in ("initContainers", "containers"):
        for c in spec.get(key, []):
            if is_proxy(c):
                return c, key == "initContainers"
    raise AssertionError(f"{deployment['metadata']['name']} runs no brokerproxy container")


def proxy_deployments(docs: list[Doc]) -> list[Doc]:
    out = []
    for d in find(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        if any(is_proxy(c) for c in spec.get("initContainers", []) + spec.get("containers", [])):
            out.append(d)
    return out


def env_value(container: Doc, name: str) -> Any:
    for item in container.get("env", []):
        if item["name"] == name:
            return item.get("value", item.get("valueFrom"))
    return None


# ------------------------------------------------------------------------------------------ volumes and files


def resolve(path: str, container: Doc, pod: Doc, docs: list[Doc]) -> tuple[str, str, str, Doc]:
    """Where a file the container reads comes from: (kind "configMap"/"secret", object name, key, the mount)."""
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume mount"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    rel = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    if mount.get("subPath"):
        rel = f"{mount['subPath']}/{rel}"
    volume = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), None)
    assert volume is not None, f"volume {mount['name']} is not defined"
    if "projected" in volume:
        sources = volume["projected"]["sources"]
    else:
        sources = [{k: v} for k, v in volume.items() if k in ("configMap", "secret")]
    for source in sources:
        for kind in ("configMap", "secret"):
            if kind not in source:
                continue
            ref = source[kind]
            name = ref.get("name", ref.get("secretName"))
            if "items" in ref:
                for item in ref["items"]:
                    if item["path"] == rel:
                        return kind, name, item["key"], mount
            elif "/" not in rel:
                return kind, name, rel, mount
    raise AssertionError(f"{path}: volume {mount['name']} provides no {rel}")


def proxy_config(deployment: Doc, docs: list[Doc]) -> tuple[str, dict[str, Any]]:
    """The config file's text and its TOML, from the ConfigMap mounted where BROKERPROXY_CONFIG points."""
    container, _ = proxy_container(deployment)
    path = env_value(container, "BROKERPROXY_CONFIG") or image_config_path()
    kind, name, key, _mount = resolve(path, container, deployment["spec"]["template"]["spec"], docs)
    assert kind == "configMap", f"the config comes from a {kind}"
    (cm,) = find(docs, "ConfigMap", name)
    text = cm["data"][key]
    return text, tomllib.loads(text)


def secret_paths(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(config key, path) of every file the config names that holds a secret or a certificate."""
    out = []
    for table in ("tls", "upstream_tls"):
        for key in SECRET_KEYS:
            if key in cfg.get(table, {}):
                out.append((f"{table}.{key}", cfg[table][key]))
    for i, role in enumerate(cfg.get("acl", {}).get("roles", [])):
        if "password_file" in role:
            out.append((f"acl.roles[{i}].password_file", role["password_file"]))
    for i, user in enumerate(cfg.get("users", [])):
        if "password_file" in user:
            out.append((f"users[{i}].password_file", user["password_file"]))
    return out


def port_number(container: Doc, port: int | str) -> int | None:
    if isinstance(port, int):
        return port if any(p["containerPort"] == port for p in container.get("ports", [])) else None
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def address_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def prestop_wait(container: Doc) -> float | None:
    """The longest a preStop hook keeps the container from SIGTERM, or None when there is none."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return None
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if command[:1] == ["sleep"] or (command and re.fullmatch(r"\d+(\.\d+)?", command[-1])):
        return float(command[-1])
    return 0.0


# ----------------------------------------------------------------------------------------------------- the rules


def proxy_problems(deployment: Doc, docs: list[Doc]) -> list[str]:
    out: list[str] = []
    name = deployment["metadata"]["name"]
    template = deployment["spec"]["template"]
    pod = template["spec"]
    labels = template["metadata"].get("labels", {})
    selector = deployment["spec"]["selector"]["matchLabels"]
    if not selector.items() <= labels.items():
        out.append(f"{name}: selector {selector} does not match the pod labels {labels}")
    container, native_sidecar = proxy_container(deployment)
    if native_sidecar and container.get("restartPolicy") != "Always":
        out.append(f"{name}: brokerproxy is an init container without restartPolicy: Always (the pod never starts)")
    _text, cfg = proxy_config(deployment, docs)

    known = {"BROKERPROXY_CONFIG"} | {bp_config.ENV_PREFIX + k.upper() for k in bp_config.SCALARS}
    for item in container.get("env", []):
        if item["name"].startswith(bp_config.ENV_PREFIX) and item["name"] not in known:
            out.append(f"{name}: env {item['name']} is no setting brokerproxy reads")
    env_set = {item["name"] for item in container.get("env", [])}

    metrics = cfg.get("metrics_listen")
    if metrics is None and "BROKERPROXY_METRICS_LISTEN" not in env_set:
        out.append(f"{name}: no metrics_listen: no probes, no metrics")
        return out
    metrics_host, metrics_port = address_port(metrics)
    if metrics_host not in ("0.0.0.0", "::"):
        out.append(f"{name}: metrics_listen {metrics} is not reachable by the kubelet's probes")
    if port_number(container, metrics_port) is None:
        out.append(f"{name}: the metrics port {metrics_port} is not a containerPort")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        spec = container.get(probe)
        if spec is None:
            if probe != "startupProbe":
                out.append(f"{name}: no {probe}")
            continue
        get = spec.get("httpGet")
        if get is None:
            out.append(f"{name}: {probe} is not an HTTP GET")
            continue
        if get.get("path") != path:
            out.append(f"{name}: {probe} asks {get.get('path')}, not {path}")
        if port_number(container, get.get("port")) != metrics_port:
            out.append(f"{name}: {probe} port {get.get('port')} is not the metrics port {metrics_port}")
    for key in ("listen", "tls_listen"):
        if key in cfg:
            host, port = address_port(cfg[key])
            loopback = host in ("127.0.0.1", "::1", "localhost")
            if not loopback and port_number(container, port) is None:
                out.append(f"{name}: {key} port {port} is not a containerPort")

    wait = prestop_wait(container)
    drain = float(cfg.get("drain_timeout", bp_config.DEFAULT_DRAIN_TIMEOUT))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if wait is None:
        out.append(f"{name}: no preStop hook")
    elif grace <= wait + drain:
        out.append(f"{name}: terminationGracePeriodSeconds {grace} <= preStop {wait:g} s + drain_timeout {drain:g} s")

    for key, path in secret_paths(cfg):
        try:
            kind, _obj, _item, mount = resolve(path, container, pod, docs)
        except AssertionError as exc:
            out.append(f"{name}: {key} = {path}: {exc}")
            continue
        if kind != "secret":
            out.append(f"{name}: {key} = {path} comes from a {kind}, not a Secret")
        if mount.get("subPath"):
            out.append(f"{name}: {key} is on a subPath mount, which Kubernetes never updates (no rotation)")

    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    if sc.get("runAsNonRoot") is not True:
        out.append(f"{name}: runAsNonRoot is not true")
    if sc.get("runAsUser", image_user()) == 0:
        out.append(f"{name}: runAsUser 0")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.append(f"{name}: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{name}: allowPrivilegeEscalation is not false")
    for volume in pod.get("volumes", []):
        mode = volume.get("projected", volume.get("secret", {})).get("defaultMode", 0o644)
        if mode & 0o004 == 0 and "fsGroup" not in pod.get("securityContext", {}):
            out.append(f"{name}: volume {volume['name']} (mode {mode:o}) is unreadable to UID {image_user()}")
    resources = container.get("resources", {})
    if "memory" not in resources.get("requests", {}) or "memory" not in resources.get("limits", {}):
        out.append(f"{name}: no memory request and limit")

    annotations = template["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") == "true":
        if annotations.get("prometheus.io/port") != str(metrics_port):
            out.append(f"{name}: prometheus.io/port is not the metrics port {metrics_port}")
        if annotations.get("prometheus.io/path", "/metrics") != "/metrics":
            out.append(f"{name}: prometheus.io/path is not /metrics")
    return out


def sidecar_problems(deployment: Doc, docs: list[Doc]) -> list[str]:
    """The other containers of the pod reach the broker and the result backend through the sidecar."""
    out: list[str] = []
    name = deployment["metadata"]["name"]
    _text, cfg = proxy_config(deployment, docs)
    host, port = address_port(cfg.get("listen", bp_config.DEFAULT_LISTEN))
    if host not in ("127.0.0.1", "localhost", "::1"):
        out.append(f"{name}: the sidecar listens on {host}, not loopback")
    others = [c for c in deployment["spec"]["template"]["spec"]["containers"] if not is_proxy(c)]
    if not others:
        out.append(f"{name}: no container besides the proxy")
    for c in others:
        for var in ("AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND"):
            url = env_value(c, var)
            if not isinstance(url, str):
                out.append(f"{name}/{c['name']}: {var} is not set")
                continue
            parts = urlsplit(url)
            if parts.scheme != "redis" or parts.hostname not in ("127.0.0.1", "localhost") or parts.port != port:
                out.append(f"{name}/{c['name']}: {var}={url} does not go through the sidecar on 127.0.0.1:{port}")
    return out


def service_problems(docs: list[Doc]) -> list[str]:
    out: list[str] = []
    deployments = proxy_deployments(docs)
    for svc in find(docs, "Service"):
        selector = svc["spec"]["selector"]
        targets = [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        if not targets:
            out.append(f"Service {svc['metadata']['name']}: its selector {selector} matches no proxy pods")
            continue
        container, _ = proxy_container(targets[0])
        _text, cfg = proxy_config(targets[0], docs)
        wanted = {address_port(cfg[k])[1] for k in ("listen", "tls_listen", "metrics_listen") if k in cfg}
        served = set()
        for port in svc["spec"]["ports"]:
            number = port_number(container, port.get("targetPort", port["port"]))
            if number is None:
                out.append(f"Service {svc['metadata']['name']}: targetPort {port.get('targetPort')} is not a port")
            else:
                served.add(number)
        if wanted - served:
            out.append(f"Service {svc['metadata']['name']}: does not expose {sorted(wanted - served)}")
        if targets[0]["spec"].get("replicas", 1) < 2:
            out.append(f"Deployment {targets[0]['metadata']['name']}: fewer than 2 replicas")
    for pdb in find(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        if not any(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments):
            out.append(f"PodDisruptionBudget {pdb['metadata']['name']}: selects no proxy pods")
    services = {s["metadata"]["name"] for s in find(docs, "Service")}
    for cert in find(docs, "Certificate"):
        secret = cert["spec"]["secretName"]
        used = [
            d for d in deployments
            for v in d["spec"]["template"]["spec"].get("volumes", [])
            for s in v.get("projected", {}).get("sources", [{"secret": v.get("secret", {})}])
            if s.get("secret", {}).get("name", s.get("secret", {}).get("secretName")) == secret
        ]  # fmt: skip
        if not used:
            out.append(f"Certificate {cert['metadata']['name']}: no proxy mounts its Secret {secret}")
        if not services & set(cert["spec"].get("dnsNames", [])):
            out.append(f"Certificate {cert['metadata']['name']}: no dnsName is the Service's name")
    return out


def problems(docs: list[Doc]) -> list[str]:
    out = []
    for d in docs:
        for key in ("apiVersion", "kind", "metadata"):
            if key not in d:
                out.append(f"a document has no {key}")
    for deployment in proxy_deployments(docs):
        out += proxy_problems(deployment, docs)
        if [c for c in deployment["spec"]["template"]["spec"]["containers"] if not is_proxy(c)]:
            out += sidecar_problems(deployment, docs)
    return out + service_problems(docs)


# ----------------------------------------------------------------------------------------------------- the tests


def test_the_manifests_have_a_sidecar_and_a_standalone_proxy() -> None:
    docs = documents()
    deployments = proxy_deployments(docs)
    sidecars = [d for d in deployments if d["spec"]["template"]["spec"]["containers"] and not is_proxy(
        d["spec"]["template"]["spec"]["containers"][0])]  # fmt: skip
    assert {d["metadata"]["name"] for d in sidecars} == {"airflow-worker"}
    assert len(deployments) == 2 and find(docs, "Service", "brokerproxy") and find(docs, "PodDisruptionBudget")
    container, native = proxy_container(sidecars[0])
    assert native and container["restartPolicy"] == "Always"


def test_the_manifests_keep_every_rule() -> None:
    assert problems(documents()) == []


@pytest.fixture
def material(tmp_path: Path) -> Iterator[Callable[[Doc, list[Doc]], Path]]:
    """Lay out a proxy container's mounts under tmp_path: ConfigMap keys as they are, certificates and keys from a
    CA made for this run, passwords as placeholders. Returns the config file, with its paths moved under tmp_path."""
    ca = trustme.CA()
    leaf = ca.issue_cert("brokerproxy", "brokerproxy.airflow.svc", "127.0.0.1")

    def lay_out(deployment: Doc, docs: list[Doc]) -> Path:
        container, _ = proxy_container(deployment)
        pod = deployment["spec"]["template"]["spec"]
        root = tmp_path / deployment["metadata"]["name"]
        text, cfg = proxy_config(deployment, docs)
        config_path = env_value(container, "BROKERPROXY_CONFIG") or image_config_path()
        for _key, path in secret_paths(cfg):
            _kind, _obj, item, _mount = resolve(path, container, pod, docs)
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if item == "ca.crt":
                target.write_bytes(ca.cert_pem.bytes())
            elif item.endswith(".crt"):
                target.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            elif item.endswith(".key"):
                target.write_bytes(leaf.private_key_pem.bytes())
            else:
                target.write_text(f"placeholder-{item}\n")
        out = root / config_path.lstrip("/")
        out.parent.mkdir(parents=True, exist_ok=True)
        mount_dirs = {m["mountPath"].rstrip("/") for m in container.get("volumeMounts", [])}
        for mount_dir in sorted(mount_dirs, key=len, reverse=True):
            text = text.replace(f'"{mount_dir}/', f'"{root}{mount_dir}/')
        out.write_text(text)
        return out

    yield lay_out


@pytest.mark.parametrize("name", ["airflow-worker", "brokerproxy"])
def test_each_proxy_config_loads_with_brokerproxys_own_loader(
    name: str, material: Callable[[Doc, list[Doc]], Path]
) -> None:
    docs = documents()
    (deployment,) = find(docs, "Deployment", name)
    path = material(deployment, docs)
    _text, cfg = proxy_config(deployment, docs)
    # BROKERPROXY_UPSTREAM comes from a Secret: a URL of the scheme the comments of the manifest ask for
    scheme = "rediss" if "upstream_tls" in cfg else "redis"
    loaded = bp_config.load(str(path), {"BROKERPROXY_UPSTREAM": f"{scheme}://:pw@redis.example.internal:6379/0"})
    assert loaded.metrics_listen is not None and loaded.metrics_listen.port == 9180
    if name == "brokerproxy":
        assert loaded.tls_listen is not None and loaded.tls.identity == "cn"
        assert {u.name for u in loaded.acl_users} >= {"airflow-worker", "airflow-scheduler", "flower"}
        assert loaded.authenticator().required  # every client authenticates: protected mode has nothing to refuse
    else:
        assert loaded.listen is not None and loaded.listen.is_loopback and loaded.upstream.tls


def _deployment(docs: list[Doc], name: str) -> Doc:
    return find(docs, "Deployment", name)[0]


def _proxy(docs: list[Doc], name: str) -> Doc:
    return proxy_container(_deployment(docs, name))[0]


def _set_config(docs: list[Doc], cm: str, old: str, new: str) -> None:
    data = find(docs, "ConfigMap", cm)[0]["data"]
    assert old in data["config.toml"]
    data["config.toml"] = data["config.toml"].replace(old, new)


MUTATIONS: list[tuple[str, Callable[[list[Doc]], None], str]] = [
    ("readiness on /healthz",
     lambda d: _proxy(d, "brokerproxy")["readinessProbe"]["httpGet"].update(path="/healthz"), "not /readyz"),
    ("liveness on the wrong port",
     lambda d: _proxy(d, "airflow-worker")["livenessProbe"]["httpGet"].update(port=6380), "not the metrics port"),
    ("metrics moved, probes not",
     lambda d: _set_config(d, "brokerproxy", '"0.0.0.0:9180"', '"0.0.0.0:9190"'), "9190"),
    ("no preStop", lambda d: _proxy(d, "brokerproxy").pop("lifecycle"), "no preStop"),
    ("grace shorter than the drain",
     lambda d: _deployment(d, "brokerproxy")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
     "terminationGracePeriodSeconds 30"),
    ("sidecar grace shorter than preStop + drain",
     lambda d: _deployment(d, "airflow-worker")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=500),
     "terminationGracePeriodSeconds 500"),
    ("certificate on a subPath",
     lambda d: _proxy(d, "brokerproxy")["volumeMounts"].append(
         {"name": "brokerproxy", "mountPath": "/etc/brokerproxy/tls", "subPath": "tls"}), "subPath"),
    ("key in the ConfigMap",
     lambda d: _set_config(d, "brokerproxy", 'key_file = "/etc/brokerproxy/tls/tls.key"',
                           'key_file = "/etc/brokerproxy/config.toml"'), "comes from a configMap"),
    ("certificate nowhere",
     lambda d: _set_config(d, "brokerproxy-sidecar", "/etc/brokerproxy/redis-tls/tls.crt", "/etc/ssl/proxy.crt"),
     "no volume mount"),
    ("root", lambda d: _proxy(d, "brokerproxy")["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    ("writable root", lambda d: _proxy(d, "airflow-worker")["securityContext"].pop("readOnlyRootFilesystem"),
     "readOnlyRootFilesystem"),
    ("unreadable secrets",
     lambda d: _deployment(d, "brokerproxy")["spec"]["template"]["spec"]["securityContext"].pop("fsGroup"),
     "unreadable"),
    ("plain init container", lambda d: _proxy(d, "airflow-worker").pop("restartPolicy"), "restartPolicy"),
    ("worker straight to Redis",
     lambda d: _deployment(d, "airflow-worker")["spec"]["template"]["spec"]["containers"][0]["env"][1].update(
         value="redis://redis:6379/0"), "does not go through the sidecar"),
    ("sidecar on the pod IP",
     lambda d: _set_config(d, "brokerproxy-sidecar", '"127.0.0.1:6380"', '"0.0.0.0:6380"'), "not loopback"),
    ("service to a missing port",
     lambda d: find(d, "Service", "brokerproxy")[0]["spec"]["ports"][1].update(targetPort="tls"), "targetPort tls"),
    ("service selector typo",
     lambda d: find(d, "Service", "brokerproxy")[0]["spec"]["selector"].update(
         {"app.kubernetes.io/component": "prox"}), "matches no proxy pods"),
    ("deployment selector typo",
     lambda d: _deployment(d, "brokerproxy")["spec"]["selector"]["matchLabels"].update(
         {"app.kubernetes.io/name": "proxy"}), "does not match the pod labels"),
    ("one replica", lambda d: _deployment(d, "brokerproxy")["spec"].update(replicas=1), "fewer than 2"),
    ("PDB selects nothing",
     lambda d: find(d, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"].update(
         {"app.kubernetes.io/name": "x"}), "selects no proxy pods"),
    ("scrape port wrong",
     lambda d: _deployment(d, "brokerproxy")["spec"]["template"]["metadata"]["annotations"].update(
         {"prometheus.io/port": "6380"}), "prometheus.io/port"),
    ("certificate for another secret",
     lambda d: find(d, "Certificate")[0]["spec"].update(secretName="other"), "no proxy mounts"),
    ("unknown env", lambda d: _proxy(d, "brokerproxy")["env"].append({"name": "BROKERPROXY_PORT", "value": "1"}),
     "BROKERPROXY_PORT"),
    ("TLS port not declared",
     lambda d: _proxy(d, "brokerproxy")["ports"].pop(1), "tls_listen port 6390 is not a containerPort"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "mutate", "expected"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_rule_catches_its_mistake(what: str, mutate: Callable[[list[Doc]], None], expected: str) -> None:
    docs = copy.deepcopy(documents())
    mutate(docs)
    found = problems(docs)
    assert any(expected in p for p in found), found


def test_the_sidecar_prestop_reads_the_metrics_port_of_its_config() -> None:
    docs = documents()
    deployment = _deployment(docs, "airflow-worker")
    container, _ = proxy_container(deployment)
    _text, cfg = proxy_config(deployment, docs)
    port = address_port(cfg["metrics_listen"])[1]
    code = container["lifecycle"]["preStop"]["exec"]["command"][2]
    assert f"127.0.0.1:{port}/metrics" in code
    compile(code, "preStop", "exec")  # tests/integration/test_container_cmd.py runs it against a real proxy


def test_no_private_key_is_checked_in() -> None:
    for path in KUBE.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY" not in path.read_text(), path

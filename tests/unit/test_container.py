"""The Dockerfile and .dockerignore, checked without a Docker engine (none runs on these machines).

A small Dockerfile parser (instructions, parser directives, line continuations, comments inside continuations,
heredocs, stages, global ARGs) reads the real file; ``violations()`` applies the rules the image must keep, and the
mutation tests show that each rule fails when the file breaks it. ``tests/integration/test_container_cmd.py`` runs
the command line the image runs, against a real Redis.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from brokerproxy import config as bp_config
from brokerproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: The ports the image documents: Redis clients, TLS clients, metrics and probes.
PROXY_PORT, TLS_PORT, METRICS_PORT = 6380, 6390, 9180
#: Words that mean a compiler or headers are installed (none may appear in the final stage).
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cpp|make|cmake|[a-z0-9.+]+-dev)\b")


# ---------------------------------------------------------------------------------------------------- the parser


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY…
    args: str  # the text after the keyword, continuations joined
    line: int  # 1-based line of the keyword
    heredocs: list[tuple[str, str]] = field(default_factory=list)  # (marker, body) in order

    def split_flags(self) -> tuple[dict[str, str], str]:
        """Leading ``--name=value`` flags, and the rest."""
        flags: dict[str, str] = {}
        rest = self.args
        while m := re.match(r"--([A-Za-z][\w-]*)(?:=(\S*))?\s+", rest):
            flags[m.group(1)] = m.group(2) or ""
            rest = rest[m.end() :]
        return flags, rest.strip()

    @property
    def flags(self) -> dict[str, str]:
        return self.split_flags()[0]

    def exec_form(self, text: str | None = None) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        text = self.split_flags()[1] if text is None else text
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    base: str  # with global ARGs expanded
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            words = shlex.split(ins.args)
            if words and "=" not in words[0]:  # legacy form: ENV KEY value with spaces
                out[words[0]] = ins.args.split(None, 1)[1] if len(words) > 1 else ""
                continue
            for word in words:
                key, _, value = word.partition("=")
                out[key] = value
        return out


@dataclass
class Dockerfile:
    directives: dict[str, str]
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


HEREDOC = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(text: str) -> Dockerfile:
    lines = text.splitlines()
    directives: dict[str, str] = {}
    i = 0
    while i < len(lines) and (m := re.match(r"#\s*([A-Za-z]+)\s*=\s*(\S+)\s*$", lines[i])):
        directives[m.group(1).lower()] = m.group(2)
        i += 1
    instructions: list[Instruction] = []
    while i < len(lines):
        raw = lines[i]
        if not raw.strip() or raw.lstrip().startswith("#"):
            i += 1
            continue
        start = i
        parts = []
        line = raw
        while True:
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                parts.append(stripped[:-1])
                i += 1
                # comment lines and blank lines inside a continuation are dropped, as Docker does
                while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                    i += 1
                if i >= len(lines):
                    break
                line = lines[i]
                continue
            parts.append(line)
            i += 1
            break
        text_ = " ".join(p.strip() for p in parts)
        keyword, _, args = text_.partition(" ")
        ins = Instruction(keyword.upper(), args.strip(), start + 1)
        if ins.keyword in ("RUN", "COPY", "ADD"):
            for strip_tabs, _quote, marker in HEREDOC.findall(ins.args):
                body = []
                while i < len(lines):
                    candidate = lines[i].lstrip("\t") if strip_tabs else lines[i]
                    i += 1
                    if candidate == marker:
                        break
                    body.append(candidate)
                else:
                    raise ValueError(f"line {start + 1}: heredoc {marker} is not closed")
                ins.heredocs.append((marker, "\n".join(body) + "\n"))
        instructions.append(ins)

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            _flags, rest = ins.split_flags()
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(_expand(words[0], global_args), name, []))
        elif not stages:
            if ins.keyword != "ARG":
                raise ValueError(f"line {ins.line}: {ins.keyword} before the first FROM")
            key, _, value = ins.args.partition("=")
            global_args[key.strip()] = value.strip().strip("\"'")
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise ValueError("no FROM")
    return Dockerfile(directives, global_args, stages)


def healthcheck_command(stage: Stage) -> list[str] | None:
    ins = stage.last("HEALTHCHECK")
    if ins is None:
        return None
    _flags, rest = ins.split_flags()
    keyword, _, command = rest.partition(" ")
    return ins.exec_form(command.strip()) if keyword.upper() == "CMD" else None


def baked_files(stage: Stage) -> dict[str, str]:
    """Files a stage writes from heredocs: ``COPY <<EOF /dest`` → {"/dest": body}."""
    out = {}
    for ins in stage.all("COPY"):
        if len(ins.heredocs) == 1:
            _flags, rest = ins.split_flags()
            out[rest.split()[-1]] = ins.heredocs[0][1]
    return out


def context_sources(df: Dockerfile) -> list[str]:
    """The build-context paths every COPY/ADD (not --from, not a heredoc) reads."""
    out = []
    for stage in df.stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            flags, rest = ins.split_flags()
            if "from" in flags or ins.heredocs:
                continue
            words = ins.exec_form(rest) or shlex.split(rest)
            out.extend(words[:-1])
    return out


# ------------------------------------------------------------------------------------------------ .dockerignore


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):  # any number of directories, none included: "**/x" matches "x"
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per pattern, in order."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line[1:].strip() if include else line
        pattern = pattern.strip("/").replace("//", "/")
        rules.append((not include, _glob_regex(pattern)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path, or one of its parent directories, decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for exclude, regex in rules:
        if any(regex.match(c) for c in candidates):
            verdict = exclude
    return verdict


# ------------------------------------------------------------------------------------------------------ the rules


def violations(df: Dockerfile, dockerignore: str, root: Path = ROOT) -> list[str]:
    """Everything the image must be, as a list of what is wrong (empty: all good)."""
    out: list[str] = []
    final = df.final
    names = {s.name for s in df.stages if s.name}

    if len(df.stages) < 2:
        out.append("not multi-stage: a builder stage with compilers, and a runtime stage without")
    if not re.match(r"^python:3\.11(\.\d+)*-slim(-[a-z]+)?(@sha256:[0-9a-f]+)?$", final.base):
        out.append(f"final stage is FROM {final.base}, not a python:3.11-slim image")
    if final.base in names:
        out.append(f"final stage builds on stage {final.base}, which has the compilers")
    copies_from = [i.flags.get("from") for i in final.all("COPY") if "from" in i.flags]
    if not any(c in names or (c or "").isdigit() for c in copies_from):
        out.append("final stage copies nothing from the builder stage")
    for ins in final.all("RUN"):
        if m := COMPILERS.search(ins.args):
            out.append(f"line {ins.line}: final stage installs a compiler or headers ({m.group(0)})")

    user = final.last("USER")
    if user is None:
        out.append("no USER: the image would run as root")
    else:
        uid = user.args.split(":")[0].strip()
        if not uid.isdigit():
            out.append(f"USER {user.args}: use a numeric UID (Kubernetes runAsNonRoot can only verify numbers)")
        elif int(uid) == 0:
            out.append("USER 0 is root")
        later = [i for i in final.instructions if i.line > user.line and i.keyword == "RUN"]
        if later:
            out.append(f"line {later[0].line}: RUN after USER")

    health = healthcheck_command(final)
    if health is None:
        out.append("no HEALTHCHECK CMD in exec form")
    else:
        joined = " ".join(health)
        if "/healthz" not in joined:
            out.append("HEALTHCHECK does not ask /healthz")
        if health[0] in ("curl", "wget") or re.search(r"\b(curl|wget)\b", joined):
            out.append("HEALTHCHECK uses curl/wget, which python:*-slim does not have")
        if str(METRICS_PORT) not in joined:
            out.append(f"HEALTHCHECK does not fall back to the metrics port {METRICS_PORT}")
        hc_flags = final.last("HEALTHCHECK").flags  # type: ignore[union-attr]
        if "timeout" not in hc_flags:
            out.append("HEALTHCHECK has no --timeout")

    exposed = set()
    for ins in final.all("EXPOSE"):
        for word in ins.args.split():
            exposed.add(int(word.split("/")[0]))
    for port in (PROXY_PORT, TLS_PORT, METRICS_PORT):
        if port not in exposed:
            out.append(f"EXPOSE lacks {port}")

    stop = final.last("STOPSIGNAL")
    if stop is None or stop.args.strip() not in ("SIGTERM", "15"):
        out.append("STOPSIGNAL is not SIGTERM (SIGTERM is the drain)")
    entry = final.last("ENTRYPOINT")
    if entry is None or entry.exec_form() != ["brokerproxy"]:
        out.append('ENTRYPOINT is not ["brokerproxy"] in exec form (so that the proxy is PID 1 and gets SIGTERM)')
    cmd = final.last("CMD")
    if cmd is None or cmd.exec_form() is None:
        out.append("CMD is missing or not in exec form (the base image's CMD would be inherited)")

    env = final.env()
    known = {"BROKERPROXY_CONFIG"} | {bp_config.ENV_PREFIX + k.upper() for k in bp_config.SCALARS}
    for key in env:
        if key.startswith(bp_config.ENV_PREFIX) and key not in known:
            out.append(f"ENV {key} is no setting brokerproxy reads")
    config_path = env.get("BROKERPROXY_CONFIG")
    baked = baked_files(final)
    if config_path is None:
        out.append("ENV BROKERPROXY_CONFIG is not set")
    elif config_path not in baked:
        out.append(f"{config_path} (BROKERPROXY_CONFIG) is not written by the image: a run without a mount fails")
    else:
        try:
            cfg = tomllib.loads(baked[config_path])
        except tomllib.TOMLDecodeError as exc:
            out.append(f"the image's {config_path} is not TOML: {exc}")
            cfg = {}
        for key, port in (("listen", PROXY_PORT), ("metrics_listen", METRICS_PORT)):
            value = cfg.get(key)
            if value is None:
                out.append(f"the image's config does not set {key} (the default is loopback: unreachable)")
            elif value != f"0.0.0.0:{port}":
                out.append(f"the image's config has {key} = {value!r}, not 0.0.0.0:{port}")
    if any(ins.heredocs for s in df.stages for ins in s.instructions):
        if not df.directives.get("syntax", "").startswith("docker/dockerfile:1"):
            out.append("heredocs need the parser directive # syntax=docker/dockerfile:1")

    rules = dockerignore_rules(dockerignore)
    for src in context_sources(df):
        path = src.rstrip("/").removeprefix("./")
        if not (root / path).exists():
            out.append(f"COPY {src}: no such file in the repository")
        elif ignored(path, rules):
            out.append(f"COPY {src}: excluded by .dockerignore")
    return out


def real() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


# ------------------------------------------------------------------------------------------------------ the tests


def test_the_dockerfile_keeps_every_rule() -> None:
    assert violations(real(), DOCKERIGNORE.read_text()) == []


def test_the_final_stage_runs_as_a_numeric_non_root_user_and_the_builder_has_the_compiler() -> None:
    df = real()
    assert len(df.stages) >= 2
    assert df.stages[0].name is not None and df.final.name is None
    assert any(COMPILERS.search(i.args) for i in df.stages[0].all("RUN")), "the builder installs a compiler"
    user = df.final.last("USER")
    assert user is not None and int(user.args.split(":")[0]) >= 1000


# A rule that cannot fail proves nothing: break the real file in each way and check the rule notices.
MUTATIONS: list[tuple[str, Callable[[str], str], str]] = [
    ("root user", lambda t: t.replace("USER 10001:10001", "USER 0"), "USER 0 is root"),
    ("named user", lambda t: t.replace("USER 10001:10001", "USER brokerproxy"), "numeric UID"),
    ("no user", lambda t: re.sub(r"(?m)^USER .*\n", "", t), "no USER"),
    ("single stage", lambda t: re.sub(r"(?ms)^# ---- builder.*?(?=^# ---- runtime)", "", t), "multi-stage"),
    (
        "full base",
        lambda t: t.replace("ARG PYTHON_IMAGE=python:3.11-slim", "ARG PYTHON_IMAGE=python:3.11"),
        "not a python:3.11-slim",
    ),
    (
        "compiler in final stage",
        lambda t: t.replace("RUN groupadd", "RUN apt-get update && apt-get install -y gcc && groupadd"),
        "installs a compiler",
    ),
    (
        "headers in final stage (on a continuation line)",
        lambda t: t.replace("RUN groupadd", "RUN apt-get install -y \\\n    # the headers\n    libssl-dev && groupadd"),
        "libssl-dev",
    ),
    ("healthcheck elsewhere", lambda t: t.replace("/healthz'", "/metrics'"), "/healthz"),
    (
        "healthcheck with curl",
        lambda t: re.sub(r"(?m)^    CMD \[\"python\".*$", '    CMD ["curl", "-f", "http://127.0.0.1:9180/healthz"]', t),
        "curl",
    ),
    ("no healthcheck", lambda t: re.sub(r"(?ms)^HEALTHCHECK .*?\]\n", "", t), "no HEALTHCHECK"),
    ("TLS port not exposed", lambda t: t.replace(" 6390/tcp", ""), "EXPOSE lacks 6390"),
    (
        "shell-form entrypoint",
        lambda t: t.replace('ENTRYPOINT ["brokerproxy"]', "ENTRYPOINT brokerproxy"),
        "ENTRYPOINT",
    ),
    ("no CMD", lambda t: re.sub(r"(?m)^CMD \[\]\n", "", t), "CMD"),
    ("stop signal", lambda t: t.replace("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL"), "STOPSIGNAL"),
    (
        "unknown env",
        lambda t: t.replace("PYTHONUNBUFFERED=1", "PYTHONUNBUFFERED=1 BROKERPROXY_LISTEN_PORT=1"),
        "BROKERPROXY_LISTEN_PORT",
    ),
    (
        "config on loopback",
        lambda t: t.replace('listen = "0.0.0.0:6380"', 'listen = "127.0.0.1:6380"'),
        "not 0.0.0.0:6380",
    ),
    (
        "config not baked",
        lambda t: t.replace("COPY <<'EOF' /etc/brokerproxy/config.toml", "COPY <<'EOF' /tmp/x"),
        "not written by the image",
    ),
    (
        "missing source",
        lambda t: t.replace("COPY pyproject.toml README.md", "COPY pyproject.toml README.rst"),
        "README.rst",
    ),
    ("RUN after USER", lambda t: t.replace("USER 10001:10001\n", "USER 10001:10001\nRUN true\n"), "RUN after USER"),
]


@pytest.mark.parametrize(("what", "mutate", "expected"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_rule_catches_its_mistake(what: str, mutate: Callable[[str], str], expected: str) -> None:
    text = DOCKERFILE.read_text()
    mutated = mutate(text)
    assert mutated != text, f"the mutation {what!r} no longer applies to the Dockerfile"
    found = violations(parse_dockerfile(mutated), DOCKERIGNORE.read_text())
    assert any(expected in v for v in found), found


def test_dockerignore_that_drops_a_needed_file_is_caught() -> None:
    found = violations(real(), DOCKERIGNORE.read_text() + "README.md\n")
    assert any("README.md: excluded by .dockerignore" in v for v in found), found


def test_parser_continuations_comments_heredocs_and_stages() -> None:
    df = parse_dockerfile(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.11-slim\n"
        "FROM ${BASE} AS build\n"
        "RUN echo one \\\n"
        "    # a comment inside the continuation\n"
        "\n"
        "    two\n"
        "COPY <<-'EOT' /etc/x.toml\n"
        "\tkey = 1\n"
        "\tEOT\n"
        "FROM $BASE\n"
        "COPY --from=build /a /b\n"
        'ENV A=1 B="two words" \\\n'
        "    C=3\n"
        "ENV LEGACY value with spaces\n"
        'HEALTHCHECK --interval=5s --timeout=2s CMD ["python", "-c", "pass"]\n'
        'ENTRYPOINT ["x"]\n'
        "CMD echo shell\n"
    )
    assert df.directives == {"syntax": "docker/dockerfile:1"}
    assert [s.base for s in df.stages] == ["python:3.11-slim", "python:3.11-slim"]
    assert df.stages[0].name == "build" and df.final.name is None
    run = df.stages[0].all("RUN")[0]
    assert run.args == "echo one two" and run.line == 4
    assert baked_files(df.stages[0]) == {"/etc/x.toml": "key = 1\n"}
    assert df.final.all("COPY")[0].flags == {"from": "build"}
    assert df.final.env() == {"A": "1", "B": "two words", "C": "3", "LEGACY": "value with spaces"}
    assert healthcheck_command(df.final) == ["python", "-c", "pass"]
    assert df.final.last("HEALTHCHECK").flags == {"interval": "5s", "timeout": "2s"}  # type: ignore[union-attr]
    assert df.final.last("ENTRYPOINT").exec_form() == ["x"]  # type: ignore[union-attr]
    assert df.final.last("CMD").exec_form() is None  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not closed"):
        parse_dockerfile("FROM a\nRUN <<EOF\necho\n")


def test_dockerignore_matching_follows_docker() -> None:
    rules = dockerignore_rules("*\n!src\n**/__pycache__\n!keep/**/*.txt\n*.md\n!README.md\n")
    assert ignored("anything", rules) and ignored("dir/file", rules)
    assert not ignored("src", rules) and not ignored("src/a/b.py", rules)
    assert ignored("src/__pycache__/x.pyc", rules) and ignored("__pycache__", rules)
    assert not ignored("keep/a/b/c.txt", rules) and not ignored("keep/c.txt", rules)
    assert ignored("NOTES.md", rules) and not ignored("README.md", rules)


def test_the_build_context_is_only_what_the_image_needs() -> None:
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    for needed in ("pyproject.toml", "README.md", "brokerproxy/__init__.py", "brokerproxy/cli.py"):
        assert not ignored(needed, rules), needed
    for unwanted in (".git/config", ".venv/bin/python", "tests/conftest.py", "bench/run.py", "deploy/compose/x",
                     "brokerproxy/__pycache__/cli.cpython-311.pyc", "brokerproxy.egg-info/PKG-INFO",
                     "server.key", ".ci/run", "Dockerfile"):  # fmt: skip
        assert ignored(unwanted, rules), unwanted
    # and every file of the package goes in: the image installs the package from these files
    for path in (ROOT / "brokerproxy").rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and "__pycache__" not in rel:
            assert not ignored(rel, rules), rel


def test_the_package_declares_every_data_file_the_image_needs() -> None:
    """The image installs the package (not a checkout): a data file the code reads but pyproject does not declare
    as package data would be missing in the container only."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject.get("tool", {}).get("setuptools", {}).get("package-data", {}).get("brokerproxy", [])
    data = [p for p in (ROOT / "brokerproxy").iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    for path in data:
        assert any(re.fullmatch(_glob_regex(pat).pattern, path.name) for pat in patterns), (
            f"brokerproxy/{path.name} is not package data in pyproject.toml: the image would not have it"
        )


def _image_config(tmp_path: Path) -> Path:
    df = real()
    path = df.final.env()["BROKERPROXY_CONFIG"]
    out = tmp_path / path.lstrip("/")
    out.parent.mkdir(parents=True)
    out.write_text(baked_files(df.final)[path])
    return out


def test_the_image_defaults_refuse_to_serve_the_network_without_users(tmp_path: Path) -> None:
    """Safe by default: listening on 0.0.0.0 with no users configured stops at start-up (exit 2), naming the key."""
    path = _image_config(tmp_path)
    with pytest.raises(ConfigError) as exc:
        bp_config.load(str(path), {})
    assert exc.value.key == "protected_mode"
    # the documented ways out: users in the mounted file, or saying that the network is private
    cfg = bp_config.load(str(path), {"BROKERPROXY_PROTECTED_MODE": "no"})
    assert str(cfg.listen) == f"0.0.0.0:{PROXY_PORT}" and str(cfg.metrics_listen) == f"0.0.0.0:{METRICS_PORT}"
    with_users = path.read_text() + '\n[[users]]\nname = "celery"\npasswords = ["s3cret"]\n'
    path.write_text(with_users)
    cfg = bp_config.load(str(path), {"BROKERPROXY_UPSTREAM": "redis://cache:6379/2"})
    assert cfg.upstream.host == "cache" and cfg.upstream.db == 2

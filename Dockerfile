# syntax=docker/dockerfile:1
#
# brokerproxy's container image.
#
#   docker build -t brokerproxy .
#   docker run --rm -p 6380:6380 -p 9180:9180 \
#       -v "$PWD/config.toml:/etc/brokerproxy/config.toml:ro" brokerproxy
#
# Configuration: the file /etc/brokerproxy/config.toml (BROKERPROXY_CONFIG; the image ships the defaults below, mount
# your own over it) and BROKERPROXY_<KEY> environment variables for any top-level key (BROKERPROXY_UPSTREAM,
# BROKERPROXY_TLS_LISTEN, BROKERPROXY_PROTECTED_MODE…), which win over the file; flags given as the command win over
# both. The image listens on 0.0.0.0, so protected mode (on by default) refuses to start until the config defines
# users ([[users]] or [acl] with "user default off"), or until BROKERPROXY_PROTECTED_MODE=no says that something else
# (a network policy, a private network) keeps strangers out. Ports: 6380 Redis clients, 6390 TLS clients (once
# tls_listen and [tls] are set), 9180 /metrics, /healthz, /readyz. SIGTERM drains (exit 0 when the drain ended within
# drain_timeout), SIGHUP reloads users, rules and certificates.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: compilers, and a virtual environment with brokerproxy and its dependencies --------------------------
FROM ${PYTHON_IMAGE} AS builder
# uvloop, hiredis and cryptography ship wheels for the common platforms; the compiler is for the others.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/brokerproxy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY brokerproxy ./brokerproxy
RUN /opt/brokerproxy/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/brokerproxy/bin/pip install --no-cache-dir . \
    && /opt/brokerproxy/bin/brokerproxy --version

# ---- runtime: the same slim Python, the venv, no compiler ---------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="brokerproxy" \
      org.opencontainers.image.description="A RESP proxy in front of Redis for Celery and Airflow" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 brokerproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin brokerproxy
COPY --from=builder /opt/brokerproxy /opt/brokerproxy
# (A heredoc: BuildKit, the default builder since Docker 23, or docker buildx build.)
COPY <<'EOF' /etc/brokerproxy/config.toml
# brokerproxy in a container: the image's defaults. Mount your own file over this one (keep listen and
# metrics_listen on 0.0.0.0, or the container is unreachable), or override keys with BROKERPROXY_<KEY>.
# Every key, with its default: config.example.toml in the source tree.
listen = "0.0.0.0:6380"
metrics_listen = "0.0.0.0:9180"
# Redis: a host named "redis", as in Airflow's compose file. BROKERPROXY_UPSTREAM overrides it.
upstream = "redis://redis:6379/0"
# TLS clients: set tls_listen = "0.0.0.0:6390" and a [tls] table with cert_file and key_file.
EOF
ENV PATH=/opt/brokerproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BROKERPROXY_CONFIG=/etc/brokerproxy/config.toml
USER 10001:10001
EXPOSE 6380/tcp 6390/tcp 9180/tcp
# slim has no curl: Python asks the metrics listener (port from BROKERPROXY_METRICS_LISTEN, else the config file).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, tomllib, urllib.request as u; c = os.environ.get('BROKERPROXY_CONFIG'); a = os.environ.get('BROKERPROXY_METRICS_LISTEN') or (tomllib.load(open(c, 'rb')).get('metrics_listen') if c else None) or '127.0.0.1:9180'; u.urlopen('http://127.0.0.1:%s/healthz' % a.rpartition(':')[2], timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["brokerproxy"]
# No flags: the file and the environment say everything; arguments given to `docker run IMAGE …` or Kubernetes
# `args:` are brokerproxy flags (--listen, --upstream, --log-level…), which win over both.
CMD []

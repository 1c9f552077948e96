# syntax=docker/dockerfile:1
#
# One image, two programs: `sidecar` (the entrypoint) and `restaurant-api` (the demo upstream,
# selected with a command override: `docker run --entrypoint restaurant-api IMAGE serve`, or
# `command: [restaurant-api]` in Kubernetes).
#
#   docker build -t sidecar:0.1.0 .        (BuildKit: the default since Docker 23)
#   docker run --rm -p 8080:8080 -p 9901:9901 -e SIDECAR_ADMIN_HOST=0.0.0.0 \
#     -e UPSTREAM_URL=http://HOST:3000 sidecar:0.1.0
#
# Stage 1 builds wheels for the project and every dependency (with a compiler at hand in
# case a dependency has no wheel for the target platform); stage 2 installs those wheels
# offline into a clean slim image that has no compiler, no wheel cache and runs as a
# numeric non-root user (so Kubernetes' runAsNonRoot can verify it).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Only the builder gets build tools; the final stage never sees them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Dependencies first (pyproject only), so code edits reuse this layer's wheels.
COPY pyproject.toml ./
RUN mkdir -p proxy upstream_app \
    && touch proxy/__init__.py upstream_app/__init__.py \
    && pip wheel --wheel-dir /wheels . \
    && rm -f /wheels/sidecar-*.whl
COPY proxy ./proxy
COPY upstream_app ./upstream_app
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="Reliability sidecar proxy (idempotency, retries, circuit breaking, metrics, health) and the demo restaurant API"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIDECAR_CONFIG=/app/config/sidecar.yaml

# A numeric UID/GID (10001, above any distro range) so runAsNonRoot can verify it; the
# Kubernetes manifests use the same numbers.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin sidecar

# Install from the builder's wheels without copying them into a layer (bind mount), and
# without an index: the image gets exactly what the builder resolved.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/sidecar-*.whl

WORKDIR /app
# The default config (`sidecar run` with no --config); Kubernetes mounts its own.
COPY config/sidecar.yaml ./config/sidecar.yaml
# var/ holds the demo's SQLite database, writable by the runtime user (an emptyDir in k8s).
# Then a smoke test: both programs import everything they need and the config is valid.
RUN mkdir -p /app/var && chown 10001:10001 /app/var \
    && python -c "import proxy.server, upstream_app.app" \
    && sidecar check-config /app/config/sidecar.yaml \
    && restaurant-api --help >/dev/null

USER 10001:10001

# 8080: proxy listener. 9901: admin listener (live/ready/health/metrics); it binds
# 127.0.0.1 unless SIDECAR_ADMIN_HOST=0.0.0.0 (the Kubernetes config sets admin.host).
EXPOSE 8080 9901

# No HEALTHCHECK: the same image also runs restaurant-api, where a sidecar check would be
# wrong; Kubernetes uses the probes in k8s/ (and ignores HEALTHCHECK anyway).
# Exec form: the program is PID 1 and receives SIGTERM itself (the sidecar drains on it).
ENTRYPOINT ["sidecar"]
CMD ["run"]

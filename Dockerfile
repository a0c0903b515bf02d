# syntax=docker/dockerfile:1
# kvgate container image.
#
#   docker build -t kvgate:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/gateway.yaml:/etc/kvgate/gateway.yaml:ro" kvgate:0.1.0
#
# Stage 1 builds wheels for kvgate and every dependency (uvloop, aiohttp, orjson, msgspec ... come
# from pyproject.toml); stage 2 installs them into a virtualenv on a clean slim base, so no
# compiler, pip cache or source tree reaches the final image.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel is built from; benchmarks/ and tests/ stay out of the image.
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY policies/ policies/
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    # Logs leave the process line by line; the root filesystem is read-only, so no .pyc writes.
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/kvgate/bin:$PATH
# The wheels are bind-mounted from the build stage rather than copied, so they never become a
# layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/kvgate \
    && /opt/kvgate/bin/pip install --no-index --find-links=/wheels kvgate \
    && groupadd --system --gid 10001 kvgate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin kvgate

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# 8080: the OpenAI-compatible API. 9090: admin (/metrics, /healthz, /readyz).
EXPOSE 8080 9090
# The slim base has no curl; Python's standard library is enough. Kubernetes ignores this and
# uses the Deployment's probes instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["kvgate"]
CMD ["serve", "--config", "/etc/kvgate/gateway.yaml"]

# mergebot daemon image: CPU-only torch, runs as a non-root user.
#
#   docker build -t mergebot .
#   docker run -d --name mergebot --init --stop-timeout 45 \
#     -v "$PWD/config:/config:ro" -v mergebot-state:/state -v mergebot-cache:/cache \
#     -e HF_TOKEN mergebot
#
# Volumes: /config holds mergebot.toml and the files it names, e.g. the eval text (read-only is fine); /state the
# SQLite state and work files (MERGEBOT_STATE_DIR); /cache the Hugging Face cache (HF_HOME) and mergebot's own small
# caches. Named volumes are initialised with the right owner; bind-mounted host directories for /state and /cache
# must be writable by UID 10001.
# Token: -e HF_TOKEN=..., or a secret file at /run/secrets/hf_token (docker/compose secret named hf_token),
# which huggingface_hub reads through HF_TOKEN_PATH.
# Stopping: on SIGTERM the daemon stops its merge child (finished shards are kept for resume) within the config's
# [daemon] stop_grace (30 s by default), so give `docker stop` a bit more than that instead of Docker's default
# 10 s (--stop-timeout above, or stop_grace_period in compose).
# --init puts a tiny init in front of the daemon as PID 1, which reaps orphaned processes; recommended.

# ---- build stage: a self-contained virtualenv with CPU torch and mergebot installed as a package ----
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/mergebot/venv
ENV PATH=/opt/mergebot/venv/bin:$PATH

WORKDIR /src
# torch's version comes from constraints.txt (the same file every other install uses); the PyTorch CPU index
# serves the CPU-only wheel of it (no CUDA libraries, a fraction of the size), PyPI everything else.
COPY constraints.txt pyproject.toml README.md ./
COPY mergebot ./mergebot
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt . \
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__"

# ---- runtime stage ----
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="mergebot" \
      org.opencontainers.image.description="Keeps merged open LLMs up to date with their upstream models."

ENV PATH=/opt/mergebot/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache \
    MERGEBOT_CACHE_DIR=/cache/mergebot \
    MERGEBOT_STATE_DIR=/state \
    HF_HUB_DISABLE_TELEMETRY=1
# Where huggingface_hub looks for the token file: a Docker/compose secret named hf_token. A missing file is
# fine (no token, or HF_TOKEN from the environment, which takes precedence). DL3064 is a false positive here:
# the value is a path, not a secret.
# hadolint ignore=DL3064
ENV HF_TOKEN_PATH=/run/secrets/hf_token

COPY --from=build /opt/mergebot/venv /opt/mergebot/venv

RUN groupadd --system --gid 10001 mergebot \
    && useradd --system --uid 10001 --gid mergebot --home-dir /home/mergebot --create-home \
       --shell /usr/sbin/nologin mergebot \
    && mkdir -p /state /cache /config \
    && chown mergebot:mergebot /state /cache \
    && chmod 0700 /state /cache

USER 10001:10001
WORKDIR /state
VOLUME ["/state", "/cache", "/config"]

# Webhook receiver and metrics endpoint, when enabled in the config (off by default; they listen on 127.0.0.1
# unless the config says otherwise, e.g. listen = "0.0.0.0:8765" to publish them from the container).
EXPOSE 8765 9108

# Healthy = a live daemon holds the lock on the state in /state (reads the state, takes no lock).
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=3 \
    CMD ["mergebot", "status", "--health", "--config", "/config/mergebot.toml"]

ENTRYPOINT ["mergebot"]
CMD ["run", "--config", "/config/mergebot.toml"]

# syntax=docker/dockerfile:1
# One image for every role of the stack (see docker-compose.yml):
#   web     gunicorn app:app            (the default command)
#   worker  python worker.py            (needs the weights volume and, normally, a GPU)
#   fetch   python models/fetch.py      (one-shot: fills the weights volume)
# The released weights are NOT baked in: they live in a volume mounted at /models (MODEL_DIR).

ARG PYTHON_VERSION=3.11

# ---- build stage: a virtualenv with the pinned dependencies ------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/requirements.txt
# Binary wheels only: nothing is compiled, so neither stage needs a compiler. On linux/x86_64 the
# default PyPI torch==2.14.1 wheel is the CUDA build; its CUDA runtime arrives as nvidia-* wheels,
# and the host's driver is injected at run time by the NVIDIA container toolkit.
RUN pip install --no-cache-dir --only-binary=:all: -r /tmp/requirements.txt

# ---- runtime stage: the virtualenv, the source, a non-root user --------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" app \
 && useradd --system --uid "${APP_UID}" --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
 && mkdir -p /models \
 && chown app:app /models

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Source owned by root: the service user can read but not modify its own code.
COPY . /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_DIR=/models \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# NVIDIA_VISIBLE_DEVICES is deliberately unset: which GPU a container sees comes from its compose
# reservation only, so web containers never see a GPU.
# Docker copies /models (owned by app) into a fresh named volume, so the fetch service can write it.
VOLUME ["/models"]
# Numeric, so runtimes can verify "non-root" without reading /etc/passwd.
USER ${APP_UID}:${APP_UID}
EXPOSE 5000

# Role-aware: SERVICE_ROLE=worker checks the RQ worker registration instead of HTTP.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]

CMD ["gunicorn", "--bind", "0.0.0.0:5000", "--access-logfile", "-", "app:app"]

# syntax=docker/dockerfile:1.7
# fruitdask image: the package, TensorFlow and Dask in a venv, run as a non-root user.
#
#   docker build -t <registry>/fruitdask:0.1.0 .                      # CPU (default target)
#   docker build --target gpu -t <registry>/fruitdask:0.1.0-gpu .      # CUDA TensorFlow
#
# Everything is installed at build time with pinned versions; nothing is installed when a
# container starts. The Helm chart runs `dask scheduler`, `dask worker` and
# `python -m fruitdask run` in it (distributed >= 2026.6 has no dask-scheduler/dask-worker).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------------------------------
# Dependencies shared by both variants, pinned to the versions the test suite runs with.
FROM base AS deps
RUN python -m venv /opt/venv \
 && pip install "pip==25.2" "setuptools==80.9.0" "wheel==0.45.1"
RUN pip install \
      "dask==2026.8.0" \
      "distributed==2026.8.0" \
      "dask-ml==2025.1.0" \
      "dask-kubernetes==2026.3.0" \
      "numpy==2.4.6" \
      "pandas==3.1.1" \
      "pyarrow==26.0.1" \
      "scikit-learn==1.9.1" \
      "pillow==13.0.0" \
      "fsspec==2026.9.0" \
      "s3fs==2026.9.0" \
      "aiobotocore==3.10.0" \
      "keras==3.15.1" \
      "h5py==3.14.0" \
      "pyyaml==6.0.4" \
      "click==8.5.1" \
      "bokeh==3.9.2" \
      "prometheus-client==0.26.0"

# ---------------------------------------------------------------------------------------
FROM deps AS build-cpu
RUN pip install "tensorflow-cpu==2.21.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fruitdask ./fruitdask
# --no-deps: every dependency is pinned above; pip check fails the build if one is missing.
RUN pip install --no-deps . && pip check && rm -rf /src

# ---------------------------------------------------------------------------------------
FROM deps AS build-gpu
RUN pip install "tensorflow[and-cuda]==2.21.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fruitdask ./fruitdask
RUN pip install --no-deps . && pip check && rm -rf /src

# ---------------------------------------------------------------------------------------
FROM base AS runtime
# Numeric uid/gid so Kubernetes can verify runAsNonRoot; the chart uses the same ids.
RUN groupadd --gid 10001 fruitdask \
 && useradd --uid 10001 --gid 10001 --home-dir /home/fruitdask --create-home \
      --shell /usr/sbin/nologin fruitdask
# HOME and /tmp are emptyDir volumes in the chart (read-only root filesystem).
ENV HOME=/home/fruitdask \
    TF_ENABLE_ONEDNN_OPTS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START=False
WORKDIR /home/fruitdask
EXPOSE 8786 8787 8788
USER 10001:10001
CMD ["dask", "--help"]

# ---------------------------------------------------------------------------------------
FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
RUN python -c "import fruitdask, tensorflow, distributed"

# ---------------------------------------------------------------------------------------
# Last stage = default target: the CPU image.
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
RUN python -c "import fruitdask, tensorflow, distributed" && dask scheduler --help > /dev/null

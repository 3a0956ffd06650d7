# fruitdask image: the package, TensorFlow and Dask in a venv, run as a non-root user.
#
#   make image                                          # CPU image, fruitdask:<version>
#   docker build -t <registry>/fruitdask:0.1.0 .        # the same by hand
#   docker build --build-arg VARIANT=gpu -t <registry>/fruitdask:0.1.0-gpu .   # CUDA TensorFlow
#
# Every package comes from the project's one lock (uv.lock), exported with hashes to
# requirements/<VARIANT>.txt: the CPU image ships exactly the versions the test suite ran.
# Nothing is installed when a container starts. The Helm chart runs `dask scheduler`,
# `dask worker` and `python -m fruitdask run` in it.
#
# No `# syntax=` line and no BuildKit-only instruction: the file builds with the legacy
# builder too, which builds every stage it reads, so the variant is a build argument of one
# chain of stages, not a second target.

# The base image: Debian bookworm's Python 3.11 for users. Where no registry can be reached,
# tools/base-image.sh makes an equivalent image from Debian packages alone (debootstrap).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
# cpu or gpu: which export of the lock is installed (requirements/cpu.txt or gpu.txt).
ARG VARIANT=cpu
# Optional http(s) URL of a folder holding the build machine's pip settings (pip.conf and the
# files it names, e.g. a CA bundle), served on loopback by tools/build_image.py. It is read,
# used and deleted inside one RUN, so no index URL, certificate or credential is left in a
# layer, and this stage's build arguments never reach the final image's history.
ARG PIP_SETTINGS_URL=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY requirements/ ./requirements/
COPY tools/pip_settings.py ./tools/
RUN set -eu; \
    python3 tools/pip_settings.py fetch "$PIP_SETTINGS_URL" /tmp/pip-settings; \
    if [ -f /tmp/pip-settings/pip.conf ]; then export PIP_CONFIG_FILE=/tmp/pip-settings/pip.conf; fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install --no-deps --require-hashes -r "requirements/${VARIANT}.txt"; \
    rm -rf /tmp/pip-settings
# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Numeric uid/gid so Kubernetes can verify runAsNonRoot; the chart uses the same ids.
RUN groupadd --gid 10001 fruitdask \
 && useradd --uid 10001 --gid 10001 --home-dir /home/fruitdask --create-home \
      --shell /usr/sbin/nologin fruitdask
# The locked dependencies: one large layer, rebuilt only when the lock changes.
COPY --from=build /opt/venv /opt/venv
# The project itself: a small layer of its own, rebuilt when the code changes.
# --no-deps --no-build-isolation: every dependency came from the lock, the build backend
# (setuptools) too; pip check fails the build if anything is missing or inconsistent.
COPY pyproject.toml README.md /tmp/src/
COPY fruitdask /tmp/src/fruitdask
RUN cd /tmp/src \
 && /opt/venv/bin/pip install --no-deps --no-build-isolation --no-cache-dir --disable-pip-version-check . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -c "import fruitdask.cli, tensorflow, distributed" \
 && cd / && rm -rf /tmp/src
# HOME and /tmp are emptyDir volumes in the chart (read-only root filesystem).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/fruitdask \
    TF_ENABLE_ONEDNN_OPTS=1 \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /home/fruitdask
EXPOSE 8786 8787 8788 8080
USER 10001:10001
RUN python -m fruitdask --help > /dev/null && dask scheduler --help > /dev/null
CMD ["python", "-m", "fruitdask", "--help"]

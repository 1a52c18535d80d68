# The raysweep image: one image for the Ray head, the GPU workers and the sweep driver
# (see docker-compose.yml). Build: `make docker-build`.
#
# Base: the official Python image, pinned to a patch release and a Debian release.
# Why not rayproject/ray:2.60.0-gpu or nvidia/cuda: the torch and torchvision wheels on
# PyPI bundle their own CUDA runtime (the nvidia-* wheels), and Ray 2.60 is a pip
# package, so all the image needs is the Python the project is tested on (3.11) plus
# the runtime dependencies at constraints.txt's versions. The GPU driver comes from the host through the NVIDIA Container
# Toolkit. A CUDA or Ray GPU base would add a second CUDA toolkit (and, for Ray's image,
# a conda Python) that nothing here uses. Pin a digest too (`@sha256:...`) if you need
# byte-identical rebuilds.
# Where Docker Hub cannot be reached, `make docker-build` (docker/offline.sh) passes BASE_IMAGE:
# a local stand-in with the same role (Debian bookworm + Debian's CPython 3.11,
# `make docker-base-offline`).
ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}

# The nvidia runtime mounts only the driver libraries named here: CUDA compute and
# nvidia-smi/NVML (Ray counts GPUs through NVML). Which GPUs a container sees is left to
# its device reservation (compose) or `docker run --gpus`, never to the image.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RAY_USAGE_STATS_ENABLED=0

# Dependencies first: pyproject.toml's runtime ranges at the exact versions of constraints.txt,
# as `make install` takes them, so a code edit rebuilds only the layers below this one. Only the
# runtime dependencies: no test extras, no pip cache, no compilers (every dependency ships a wheel).
# pip reads its source from these build args: unset, PyPI; offline (docker/offline.sh),
# PIP_NO_INDEX=1 and PIP_FIND_LINKS=<a wheelhouse built on the host, served on its loopback to
# a `--network host` build>. Build args, not ENV: the image's environment keeps neither.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
COPY pyproject.toml constraints.txt /tmp/deps/
RUN python -c "import tomllib; print(*tomllib.load(open('/tmp/deps/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/deps/runtime.txt \
    && pip install --no-cache-dir -c /tmp/deps/constraints.txt -r /tmp/deps/runtime.txt && rm -r /tmp/deps

# A non-root user (uid/gid 1000), and the directories the compose file mounts volumes
# on: a named volume copies this ownership on first use, so the user can write to them.
RUN groupadd --gid 1000 raysweep \
    && useradd --no-log-init --create-home --uid 1000 --gid 1000 raysweep \
    && mkdir -p /cache/raysweep /cache/huggingface /results \
    && chown -R 1000:1000 /cache /results

# The source stays root-owned (read-only for the user). PYTHONPATH rather than a pip
# install of the project, so configs/ stays next to the package (DEFAULT_CONFIG) and Ray
# worker processes on every node import the same code.
WORKDIR /app
COPY configs/ configs/
COPY raysweep/ raysweep/
COPY analysis/ analysis/

# Caches live on volumes (see docker-compose.yml); HF_TOKEN is never baked in: pass it at
# run time (`docker run -e HF_TOKEN`, or HF_TOKEN in the environment of `docker compose`).
ENV PYTHONPATH=/app \
    HF_HOME=/cache/huggingface

# Numeric, so a runtime that forbids root (e.g. runAsNonRoot) can check it.
USER 1000:1000

# Alone (`docker run raysweep`), the image runs the CI-sized sweep on synthetic data on
# its own in-process Ray; compose replaces this with the head, worker and sweep commands.
CMD ["python", "-m", "raysweep.tune", "--config", "configs/smoke.yaml", \
     "--storage-path", "/results", "--set", "data.cache_dir=/cache/raysweep"]

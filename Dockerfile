# avepipe for GPU batch jobs:  docker build -t avepipe .   then   docker run --gpus all -v /data:/data avepipe extract ...
# See docs/docker.md (build arguments, weights, volumes and user ids) and docs/scale-out.md (array jobs).
#
# Base: python:3.11-slim, not nvidia/cuda or pytorch/pytorch. The torch wheels on PyPI carry their own CUDA runtime,
# cuBLAS and cuDNN (the nvidia-* wheels), and the driver comes from the host through the NVIDIA container toolkit
# (--gpus); a CUDA base image would add a second copy of the same libraries (gigabytes) that torch never loads.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- deps: a virtual environment with the dependencies -------------------------------------------------------------
# Its layers stay cached (and are pulled once) across avepipe releases: a code change rebuilds only the small layers of
# the other two stages. The runtime stage starts from this one, so the environment is never copied (5 GB).
FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Where torch comes from: empty = pip's index (PyPI, or the one of the pip configuration below). PyPI's Linux wheels
# are CUDA builds; https://download.pytorch.org/whl/cu126 (for example) gives a build for older drivers.
ARG TORCH_INDEX_URL=
# PID 1 of the container (see the ENTRYPOINT): a static binary, installed with pip like everything else.
ARG DUMB_INIT_VERSION=1.2.5.post1
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# pip's configuration (an index mirror, local wheel folders, certificates) is an optional build secret, mounted at
# /etc/pip.conf for the RUN lines that use pip and kept in no layer: `--secret id=pipconf,src=/etc/pip.conf`
# (docs/docker.md). Without it pip uses PyPI. Offline and mirrored builds need no edit of this file.
# triton only serves torch.compile, which avepipe never calls: uninstalled in the RUN that installs it, so that no
# layer carries it (~0.9 GB).
# DL3013 ignored: hadolint takes the optional --index-url for an unpinned package; both packages are pinned.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pipconf,target=/etc/pip.conf,required=false \
    pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip uninstall --yes triton
# The other dependencies, read from pyproject.toml (one list to maintain); a code change does not invalidate this layer.
# torch and torchvision are left out (installed above): pip would otherwise bring triton back.
COPY pyproject.toml /tmp/avepipe-deps/
RUN --mount=type=secret,id=pipconf,target=/etc/pip.conf,required=false \
    python -c "import re, tomllib; deps = tomllib.load(open('/tmp/avepipe-deps/pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if re.match(r'[\w.-]+', d)[0].lower() not in ('torch', 'torchvision')))" \
        > /tmp/avepipe-deps/requirements.txt \
    && pip install --no-cache-dir -r /tmp/avepipe-deps/requirements.txt "dumb-init==${DUMB_INIT_VERSION}" \
    && pip uninstall --yes triton \
    && rm -r /tmp/avepipe-deps

# -- build: the avepipe wheel ------------------------------------------------------------------------------------------
FROM deps AS build
COPY pyproject.toml README.md /src/
COPY avepipe /src/avepipe
RUN --mount=type=secret,id=pipconf,target=/etc/pip.conf,required=false \
    pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src

# -- runtime: the dependencies, avepipe and a user -------------------------------------------------------------------
FROM deps
ARG APP_UID=1000
ARG BAKE_WEIGHTS=0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AVEPIPE_WEIGHTS_DIR=/weights \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/avepipe-*.whl \
    && rm -r /tmp/wheels \
    && useradd --uid "${APP_UID}" --user-group --create-home --shell /usr/sbin/nologin avepipe \
    && mkdir /weights \
    && chown avepipe:avepipe /weights
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${APP_UID}
WORKDIR /home/avepipe
# --build-arg BAKE_WEIGHTS=1: download the official weights into the image (checksum-verified); otherwise mount them.
RUN if [ "${BAKE_WEIGHTS}" = "1" ]; then avepipe weights download; fi
# dumb-init as PID 1 forwards signals to avepipe's process group, as a terminal's Ctrl-C does, and reaps orphaned
# processes: `docker stop` (SIGTERM) ends a run like Ctrl-C, finished videos kept, exit code 143 (docs/docker.md).
ENTRYPOINT ["dumb-init", "--", "avepipe"]
CMD ["--help"]

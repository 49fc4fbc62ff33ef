# avepipe for GPU batch jobs:  docker build -t avepipe .   then   docker run --gpus all -v /data:/data avepipe extract ...
# See docs/docker.md (build arguments, weights, volumes and user ids) and docs/scale-out.md (array jobs).
#
# Base: python:3.11-slim, not nvidia/cuda or pytorch/pytorch. The torch wheels on PyPI carry their own CUDA runtime,
# cuBLAS and cuDNN (the nvidia-* wheels), and the driver comes from the host through the NVIDIA container toolkit
# (--gpus); a CUDA base image would add a second copy of the same libraries (gigabytes) that torch never loads.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment with the dependencies, and the avepipe wheel --------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Where torch comes from: PyPI's Linux wheels are CUDA builds; https://download.pytorch.org/whl/cu126 (for example)
# gives a build for older drivers.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# The other dependencies, read from pyproject.toml (one list to maintain); a code change does not invalidate this layer.
# triton only serves torch.compile, which avepipe never calls: uninstalled last (~0.9 GB).
COPY pyproject.toml /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip uninstall --yes triton
COPY README.md /src/
COPY avepipe /src/avepipe
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src

# -- runtime ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG APP_UID=1000
ARG BAKE_WEIGHTS=0
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AVEPIPE_WEIGHTS_DIR=/weights \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# The dependencies' layer stays cached (and pulled once) across avepipe releases; avepipe itself is a small layer.
COPY --from=build /opt/venv /opt/venv
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
ENTRYPOINT ["avepipe"]
CMD ["--help"]

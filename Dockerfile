# tlray on the official Ray image: CUDA + Ray 2.60 + Python 3.11, then torch, then tlray.
#   docker build -t registry.example.com/ml/tlray:0.1.0-ray2.60.0-cu128 .
# The Ray image ships no torch: it comes from PyTorch's index for the same CUDA version.
# Layers go from least to most often changed, so editing tlray rebuilds only the last ones.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# The base image's non-root user `ray`, by number: kubelet can only verify `runAsNonRoot` for a
# numeric user, and the manifests run as 1000:100.
USER 1000:100
WORKDIR /home/ray

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

RUN pip install --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# tlray's dependencies from pyproject.toml first (they change rarely), tlray's code last.
COPY --chown=1000:100 pyproject.toml README.md /home/ray/tlray-src/
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('/home/ray/tlray-src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --chown=1000:100 tlray /home/ray/tlray-src/tlray
RUN pip install --no-deps "/home/ray/tlray-src" \
    && tlray --help > /dev/null

# tlray on the official Ray image (Ray 2.60, Python 3.11), then torch with its own CUDA, then tlray.
#   docker build -t registry.example.com/ml/tlray:0.1.0-ray2.60.0-cu128 .
#
# The CPU Ray image, also for GPU nodes: PyTorch's CUDA wheels bundle the CUDA runtime, cuBLAS, cuDNN
# and NCCL (the nvidia-* packages: 3.2 GB beside torch's 1.2 GB in a venv of this project) and need only
# the NVIDIA driver, which the GPU node's container runtime mounts into any image. Ray's -cu* images are
# built on NVIDIA's CUDA devel images, a second CUDA that torch never loads, pulled onto every node. They
# also set NVIDIA_VISIBLE_DEVICES=all, which can hand every GPU of a node to pods that asked for none.
#
# The base is named by tag; RAY_DIGEST, when set, pins it by digest as well (FROM ...-cpu@sha256:...).
# It ships empty: no registry is reachable where this file is tested. To pin it (needs a registry):
#   sed -i "s|^ARG RAY_DIGEST=.*|ARG RAY_DIGEST=$(crane digest rayproject/ray:2.60.0-py311-cpu)|" Dockerfile
# or per build: docker build --build-arg RAY_DIGEST=sha256:... .
# CPU architecture: linux/amd64 only. The rayproject/ray tag above is x86_64 (Ray publishes aarch64
# images under separate -aarch64 tags), and the torch index below is for x86_64.
# tests/unit/k8s/test_dockerfile.py checks its form, and that these versions agree with pyproject.toml.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG RAY_DIGEST=
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu${RAY_DIGEST:+@${RAY_DIGEST}}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The base image's non-root user `ray`, by number: kubelet can only verify `runAsNonRoot` for a
# numeric user, and the manifests run as 1000:100.
USER 1000:100
WORKDIR /home/ray

# The driver libraries GPU pods need from the node (libcuda, NVML for Ray's GPU detection); which GPUs
# a pod sees stays the device plugin's choice.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Layers from least to most often changed: torch, then tlray's dependencies, then tlray itself.
RUN pip install --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# tlray's dependencies from pyproject.toml, held to the Ray, torch and torchvision already installed:
# otherwise a range in pyproject.toml could swap in another torch build (another CUDA) from PyPI.
# MLflow tracking (`tracking.mlflow`) needs nothing here: tlray's client is the standard library on MLflow's
# REST API (tlray/io/mlflow.py); the `mlflow` package is a dev extra, for the tests' tracking server.
COPY --chown=1000:100 pyproject.toml /home/ray/tlray-src/
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('/home/ray/tlray-src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip list --format=freeze | grep -iE '^(ray|torch|torchvision)==' > /tmp/constraints.txt \
    && pip install -r /tmp/requirements.txt --constraint /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt

# README.md is the package's long description: only this layer needs it, so editing it rebuilds only this.
COPY --chown=1000:100 README.md /home/ray/tlray-src/
COPY --chown=1000:100 tlray /home/ray/tlray-src/tlray
RUN pip install --no-deps "/home/ray/tlray-src" \
    && tlray --help > /dev/null

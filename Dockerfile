# One image for the gRPC front end and the workers (compose.yaml picks the command).
#
#   docker build -t unmask:cpu .                                                  # CPU torch
#   docker build -t unmask:gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .  # CUDA
#   docker build -t unmask:cpu --build-arg BASE_IMAGE=unmask-local/python:3.11 .   # no Docker Hub
#
# Works on python:3.11-slim and on a plain Debian image with python3.11 and its venv module
# (scripts/docker-local-base.sh): everything goes into a virtual environment, /opt/unmask.
# A wheelhouse: wheels in build/wheelhouse/ are preferred to downloads (scripts/compose-up-local.sh
# puts the build machine's CPU torch wheel there). The final stage holds the base image and the
# virtual environment only (dependencies, then unmask): no sources, wheels, caches or compilers.
#
# The front end never imports torch; it is installed because workers and the embedded mode
# need it. The shipped model (src/unmask/assets/model) is part of the package.
ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment with torch, the dependencies and unmask --------------------
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/unmask/bin:$PATH

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# a torch wheel in the wheelhouse matching this is installed instead of TORCH_INDEX_URL's
# ("none": never; the GPU worker's build says so)
ARG TORCH_WHEEL=torch-*+cpu-cp311-*.whl
# where every other package comes from, and pip's CA bundle (a path inside the build, e.g.
# /wheelhouse/ca-certificates.crt, behind a TLS-inspecting proxy); empty = pip's defaults
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT=

RUN python3 -m venv /opt/unmask

# build/wheelhouse/ is optional: globs that match nothing (no build/ at all in a fresh clone) are
# allowed because the second source (small, rarely changed) always exists; the torch layer below
# stays cached while the code changes
COPY buil[d]/wheelhouse* src/unmask/v1/__init__.py /wheelhouse/

# torch first, in its own layer: it is large and changes rarely. A torch wheel from the
# wheelhouse is used as it is (its own requirements come from PIP_INDEX_URL).
RUN [ -n "${PIP_CERT}" ] || unset PIP_CERT; \
    wheel=$(ls /wheelhouse/${TORCH_WHEEL} 2>/dev/null | tail -n 1); \
    if [ -n "${wheel}" ]; then \
        pip install --find-links /wheelhouse "${TORCH_SPEC}" "${wheel}"; \
    else \
        pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"; \
    fi

# the dependencies next, from pyproject.toml alone (cached while only the code changes); torch's
# C++ headers (no C++ extensions or torch.compile here) and C++ test binaries go (~150 MB)
WORKDIR /src
COPY pyproject.toml ./
RUN [ -n "${PIP_CERT}" ] || unset PIP_CERT; \
    python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" >requirements.txt \
 && pip install --find-links /wheelhouse -r requirements.txt \
 && rm -rf /opt/unmask/lib/python3.11/site-packages/torch/include \
           /opt/unmask/lib/python3.11/site-packages/torch/test

# unmask itself, into a tree of its own laid out like the virtual environment: the image adds it
# as a small layer of its own on top of the (cached) dependencies
COPY README.md ./
COPY src ./src
COPY tokenizers ./tokenizers
COPY models ./models
COPY corpus ./corpus
COPY engine ./engine
COPY workers ./workers
COPY service ./service
RUN [ -n "${PIP_CERT}" ] || unset PIP_CERT; \
    pip install --no-deps --target /opt/pkg/lib/python3.11/site-packages . \
 && mv /opt/pkg/lib/python3.11/site-packages/bin /opt/pkg/bin

# ---- the image: the base + the virtual environment --------------------------------------------
FROM ${BASE_IMAGE}

# (scripts/compose-up-local.sh prunes dangling images with this label: earlier builds of unmask)
LABEL org.opencontainers.image.title=unmask

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/unmask/bin:$PATH

RUN useradd --create-home --uid 10001 unmask
COPY --from=build /opt/unmask /opt/unmask
COPY --from=build /opt/pkg/ /opt/unmask/
RUN unmask --help >/dev/null

USER unmask
WORKDIR /home/unmask
EXPOSE 50051
# the embedded default (`unmask serve`, no broker); compose.yaml overrides it per service
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["unmask", "health", "--server", "127.0.0.1:50051"]
CMD ["unmask", "serve"]

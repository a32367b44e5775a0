# One image for the gRPC front end and the workers (compose.yaml picks the command).
#
#   docker build -t unmask:cpu .                                                  # CPU torch
#   docker build -t unmask:gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .  # CUDA
#
# The front end never imports torch; it is installed because workers and the embedded mode
# need it. The shipped model (src/unmask/assets/model) is part of the package.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /app
# torch first, in its own layer: it is large and changes rarely
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

COPY pyproject.toml README.md ./
COPY src ./src
COPY tokenizers ./tokenizers
COPY models ./models
COPY corpus ./corpus
COPY engine ./engine
COPY workers ./workers
COPY service ./service
RUN pip install . && useradd --create-home --uid 10001 unmask

USER unmask
EXPOSE 50051
CMD ["unmask", "serve"]

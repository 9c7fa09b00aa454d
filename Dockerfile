# A serving image for a cloud platform (Vertex AI custom containers, Cloud Run, Kubernetes):
# `cnnmnist serve` on a checkpoint baked into the image. Build from the repository's root with
# the checkpoint (or a base folder of numbered checkpoints) in ./model:
#
#   cnnmnist train --preset fast --out model/1
#   docker build -t cnnmnist-serve .
#   docker run -p 8501:8501 cnnmnist-serve
#
# On Vertex AI the platform sets AIP_HTTP_PORT, AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE, which
# `serve` honours (docs/serving.md). The server answers from the checkpoint's TFLite copy, so
# TensorFlow is not needed to serve; it is installed here because the package depends on it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[serve]'
COPY model /model

# Run as a user without privileges; the checkpoint is read-only to it.
RUN useradd --create-home cnnmnist
USER cnnmnist
# The platform's port when it sets one (AIP_HTTP_PORT: serve then listens on every interface,
# as a container must); 8501 otherwise. Flags on the command line would win over the variable.
ENV AIP_HTTP_PORT=8501
EXPOSE 8501
CMD ["cnnmnist", "serve", "/model"]

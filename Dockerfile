# Serving image for diffops replicas (Ray worker with the project installed).
# The base is pinned by digest; bump it deliberately (docker buildx imagetools inspect python:3.11-slim)
# and pin the new image digest in releases' spec.runtime.image.
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

ARG TORCH_SPEC=torch==2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/diffops
COPY pyproject.toml constraints.txt README.md ./
COPY controller ./controller
COPY serving ./serving
COPY checks ./checks
RUN pip install --no-cache-dir "$TORCH_SPEC" \
 && pip install --no-cache-dir -c constraints.txt .

RUN useradd --create-home --uid 1000 ray
USER ray
# The controller records the digest this image was pulled by; replicas report it back to the dependency check.
ENV DIFFOPS_IMAGE_DIGEST=""
CMD ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1"]

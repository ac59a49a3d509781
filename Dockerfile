# The image the Helm chart runs (k8s/stagecoach): Ray's GPU image of the Ray version Stagecoach is
# tested with, plus Stagecoach. Build from the repository root:
#   docker build -t <registry>/stagecoach:0.1.0 . && docker push <registry>/stagecoach:0.1.0
# The RAY_VERSION must equal the chart's rayVersion (a test checks both against the tested Ray).
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

WORKDIR /home/ray/stagecoach
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users . ./
# Ray is already in the image at the pinned version; pip adds torch (CUDA wheels from PyPI), gRPC and the rest.
RUN pip install --no-cache-dir . && stagecoach --help >/dev/null

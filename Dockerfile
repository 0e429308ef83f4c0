# ghnq-deploy in a container: `docker build -t ghnq-deploy .`
# then e.g. `docker run --rm -v "$PWD:/work" ghnq-deploy arch show /opt/ghnq-deploy/examples/resnet20.json`
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/ghnq-deploy

# torch first and on its own layer: it is the big, rarely changing part. The CPU wheel index
# keeps the image small; the pins are the ones in pyproject.toml.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY ghnq_deploy ./ghnq_deploy
RUN pip install .

# Example architectures and target descriptions, for `arch show` and `verify` inside the container.
COPY examples ./examples
COPY targets ./targets

WORKDIR /work
ENTRYPOINT ["ghnq-deploy"]
CMD ["--help"]

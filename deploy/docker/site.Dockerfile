# syntax=docker/dockerfile:1
# The Baton site agent: dials out to the coordinator, trains on local data, listens on nothing.
#   docker build -f deploy/docker/site.Dockerfile -t baton-site .
# CPU torch by default; for CUDA wheels:
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY protocols protocols
COPY coordinator coordinator
COPY site_agent site_agent
COPY ordering ordering
RUN python -m venv /opt/baton \
    && /opt/baton/bin/pip install --no-cache-dir --constraint constraints.txt \
       --extra-index-url "${TORCH_INDEX}" '.[site]'

# The final image: the interpreter and the virtual environment, no compiler, no pip cache.
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 baton \
    && useradd --system --uid 10001 --gid baton --home-dir /var/lib/baton --shell /usr/sbin/nologin baton \
    && mkdir -p /var/lib/baton/kit /var/lib/baton/data /etc/baton \
    && chown -R baton:baton /var/lib/baton
COPY --from=build /opt/baton /opt/baton
ENV PATH=/opt/baton/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface
USER baton:baton
WORKDIR /var/lib/baton
VOLUME ["/var/lib/baton/data"]
# No EXPOSE: the agent only dials out.
ENTRYPOINT ["baton-site"]
CMD ["serve", "--config", "/etc/baton/site.toml"]

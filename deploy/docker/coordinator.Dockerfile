# syntax=docker/dockerfile:1
# The Baton coordinator: gRPC (mTLS) for sites and admins; never torch.
#   docker build -f deploy/docker/coordinator.Dockerfile -t baton-coordinator .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY protocols protocols
COPY coordinator coordinator
COPY site_agent site_agent
COPY ordering ordering
RUN python -m venv /opt/baton \
    && /opt/baton/bin/pip install --no-cache-dir --constraint constraints.txt '.[coordinator,postgres]'

# The final image: the interpreter and the virtual environment, no compiler, no pip cache.
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 baton \
    && useradd --system --uid 10001 --gid baton --home-dir /var/lib/baton --shell /usr/sbin/nologin baton \
    && mkdir -p /var/lib/baton/kit /var/lib/baton/state /etc/baton \
    && chown -R baton:baton /var/lib/baton
COPY --from=build /opt/baton /opt/baton
ENV PATH=/opt/baton/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=131072
USER baton:baton
WORKDIR /var/lib/baton
VOLUME ["/var/lib/baton/state"]
# 50051: gRPC for sites and admins.
EXPOSE 50051
ENTRYPOINT ["baton"]
CMD ["coordinator", "serve", "--config", "/etc/baton/coordinator.toml"]

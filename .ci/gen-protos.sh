#!/usr/bin/env bash
# Regenerates the protobuf/gRPC stubs under protocols/v1 from the .proto sources.
# Run from anywhere; protoc runs from the repo root so imports read protocols.v1.x_pb2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"
"$PY" -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  protocols/v1/*.proto

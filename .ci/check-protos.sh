#!/usr/bin/env bash
# Fails when the committed stubs differ from what the .proto sources generate.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cp protocols/v1/*_pb2*.py* "$tmp"/
bash .ci/gen-protos.sh
for f in "$tmp"/*; do
  if ! cmp -s "$f" "protocols/v1/$(basename "$f")"; then
    echo "protocols/v1/$(basename "$f") is stale: run 'make proto' and commit" >&2
    cp "$tmp"/* protocols/v1/
    exit 1
  fi
done
echo "protobuf stubs are up to date"

#!/usr/bin/env bash
# Builds an offline wheelhouse: every wheel a site agent needs, with SHA256SUMS, then proves that
# it installs with no index at all (pip's resolver, --no-index --dry-run).
#
#   deploy/wheelhouse.sh OUT_DIR [EXTRA]        (EXTRA: site by default; site,postgres ...)
#
# TORCH_INDEX: the index torch comes from. Default: PyTorch's CPU wheels. For CUDA wheels give the
# CUDA index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126 (and lift the torch pin in
# constraints.txt to the matching +cuXXX build if needed). TORCH_INDEX= (empty) uses only pip's
# configured indexes. PYTHON: the interpreter the sites run (its version and platform decide the
# wheels). The hospital then runs:
#   python3 -m venv /opt/baton && /opt/baton/bin/pip install --no-index --find-links OUT_DIR 'baton-fl[site]'
set -euo pipefail
out=${1:?usage: deploy/wheelhouse.sh OUT_DIR [EXTRA]}
extra=${2:-site}
python=${PYTHON:-python3}
torch_index=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
root=$(cd "$(dirname "$0")/.." && pwd)

index_args=()
if [[ -n "$torch_index" ]]; then
    index_args=(--extra-index-url "$torch_index")
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Build from a clean copy: no build/ or *.egg-info left in the checkout.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar --exclude=__pycache__ -C "$root" -cf - pyproject.toml README.md protocols coordinator \
    site_agent ordering | tar -C "$src" -xf -
"$python" -m pip wheel --quiet --wheel-dir "$out" --constraint "$root/constraints.txt" \
    "${index_args[@]}" "$src[$extra]"
(cd "$out" && rm -f SHA256SUMS && sha256sum -- *.whl > SHA256SUMS)
# The proof: resolve the whole extra from this folder alone, as the hospital's pip will.
"$python" -m pip install --quiet --dry-run --ignore-installed --no-index --find-links "$out" \
    --report "$out/resolution.json" "baton-fl[$extra]"
echo "wheelhouse: $out ($(ls "$out"/*.whl | wc -l) wheels, SHA256SUMS, resolution.json)"

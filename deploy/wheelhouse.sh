#!/usr/bin/env bash
# Builds an offline wheelhouse: every wheel a site agent needs, with SHA256SUMS, then proves that
# it installs with no index at all (pip's resolver: --no-index --dry-run, every pip configuration
# file and PIP_* variable ignored, so nothing outside the folder can fill a gap).
#
#   deploy/wheelhouse.sh OUT_DIR [EXTRA]          build (EXTRA: site by default; site,postgres ...)
#   deploy/wheelhouse.sh --verify OUT_DIR [EXTRA] only check checksums and offline resolution
#
# TORCH_INDEX: the index torch comes from. Default: PyTorch's CPU wheels. For CUDA wheels give the
# CUDA index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126 (and lift the torch pin in
# constraints.txt to the matching +cuXXX build if needed). TORCH_INDEX= (empty) uses only pip's
# configured indexes. PYTHON: the interpreter the sites run (its version and platform decide the
# wheels). The hospital then runs:
#   cd OUT_DIR && sha256sum -c SHA256SUMS
#   python3 -m venv /opt/baton && /opt/baton/bin/pip install --no-index --find-links OUT_DIR 'baton-fl[site]'
set -euo pipefail
python=${PYTHON:-python3}

verify() {
    local out=$1 extra=$2
    (cd "$out" && sha256sum --quiet --strict --check SHA256SUMS)
    PIP_CONFIG_FILE=/dev/null "$python" -m pip --isolated install --quiet --dry-run \
        --ignore-installed --no-index --find-links "$out" --report "$out/resolution.json" \
        "baton-fl[$extra]"
}

if [[ ${1:-} == --verify ]]; then
    verify "${2:?usage: deploy/wheelhouse.sh --verify OUT_DIR [EXTRA]}" "${3:-site}"
    echo "wheelhouse verified: $2"
    exit 0
fi
out=${1:?usage: deploy/wheelhouse.sh OUT_DIR [EXTRA]}
extra=${2:-site}
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
verify "$out" "$extra"
echo "wheelhouse: $out ($(ls "$out"/*.whl | wc -l) wheels, SHA256SUMS, resolution.json)"

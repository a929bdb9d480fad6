#!/usr/bin/env bash
# The device check: the cuda tests and the GPU measurements, on a bare GPU machine with PyTorch.
#
#   bash benchmarks/device_check.sh                       # on the GPU machine (wheels in .whl/)
#   bash benchmarks/device_check.sh --dry                 # here, on CPU: inputs and tiny sizes
#   bash benchmarks/device_check.sh --fetch-wheels .whl   # here, with network: the wheels to carry
#
# Output goes under $OUT (default ./device_out); the last line printed is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
# Missing from the GPU image's PyTorch 2.11 environment (KINDS.md lists what it holds; pytest,
# pytest-timeout, pluggy, iniconfig, packaging and typing-extensions are there already).
NAMES=(pydantic pydantic-core annotated-types typing-inspection tomli-w)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    dir=${2:?usage: --fetch-wheels DIR}
    # The versions installed here, so that what the suite passed with is what travels.
    pins=()
    for name in "${NAMES[@]}"; do
        pins+=("$name==$(python3 -m pip show "$name" | sed -n 's/^Version: //p')")
    done
    for py in 3.10 3.11 3.12; do
        python3 -m pip download --no-deps --only-binary=:all: --python-version "$py" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$dir" "${pins[@]}"
    done
    ls "$dir"
    exit 0
fi

dry=()
[[ "${1:-}" == "--dry" ]] && dry=(--dry)
export OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# Inputs first, so a lease is never spent on a run that cannot start.
python3 -c "import torch" || { echo "device_check: python3 cannot import torch" >&2; exit 2; }
if [[ ${#dry[@]} -eq 0 ]]; then
    python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" ||
        { echo "device_check: torch sees no CUDA device (use --dry on CPU)" >&2; exit 2; }
    if ! python3 -c "import pydantic, tomli_w" 2>/dev/null; then
        tag=$(python3 -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
        ls "$WHEELS"/pydantic_core-*-"$tag"-*.whl >/dev/null 2>&1 ||
            { echo "device_check: no $tag wheels in $WHEELS/ (fetch them with --fetch-wheels $WHEELS and carry it)" >&2; exit 2; }
        # One wheel per name: the one built for this Python, or the pure-Python one.
        picks=()
        for whl in "$WHEELS"/*.whl; do
            case "$whl" in *-cp3*-cp3*-*) [[ "$whl" == *"-$tag-"* ]] || continue ;; esac
            picks+=("$whl")
        done
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "${picks[@]}"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
# The project itself without dependencies: the source tree on the path, nothing installed.
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
exec python3 benchmarks/device_check.py "${dry[@]}"

#!/usr/bin/env bash
# Build the project's virtual environment: torch 2.4 + fairchem-core 1.10 + the compiled
# PyG extensions fairchem 1.10 imports (torch-scatter, torch-sparse, torch-cluster).
# Idempotent: a second run with unchanged pyproject.toml returns at once.
#   LEIGNN_VENV  where the venv lives (default: <repo>/.venv)
#   PYTHON       interpreter to build it from (default: python3.11, else python3)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LEIGNN_VENV:-$ROOT/.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP="$VENV/.leignn_setup_stamp"
WANT=$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "[setup] $VENV is up to date"
    exit 0
fi

echo "[setup] creating $VENV with $PY"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -U pip wheel setuptools

echo "[setup] torch 2.4.1 (PyPI build; runs on CPU and CUDA)"
"${PIP[@]}" install -q "torch==2.4.1" "numpy<2" "scipy<1.15"

EXT=("torch-scatter==2.1.2" "torch-sparse==0.6.18" "torch-cluster==1.6.3")
if ! "$VENV/bin/python" -c "import torch_scatter, torch_sparse, torch_cluster" 2>/dev/null; then
    CU=$("$VENV/bin/python" -c "import torch; v=torch.version.cuda; print('cu'+v.replace('.','') if v else 'cpu')")
    echo "[setup] PyG extensions: trying prebuilt wheels (torch-2.4.0+$CU), else building from source (~15 min on 2 cores)"
    if ! "${PIP[@]}" install -q --only-binary=:all: --timeout 10 --retries 0 \
            -f "https://data.pyg.org/whl/torch-2.4.0+${CU}.html" "${EXT[@]}" 2>/dev/null; then
        export MAX_JOBS=${MAX_JOBS:-$(nproc)}
        "${PIP[@]}" install --no-build-isolation "${EXT[@]}"
    fi
fi

echo "[setup] leignn_ocp and the rest of its dependencies"
"${PIP[@]}" install -q -e "$ROOT[test]"
# mace-torch pins e3nn==0.4.4 while fairchem 1.10 needs e3nn>=0.5: install it without its pins (its other
# dependencies are in pyproject.toml); tests/test_mace.py checks that the MACE row runs on this e3nn
"${PIP[@]}" install -q --no-deps "mace-torch==0.3.16"
"$VENV/bin/python" -c "import leignn_ocp, torch_scatter, torch_sparse, torch_cluster, mace.modules; print('[setup] ok: torch', __import__('torch').__version__)"
echo "$WANT" > "$STAMP"

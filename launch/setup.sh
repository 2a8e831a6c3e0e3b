#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in <checkout>/.venv and installs the
# stack that works with mlet_dist. Re-running it is fast when nothing changed (a stamp file holds
# the hash of this script, pyproject.toml and the device kind).
#
# Why not a plain `pip install -e .`: torchrec's metadata requires the CUDA `fbgemm-gpu`, so pip
# would pull 2.7 GB of CUDA wheels over the CPU kernels and break the import on CPU machines
# (see README "Installation"). torchrec and fbgemm are therefore installed without dependencies,
# followed by torchrec's real needs.
#
# Environment:
#   MLET_VENV      where to create the environment (default: <checkout>/.venv)
#   PYTHON         interpreter used to create it (default: python3; 3.10-3.12)
#   MLET_DEVICE    cpu | cuda  (default: cuda when nvidia-smi lists a GPU, else cpu)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MLET_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0
TORCHX_VERSION=0.7.0

if [[ -z "${MLET_DEVICE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    MLET_DEVICE=cuda
  else
    MLET_DEVICE=cpu
  fi
fi
case "$MLET_DEVICE" in
  cpu) FBGEMM_PKG="fbgemm-gpu-cpu==$FBGEMM_VERSION" ;;
  cuda) FBGEMM_PKG="fbgemm-gpu==$FBGEMM_VERSION" ;;
  *) echo "setup.sh: MLET_DEVICE must be 'cpu' or 'cuda', got '$MLET_DEVICE'" >&2; exit 2 ;;
esac

stamp_value=$( (cat "$ROOT/launch/setup.sh" "$ROOT/pyproject.toml"; echo "$MLET_DEVICE") | sha256sum | cut -d' ' -f1)
stamp_file=$VENV/.mlet_setup_stamp
if [[ -x "$VENV/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_value" ]]; then
  echo "setup.sh: environment $VENV is up to date ($MLET_DEVICE)"
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'; then
  echo "setup.sh: $PYTHON is $("$PYTHON" --version 2>&1); torch $TORCH_VERSION needs Python 3.10-3.12." \
       "Set PYTHON=/path/to/python3.11." >&2
  exit 2
fi

echo "setup.sh: creating/updating $VENV for $MLET_DEVICE (torch $TORCH_VERSION, torchrec $TORCHREC_VERSION)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "torch==$TORCH_VERSION"
"${PIP[@]}" install --no-deps "$FBGEMM_PKG" "torchrec==$TORCHREC_VERSION"
# torchrec's own requirements except fbgemm-gpu, then the rest of the stack.
"${PIP[@]}" install numpy tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath \
  "torchx==$TORCHX_VERSION" "pyarrow>=14" pytest hypothesis ruff matplotlib
"${PIP[@]}" install --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, torchx, pyarrow, mlet_dist" \
  || { echo "setup.sh: import check failed in $VENV" >&2; exit 1; }
echo "$stamp_value" >"$stamp_file"
echo "setup.sh: ready: $VENV ($MLET_DEVICE)"

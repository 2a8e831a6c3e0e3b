#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in <checkout>/.venv and installs the
# stack that works with mlet_dist. Re-running it is fast when nothing changed (a stamp file holds
# the hash of this script, pyproject.toml and the device kind).
#
# Why not a plain `pip install -e .`: torchrec's metadata requires the CUDA `fbgemm-gpu`, so pip
# would pull 2.7 GB of CUDA wheels over the CPU kernels and break the import on CPU machines
# (see docs/operations.md#installation). torchrec and fbgemm are therefore installed without dependencies,
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
# The CUDA wheels: PyPI's torch 2.13.0 Linux wheel is the CUDA 13.0 build (it requires
# cuda-toolkit 13.0.3 and the nvidia-*-cu13 runtime wheels), and PyPI's fbgemm-gpu 1.8.0
# (cp310-cp312 manylinux_2_28 wheels, ~495 MB, 2.8 GB unpacked) is built for the same CUDA 13 (it
# links libcudart.so.13): both from PyPI, they match. CUDA 13 needs an NVIDIA driver >= 580. A
# CPU-only torch (a local "+cpu" wheel or index shadowing PyPI) cannot load the CUDA fbgemm-gpu:
# that is refused below before fbgemm is installed. (Resolved and inspected 2026-11-30; see docs/operations.md#installation.)
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
if [[ "$MLET_DEVICE" == cuda ]] && ! "$VENV/bin/python" -W ignore -c 'import sys, torch; sys.exit(not torch.version.cuda)'; then
  echo "setup.sh: MLET_DEVICE=cuda but the torch installed in $VENV is a CPU-only build" \
       "($("$VENV/bin/python" -W ignore -c 'import torch; print(torch.__version__)')): a local wheel or index" \
       "shadows PyPI's CUDA build. Install PyPI's without pip's configuration (PIP_CONFIG_FILE=/dev/null" \
       "$VENV/bin/python -m pip install --isolated --force-reinstall torch==$TORCH_VERSION)," \
       "then run setup.sh again." >&2
  exit 1
fi
"${PIP[@]}" install --no-deps "$FBGEMM_PKG" "torchrec==$TORCHREC_VERSION"
# torchrec's own requirements except fbgemm-gpu, then the rest of the stack.
"${PIP[@]}" install numpy tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath \
  "torchx==$TORCHX_VERSION" "pyarrow>=14" tensorboard "aiohttp>=3.9" pytest hypothesis ruff matplotlib import-linter
"${PIP[@]}" install --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, torchx, pyarrow, tensorboard, aiohttp, mlet_dist" \
  || { echo "setup.sh: import check failed in $VENV" >&2; exit 1; }
echo "$stamp_value" >"$stamp_file"
echo "setup.sh: ready: $VENV ($MLET_DEVICE)"

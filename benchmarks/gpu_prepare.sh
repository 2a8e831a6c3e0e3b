#!/usr/bin/env bash
# Prepares, HERE (a machine with PyPI), the TorchRec stack that benchmarks/gpu_check.sh installs on
# the offline GPU machine (../shared/docs/GPU.md: Python 3.12, torch 2.11.0+cu130, no TorchRec, no
# fbgemm-gpu, no network, at most 64 MiB carried per call).
#
#   bash benchmarks/gpu_prepare.sh             # download, pack, split into .gpuwhl/parts/
#   bash benchmarks/gpu_prepare.sh --dry-run   # only resolve the wheels for cp312 (pip's report)
#
# Steps:
#  1. pip download (no dependencies, cp312 manylinux wheels) into .gpuwhl/wheels/: fbgemm-gpu 1.6.0
#     (the CUDA 13 build matching torch 2.11, 465 MB) and torchrec 1.6.1 with the pure-Python needs
#     the GPU image lacks: tensordict, pyvers, torchmetrics 1.0.3 (torchrec's pin; the image has
#     1.9.0), iopath. The image already has numpy, tqdm, pyre-extensions, portalocker, cloudpickle,
#     lightning-utilities, packaging, pyarrow and pytest (../shared/docs and the device KINDS list).
#  2. pip install --no-deps --target .gpuwhl/build/site: the tree `pip install --target` makes.
#  3. tar | xz -6 into .gpuwhl/mlet_gpu_stack.tar.xz (the wheel is deflate; xz of the 2.4 GB
#     tree is ~176 MB, 4.3 min on 2 cores as measured 2026-11-30).
#  4. python -m benchmarks.gpu_bundle split: parts of MLET_PART_MIB (default 55) MiB in
#     .gpuwhl/parts/ with SHA256SUMS (the archive's and each part's sha256).
# .gpuwhl/ is git-ignored; nothing here is committed.
#
# Environment: PYTHON (python3, any version: pip is told the target is cp312), MLET_PART_MIB (55),
#   MLET_GPUWHL (output folder, default <checkout>/.gpuwhl), MLET_GPU_FBGEMM (the fbgemm
#   requirement, default fbgemm-gpu==1.6.0; fbgemm-gpu-cpu==1.6.0 makes a small CPU rehearsal
#   bundle that exercises every step in a minute).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
PART_MIB=${MLET_PART_MIB:-55}
DEST=${MLET_GPUWHL:-$ROOT/.gpuwhl}
FBGEMM=${MLET_GPU_FBGEMM:-fbgemm-gpu==1.6.0}
ARCHIVE_NAME=mlet_gpu_stack.tar.xz
PACKAGES=(
  "$FBGEMM"
  "torchrec==1.6.1"
  "tensordict==0.15.3"
  "pyvers==0.2.3"
  "torchmetrics==1.0.3"
  "iopath==0.1.9"
)
# cp312 wheels for x86-64 Linux, whatever this machine's Python is.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "gpu_prepare.sh: unknown argument '$1'; use --dry-run or nothing" >&2; exit 2 ;;
esac

if [[ "$DEST" == "$ROOT/.gpuwhl" ]] && ! git check-ignore -q .gpuwhl/x; then
  echo "gpu_prepare.sh: .gpuwhl/ is not git-ignored; add '/.gpuwhl/' to .gitignore first" >&2
  exit 2
fi
PIP=("$PYTHON" -m pip --disable-pip-version-check)

if (( DRY_RUN )); then
  # pip (23.x) fetches each wheel to read its metadata even in --dry-run: the big one too.
  mkdir -p "$DEST"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "${PIP[@]}" install --dry-run --ignore-installed --no-deps --target "$tmp/t" "${TARGET[@]}" \
    --report "$DEST/resolve.json" "${PACKAGES[@]}"
  "$PYTHON" - "$DEST/resolve.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
for item in report["install"]:
    meta, info = item["metadata"], item["download_info"]
    needs = [r for r in meta.get("requires_dist", []) if "extra ==" not in r]
    print(f"{meta['name']}=={meta['version']}  {info['url'].rsplit('/', 1)[-1]}  "
          f"{info.get('archive_info', {}).get('hash', '')}\n    requires: {', '.join(needs) or '-'}")
EOF
  echo "gpu_prepare.sh: dry run resolved ${#PACKAGES[@]} wheels; report in $DEST/resolve.json"
  exit 0
fi

mkdir -p "$DEST/wheels"
echo "gpu_prepare.sh: downloading ${PACKAGES[*]} (cp312) into $DEST/wheels"
"${PIP[@]}" download --no-deps "${TARGET[@]}" -d "$DEST/wheels" "${PACKAGES[@]}"
# Exactly one wheel per package (an earlier run with other versions must not slip in).
wheels=()
for spec in "${PACKAGES[@]}"; do
  name=${spec%%==*}; version=${spec#*==}
  pattern="${name//-/_}-${version}-*.whl"
  # shellcheck disable=SC2206  # the glob is wanted (no spaces in wheel names)
  found=( "$DEST"/wheels/$pattern )
  if [[ ${#found[@]} -ne 1 || ! -f "${found[0]}" ]]; then
    echo "gpu_prepare.sh: expected one wheel $pattern in $DEST/wheels, found ${found[*]}" >&2
    exit 1
  fi
  wheels+=("${found[0]}")
done

build="$DEST/build"
rm -rf "$build"  # our own staging tree of an earlier run
echo "gpu_prepare.sh: installing into $build/site (pip install --target, no dependencies)"
"${PIP[@]}" install -q --no-deps --no-index --no-compile "${TARGET[@]}" --target "$build/site" \
  "${wheels[@]}"
"$PYTHON" - "$build/site" "${wheels[@]}" >"$build/site/MLET_GPU_STACK.txt" <<'EOF'
import hashlib, sys
from pathlib import Path
print("# wheels of this bundle (made by benchmarks/gpu_prepare.sh): sha256  file")
for w in sys.argv[2:]:
    print(hashlib.sha256(Path(w).read_bytes()).hexdigest(), Path(w).name)
EOF

archive="$DEST/$ARCHIVE_NAME"
echo "gpu_prepare.sh: packing $(du -sh "$build/site" | cut -f1) into $archive (xz -6)"
start=$(date +%s)
tar cf - -C "$build" site | xz -6 -T2 >"$archive.tmp"
mv "$archive.tmp" "$archive"
echo "gpu_prepare.sh: $(du -h "$archive" | cut -f1) in $(( $(date +%s) - start )) s"
"$PYTHON" -m benchmarks.gpu_bundle split --archive "$archive" --parts-dir "$DEST/parts" \
  --part-mib "$PART_MIB"
echo "gpu_prepare.sh: ready. Carry .gpuwhl/parts/SHA256SUMS with every part; on the GPU machine"
echo "  copy each carried part into /tmp/mlet_parts (one device call per part, back to back),"
echo "  then run 'bash benchmarks/gpu_check.sh' with the last part (see benchmarks/README.md)."

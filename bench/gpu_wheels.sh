#!/usr/bin/env bash
# Build the offline wheel bundle that bench/gpu_check.sh installs on a GPU machine with no network.
#
#   bash bench/gpu_wheels.sh [DEST]        (default: bench/wheels, git-ignored; run from any folder)
#
# Needs pip with access to the package index. The target is the GPU machine's Python: CPython 3.12 on
# manylinux x86_64, whose image already holds torch (2.11 + CUDA), accelerate, tokenizers, safetensors,
# numpy, pandas, pyarrow, typer, rich, PyYAML, jinja2, psutil, ninja, einops, msgpack, py-cpuinfo,
# matplotlib, pytest and transformers 5.17. The project needs transformers >= 5.20, so the bundle carries
# the versions the test suite runs with here (TRL 1.16 itself accepts transformers >= 4.56.2):
#   1. binary wheels for cp312 / manylinux x86_64, each named with its version (no dependency walk: what
#      the image lacks or holds too old is listed explicitly, and the last step prints what the bundle
#      still expects from the machine);
#   2. deepspeed, which the index has as source only: `pip wheel --no-deps` builds a pure-Python wheel
#      (no ops compiled here; DeepSpeed JIT-compiles an op with the machine's nvcc the first time it is used);
#   3. the project's own wheel.
# Left out on purpose: pyarrow (about 40 MB, which would break the 64 MiB a device call may carry; the
# image has one, and datasets' >= 24 pin is checked at install time, with a fallback) and flash-attn
# (the index has its source only, and a build for one arch takes longer than the whole GPU check).
# The bundle is checked before it is kept: every wheel must install on CPython 3.12 manylinux x86_64
# (pip --dry-run with the target's tags), and the total must stay under BUNDLE_LIMIT_MB (default 48, so
# that the working tree plus the bundle stays under the 64 MiB a device call carries).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/bench/wheels}"
PY="${PYTHON:-python3}"
LIMIT_MB="${BUNDLE_LIMIT_MB:-48}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}")

# Versions: the ones the test suite and the CPU bench ran with (see pyproject.toml's train extra).
BINARY=(
    transformers==5.24.0
    trl==1.16.0
    datasets==5.2.0
    peft==0.21.2
    dill==0.4.1
    multiprocess==0.70.19
    fsspec==2026.9.0
    regex==2026.11.19
    pydantic==2.14.4
    pydantic_core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing_extensions==4.16.0
    hjson==3.1.0
)
DEEPSPEED=deepspeed==0.19.8

rm -rf "$DEST"
mkdir -p "$DEST"
echo "== 1/3 binary wheels for CPython 3.12, manylinux x86_64"
"$PY" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "${BINARY[@]}"

echo "== 2/3 $DEEPSPEED from source (pure-Python wheel, ops JIT-compiled on the GPU machine)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$DEST" "$DEEPSPEED"

echo "== 3/3 the project ($ROOT)"
BUILD_TMP="$(mktemp -d)"
trap 'rm -rf "$BUILD_TMP"' EXIT
# Build from a clean copy of the tracked files so no stray build/ or egg-info folder lands in the checkout.
git -C "$ROOT" ls-files -z | (cd "$ROOT" && tar --null -T - -cf - 2>/dev/null) | tar -xf - -C "$BUILD_TMP"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "$BUILD_TMP"

echo "== check: every wheel installs on CPython 3.12 manylinux x86_64"
"$PY" -m pip install -q --dry-run --no-deps --no-index --ignore-installed --only-binary=:all: "${TARGET[@]}" \
    --target "$BUILD_TMP/dry-target" "$DEST"/*.whl

echo "== check: what the bundle expects the machine's image to provide"
"$PY" - "$DEST" <<'EOF'
import sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
bundle, requires = {}, {}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode("utf-8").splitlines()
    name = canonicalize_name(next(l.split(":", 1)[1].strip() for l in lines if l.startswith("Name:")))
    bundle[name] = Version(next(l.split(":", 1)[1].strip() for l in lines if l.startswith("Version:")))
    extras = {"train", "deepspeed"} if name == "spo-align" else set()
    reqs = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
                reqs.append(req)
    requires[name] = reqs
external = {}
for name, reqs in requires.items():
    for req in reqs:
        key = canonicalize_name(req.name)
        if key in bundle:
            if not req.specifier.contains(bundle[key], prereleases=True):
                sys.exit(f"bundle conflict: {name} needs {req}, the bundle has {key} {bundle[key]}")
        else:
            external.setdefault(key, set()).add(str(req.specifier) or "any")
print("from the machine:", ", ".join(f"{k} {' '.join(sorted(v))}" for k, v in sorted(external.items())))
EOF

total_kb=$(du -sk "$DEST" | cut -f1)
ls -1s --block-size=K "$DEST"
echo "bundle: $(ls "$DEST"/*.whl | wc -l) wheels, $((total_kb / 1024)) MiB in $DEST"
if [ $((total_kb / 1024)) -ge "$LIMIT_MB" ]; then
    echo "bundle is over ${LIMIT_MB} MiB: a device call carries 64 MiB with the working tree" >&2
    exit 1
fi

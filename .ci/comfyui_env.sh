#!/usr/bin/env bash
# The real ComfyUI the real-ComfyUI tests (tests/test_comfyui_real.py) run against, installed the way users do it:
#   1. unpack the vendored ComfyUI 0.3.64 (../shared/vendor, beside the checkout) into a cache folder outside the repo;
#   2. give it its own venv: torch==2.14.1 torchvision==0.29.1, then its requirements.txt without the
#      torch/torchvision/torchaudio lines, plus requests;
#   3. put this pack under ComfyUI/custom_nodes/ComfyUI-PixArt-Delta and `pip install -r requirements.txt` in that venv
#      (README "Install in ComfyUI"), then check that this left ComfyUI's torch and torchvision as they were;
#   4. Debian's chromium and the playwright Python driver for the page test (never `playwright install`).
# Steps 1-2 are reused while their inputs (tarball name, both requirements files, the torch pins, this recipe) are
# unchanged; step 3 runs every time, so the pack tested is the working tree's.
#
# Prints `export NAME=value` lines on stdout (everything else goes to stderr). By hand:
#   eval "$(bash .ci/comfyui_env.sh)" && python -m pytest -q tests
# Knobs: PIXART_CI_CACHE (default ~/.cache/pixart-delta-ci), PIXART_COMFYUI_TARBALL, PIXART_TEST_OUT (default out/).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARBALL=${PIXART_COMFYUI_TARBALL:-$REPO/../shared/vendor/ComfyUI-0.3.64-a125cd8.tar.gz}
CACHE=${PIXART_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pixart-delta-ci}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
BASE_PYTHON=${PIXART_COMFYUI_BASE_PYTHON:-python3}   # cp311: the torch 2.14.1 wheel on this machine's disk
TEST_PYTHON=${PIXART_TEST_PYTHON:-python}           # the interpreter pytest runs in (gets the playwright driver)
PLAYWRIGHT_PIN=$(grep -E '^playwright==' "$REPO/requirements-dev.txt" || echo playwright)
RECIPE=3   # bump when the steps below change
PACK_NAME=ComfyUI-PixArt-Delta

log() { echo "[comfyui_env] $*" >&2; }
die() { echo "[comfyui_env] ERROR: $*" >&2; exit 1; }
pipq() { "$@" --quiet --disable-pip-version-check --no-input; }

[ -f "$TARBALL" ] || die "ComfyUI tarball not found: $TARBALL (expected ../shared/vendor beside the checkout)"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------------------------------------- the cache key
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
tar -xzf "$TARBALL" -C "$scratch" ComfyUI/requirements.txt
comfy_requirements=$(grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*$' "$scratch/ComfyUI/requirements.txt")
base_version=$("$BASE_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$( {
  echo "recipe $RECIPE"; basename "$TARBALL"; echo "python $base_version"; echo "${TORCH_PINS[*]}"
  echo "$comfy_requirements"; cat "$REPO/requirements.txt"
} | sha256sum | cut -c1-16)
HOME_DIR="$CACHE/comfyui-$key"
COMFY="$HOME_DIR/ComfyUI"
VENV="$HOME_DIR/venv"
VPY="$VENV/bin/python"

# ---------------------------------------------------------------------------------------------- 1-2: ComfyUI + venv
if [ -f "$HOME_DIR/.ready" ]; then
  log "reusing $HOME_DIR"
else
  start=$SECONDS
  for old in "$CACHE"/comfyui-*; do [ -e "$old" ] && [ "$old" != "$HOME_DIR" ] && { log "removing stale $old"; rm -rf "$old"; }; done
  rm -rf "$HOME_DIR"
  mkdir -p "$HOME_DIR"
  log "unpacking $(basename "$TARBALL") into $HOME_DIR"
  tar -xzf "$TARBALL" -C "$HOME_DIR"
  [ -f "$COMFY/main.py" ] || die "$TARBALL did not unpack to ComfyUI/main.py"
  log "venv with python $base_version; ${TORCH_PINS[*]} (a CUDA build: its nvidia wheels come along, several GB)"
  "$BASE_PYTHON" -m venv "$VENV"
  pipq "$VPY" -m pip install "${TORCH_PINS[@]}"
  echo "$comfy_requirements" > "$HOME_DIR/comfyui-requirements.txt"
  log "ComfyUI's requirements.txt without torch/torchvision/torchaudio, plus requests"
  pipq "$VPY" -m pip install -r "$HOME_DIR/comfyui-requirements.txt" requests
  touch "$HOME_DIR/.ready"
  log "ComfyUI environment built in $((SECONDS - start)) s"
fi

torch_versions() { "$VPY" -m pip list --disable-pip-version-check 2>/dev/null | grep -i -E '^(torch|torchvision) ' | tr -s ' '; }
before=$(torch_versions)
[ -n "$before" ] || die "no torch in $VENV"

# ---------------------------------------------------------------------------------------------- 3: the pack, as README says
start=$SECONDS
PACK="$COMFY/custom_nodes/$PACK_NAME"
rm -rf "$PACK"
mkdir -p "$PACK"
# what a clone of this working tree holds: tracked and new files, nothing ignored (no out/, no caches)
"$BASE_PYTHON" - "$REPO" "$PACK" <<'PY'
import os, shutil, subprocess, sys
repo, pack = sys.argv[1:3]
try:
    listed = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
except (OSError, subprocess.CalledProcessError):
    listed = [os.path.relpath(os.path.join(d, f), repo) for d, dirs, files in os.walk(repo)
              for f in files if ".git" not in d.split(os.sep) and "__pycache__" not in d]
for rel in filter(None, listed):
    src = os.path.join(repo, rel)
    if os.path.isfile(src):
        os.makedirs(os.path.dirname(os.path.join(pack, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(pack, rel))
PY
log "pip install -r $PACK_NAME/requirements.txt in ComfyUI's venv"
(cd "$COMFY/custom_nodes" && pipq "$VPY" -m pip install -r "$PACK_NAME/requirements.txt")
after=$(torch_versions)
if [ "$before" != "$after" ]; then
  die "installing the pack changed ComfyUI's torch: before [$before], after [$after]"
fi
log "pack installed in $((SECONDS - start)) s; ComfyUI keeps $(echo "$after" | tr '\n' ' ')"

# ---------------------------------------------------------------------------------------------- 4: browser + driver
if [ ! -x /usr/bin/chromium ]; then
  log "apt-get install chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq chromium >&2
fi
[ -x /usr/bin/chromium ] || die "Debian's chromium did not install (/usr/bin/chromium missing)"
if ! "$TEST_PYTHON" -c "import playwright.sync_api" 2>/dev/null; then
  log "pip install $PLAYWRIGHT_PIN (the Python driver only; the browser is Debian's)"
  pipq "$TEST_PYTHON" -m pip install "$PLAYWRIGHT_PIN"
fi

OUT=${PIXART_TEST_OUT:-$REPO/out}
mkdir -p "$OUT"
printf 'export PIXART_COMFYUI_DIR=%q\n' "$COMFY"
printf 'export PIXART_COMFYUI_PYTHON=%q\n' "$VPY"
printf 'export PIXART_COMFYUI_PACK=%q\n' "$PACK"
printf 'export PIXART_CHROMIUM=%q\n' /usr/bin/chromium
printf 'export PIXART_TEST_OUT=%q\n' "$OUT"

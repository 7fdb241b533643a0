#!/usr/bin/env bash
# Create or repair the project's virtual environment, detectron2 included. Idempotent: on a ready
# environment it checks a stamp and the imports, and returns in seconds.
#
# Environment variables:
#   NUCLEUS_VENV          venv folder (default: .venv)
#   NUCLEUS_PYTHON        interpreter that creates it (default: python3; needs >= 3.9)
#   NUCLEUS_SYSTEM_SITE=1 let the venv see the interpreter's packages, so a detectron2 (and torch) you
#                         built from source there is kept rather than replaced
#   NUCLEUS_CONSTRAINTS   pip constraints file (default: constraints.txt; "none" lets pip choose torch),
#                         e.g. one pinning your cluster's CUDA build of torch
#   NUCLEUS_EXTRAS        extras to install (default: test,export,napari: what `make test` exercises)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NUCLEUS_VENV:-.venv}
PY=${NUCLEUS_PYTHON:-python3}
EXTRAS=${NUCLEUS_EXTRAS:-test,export,napari}
CONSTRAINTS=${NUCLEUS_CONSTRAINTS:-constraints.txt}
WHEELS=build/wheels
say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "no '$PY' on PATH; install Python >= 3.9 or set NUCLEUS_PYTHON=/path/to/python3"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
  || die "$("$PY" --version 2>&1) is too old: nucleus_seg needs Python >= 3.9 (set NUCLEUS_PYTHON)"

stamp_inputs() { cat pyproject.toml scripts/setup_env.sh scripts/build_detectron2_wheel.py; [ "$CONSTRAINTS" = none ] || cat "$CONSTRAINTS"; echo "$EXTRAS"; }
STAMP="$VENV/.nucleus_seg_stamp"
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$VENV/bin/python" -c 'import torch, torchvision, detectron2, nucleus_seg' 2>/dev/null; then
  say "environment $VENV is ready"
  exit 0
fi

# A venv whose interpreter no longer runs (interrupted creation, moved folder, removed Python) is rebuilt.
if [ -d "$VENV" ] && ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  say "$VENV is broken; recreating it"
  rm -rf "$VENV"
fi
if [ ! -d "$VENV" ]; then
  say "creating $VENV with $("$PY" --version 2>&1)"
  flags=()
  [ "${NUCLEUS_SYSTEM_SITE:-0}" = 1 ] && flags+=(--system-site-packages)
  "$PY" -m venv "${flags[@]}" "$VENV" || die "could not create a venv (Debian/Ubuntu: apt-get install python3-venv)"
fi
VPY="$VENV/bin/python"
pipc=()
[ "$CONSTRAINTS" = none ] || { [ -f "$CONSTRAINTS" ] || die "constraints file $CONSTRAINTS not found"; pipc=(-c "$CONSTRAINTS"); }
pip_install() {
  "$VPY" -m pip install --disable-pip-version-check "$@" \
    || die "pip install $* failed. No route to the package index? Offline machines: build a wheelhouse with scripts/wheelhouse.sh elsewhere and install from it (README, 'Air-gapped GPU nodes')"
}
# Old pips cannot read the wheel's metadata version; setuptools<81 keeps pkg_resources for detectron2.
pip_install -q --upgrade "pip>=23" "setuptools<81" wheel

if "$VPY" -c 'import torch, torchvision' 2>/dev/null; then
  say "keeping torch $("$VPY" -c 'import torch; print(torch.__version__)')"
else
  say "installing torch and torchvision (a few GB on first run)"
  pip_install -q "${pipc[@]}" torch torchvision
fi

if "$VPY" -c 'import detectron2' 2>/dev/null; then
  say "keeping detectron2 $("$VPY" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))')"
else
  say "building a pure-Python detectron2 wheel from sal-detectron2==0.7.2"
  "$VPY" scripts/build_detectron2_wheel.py --out "$WHEELS" >/dev/null
  pip_install -q "${pipc[@]}" --find-links "$WHEELS" "detectron2==0.7.2+pure"
fi

# napari's canvas needs OpenGL, which Qt's offscreen platform (the tests') gets only through an X server: the
# tests start a virtual one (Xvfb) when there is no display. Installed here where we may (root, Debian).
if [[ ",$EXTRAS," == *,napari,* ]] && ! command -v Xvfb >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's xvfb (virtual X server for the napari tests)"
    { apt-get install -y -q xvfb >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q xvfb >/dev/null; }; } \
      || say "warning: could not install xvfb; the napari viewer tests will be skipped"
  else
    say "note: no Xvfb (Debian: apt-get install xvfb); the napari viewer tests will be skipped"
  fi
fi

say "installing nucleus_seg (editable) with extras [$EXTRAS]"
pip_install -q "${pipc[@]}" --find-links "$WHEELS" -e ".[$EXTRAS]"
"$VPY" -c 'import torch, torchvision, detectron2, nucleus_seg' \
  || die "imports fail after installation; remove $VENV and rerun"
echo "$want" > "$STAMP"
say "ready: $("$VPY" -m nucleus_seg --version | tr '\n' ' ')"

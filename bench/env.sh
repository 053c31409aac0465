#!/usr/bin/env bash
# The benchmark environment bench/step.py runs in: bench/.venv (ignored by git), beside the project's .venv.
#
#     bash bench/env.sh            # once; then: bench/.venv/bin/python bench/step.py
#
# It holds dflashtrain (editable, with its own dependencies) and the peer, SpecForge 0.2.0, installed WITHOUT its
# dependencies (they include sglang and a CUDA torch): its DFlash modules import only torch and transformers'
# Qwen3 modeling, so the peer gets the transformers release it pins (5.8.1) and nothing else. SpecForge is never a
# dependency of dflashtrain. TORCH_SPEC picks the torch build as for `make install` (a CUDA build on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=bench/.venv
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e .
"$VENV/bin/python" -m pip install -q "transformers==5.8.1"
"$VENV/bin/python" -m pip install -q --no-deps "specforge==0.2.0"
"$VENV/bin/python" -c "import specforge.algorithms.common.dflash_family_model, dflashtrain; print('bench env ready')"

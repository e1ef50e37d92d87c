#!/usr/bin/env bash
# `make demo`: the main job on the embedded defaults: `genloop quickstart`.
# It prepares the python-stdlib corpus, trains a tokenizer and a tiny code model, evaluates
# it, quantizes it, gates and promotes it, creates an admin key and serves it with the web
# UI (Ctrl-C stops the server). DEMO_STEPS changes the training length; DEMO_SERVE=0
# stops before serving; DEMO_PORT picks the port.
set -euo pipefail
GL=.venv/bin/genloop
STEPS=${DEMO_STEPS:-300}
SERVE=$([ "${DEMO_SERVE:-1}" = "0" ] && echo --no-serve || echo --serve)
$GL quickstart --steps "$STEPS" "$SERVE" --port "${DEMO_PORT:-8000}"

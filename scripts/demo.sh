#!/usr/bin/env bash
# `make demo`: the main job on the embedded defaults: `genloop quickstart`.
# It prepares the python-stdlib corpus, trains a tokenizer and a small code model, evaluates
# it, quantizes it, gates and promotes it, shows three held-out completions beside the
# untrained model's, creates an admin key and serves it with the web UI (Ctrl-C stops the
# server). A few minutes on 2 CPU cores before serving. DEMO_STEPS changes the
# training length (default: quickstart.yaml's); DEMO_SERVE=0 stops before serving;
# DEMO_PORT picks the port.
set -euo pipefail
GL=.venv/bin/genloop
ARGS=(--port "${DEMO_PORT:-8000}")
[ -n "${DEMO_STEPS:-}" ] && ARGS+=(--steps "$DEMO_STEPS")
[ "${DEMO_SERVE:-1}" = "0" ] && ARGS+=(--no-serve) || ARGS+=(--serve)
$GL quickstart "${ARGS[@]}"

#!/usr/bin/env bash
# `make demo`: the main job on the embedded defaults, as far as the loop is built.
# Every step is a real genloop command a user can run by hand.
set -euo pipefail
GL=.venv/bin/genloop
echo "== 1. create the workspace (catalog + artifact store) at ${GENLOOP_HOME}"
$GL init
echo "== 2. prepare the built-in python-stdlib corpus: clean, dedup, redact, tokenize, pack"
$GL data prepare examples/data-stdlib.yaml
echo "== 3. the same command again: same inputs and config, so the version is reused"
$GL data prepare examples/data-stdlib.yaml
echo "== 4. what the catalog holds"
$GL data list
$GL data show python-stdlib
$GL models list

#!/usr/bin/env bash
# `make demo`: the main job on the embedded defaults, as far as the loop is built.
# Every step is a real genloop command a user can run by hand.
set -euo pipefail
GL=.venv/bin/genloop
CFG=examples/code-lm.yaml
STEPS=${DEMO_STEPS:-300}
echo "== 1. create the workspace (catalog + artifact store) at ${GENLOOP_HOME}"
$GL init
echo "== 2. prepare the built-in python-stdlib corpus: clean, dedup, redact, tokenize, pack"
$GL data prepare $CFG
$GL data show python-stdlib
echo "== 3. train a tiny code model from scratch ($STEPS steps on this machine's CPU)"
$GL train $CFG --set train.max_steps=$STEPS --set train.warmup_steps=$((STEPS / 10))
echo "== 4. evaluate it: perplexity, BLEU/ROUGE on held-out continuations, pass@k on demo tasks"
$GL eval code-lm --config $CFG
echo "== 5. promote it and look at the registry"
$GL models promote code-lm
$GL models list

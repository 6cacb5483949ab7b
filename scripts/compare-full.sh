#!/usr/bin/env bash
# The full comparison of docs/RESULTS.md (`make compare FULL=1`): hours of CPU on a small machine.
# Every `scope compare` resumes (finished rounds are kept), so rerunning this script continues where a
# killed one stopped; the compares that share --name share their arms' runs (a grpo or scope run
# already brought to round 25 is reused, not rerun).
#
#   scripts/compare-full.sh          # tables in $SCOPE_RUNS_DIR (default runs/) <name>-compare/
set -euo pipefail
runs=${SCOPE_RUNS_DIR:-runs}
every=(--rounds 25 --set eval.every=5)  # 100 optimizer updates, eval every 5th round

# 1. The primary comparison: hard preset whose OOD set can move, the six main arms (the default arms of
#    `scope compare`: grpo, grpo-ds, luffy_matched, vppo, scope, scope-model), 5 seeds.
scope compare --config configs/hard-ood.toml --name full --seeds 5 "${every[@]}"

# 2. Ablations of SCOPE on the same preset, 3 seeds, paired with the runs of 1: the advantage computed
#    with rectified rows apart from the group's statistics (grpo_split), and salvaged rows picked at
#    random instead of longest correct prefix first.
scope compare --config configs/hard-ood.toml --name full --seeds 3 "${every[@]}" \
    --algos grpo,scope,scope-split=scope,train.advantage=grpo_split,scope-random=scope,locate.order=random \
    --out "$runs/full-ablations-compare"

# 3. The default preset (3-6 operands), 3 seeds.
scope compare --name full-default --seeds 3 "${every[@]}" --algos grpo,luffy_matched,scope

# 4. The PRM sweep, 3 seeds, paired with the runs of 1: SCOPE with the learned PRM of the preset's base
#    policy (data/prms/arith-tiny-long-prm, held-out F1 0.77) and with the exact PRM made wrong with
#    probability 0.1 / 0.3 / 0.5 (arms scope-noise10/30/50: an arm's name has no dot).
scope compare --config configs/hard-ood.toml --name full --seeds 3 "${every[@]}" \
    --algos grpo,scope,scope-prm-learned=scope,prm.backend=hf,prm.path=data/prms/arith-tiny-long-prm \
    --algos scope-noise10=scope,prm.noise=0.1,scope-noise30=scope,prm.noise=0.3 \
    --algos scope-noise50=scope,prm.noise=0.5 \
    --out "$runs/full-prm-compare"

# 5. The hard preset with arith-tiny (a third of the groups all wrong: the regime rectification is for),
#    3 seeds.
scope compare --config configs/hard.toml --name full-hard --seeds 3 "${every[@]}" \
    --algos grpo,luffy_matched,vppo,scope

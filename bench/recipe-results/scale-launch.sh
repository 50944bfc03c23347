#!/bin/bash
# Issue 23: a late-switch recipe for the ERNIE-shaped child at one budget and seed.
# usage: scale-launch.sh STEPS SEED [FULL_FRACTION] [BASELINES]   (tiny: 1,024 tokens a step)
#   part 4, the budget scan: scale-launch.sh 250 0  (warm80 with retrofit-4x and scratch beside it)
#   the switch at equal all-in FLOPs to retrofit-4x: scale-launch.sh 1400 0 0.714 reference
# Code frozen at commit b401713 (the code of the 1M-token family runs, runs/fam23) plus `run
# --children`, in the worktree /work/scale, so that every run compares the same code. A rerun resumes.
# Recreate it from the repo root (the patch is `run --children`, adapted to that commit):
#   git worktree add --detach /work/scale b401713
#   git -C /work/scale apply "$PWD/bench/recipe-results/scale-worktree.patch"
steps=$1; seed=$2; ff=${3:-0.8}; baselines=${4:-all}
out=/work/main/runs/scale/ff$ff-$steps-s$seed
cd /work/scale
OMP_NUM_THREADS=1 PYTHONPATH=/work/scale /work/main/.venv/bin/python -m elasticmoe run --config tiny \
  --set train.steps=$steps --set train.seed=$seed \
  --set sampling.full_fraction=$ff --set reorder.at_switch=true --set "reorder.at_steps=[]" \
  --children ernie51-shape --baselines $baselines --out $out > $out.log 2>&1

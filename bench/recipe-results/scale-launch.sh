#!/bin/bash
# Issue 23 part 4: the late-switch recipe (warm80), retrofit-4x and from scratch for the ERNIE-shaped
# child at one budget and seed. usage: scale-launch.sh STEPS SEED   (tiny: 1,024 tokens a step)
# Code frozen at commit b401713 (the code of the 1M-token family runs, runs/fam23) plus `run
# --children`, in the worktree /work/scale, so that every budget runs the same code. A rerun resumes.
steps=$1; seed=$2
out=/work/main/runs/scale/warm80-$steps-s$seed
cd /work/scale
OMP_NUM_THREADS=1 PYTHONPATH=/work/scale /work/main/.venv/bin/python -m elasticmoe run --config tiny \
  --set train.steps=$steps --set train.seed=$seed \
  --set sampling.full_fraction=0.8 --set reorder.at_switch=true --set "reorder.at_steps=[]" \
  --children ernie51-shape --baselines all --out $out > $out.log 2>&1

#!/bin/bash
# usage: launch.sh ARM SEED  (code frozen at /work/abl = commit b401713: `git worktree add --detach
# /work/abl b401713`). "default" there is the 30% switch, the default of that commit; at HEAD the
# same schedule is --set sampling.full_fraction=0.3 --set reorder.at_switch=false --set "reorder.at_steps=[250,500]".
arm=$1; seed=$2
case $arm in
  default) extra=() ;;
  warm80) extra=(--set sampling.full_fraction=0.8 --set reorder.at_switch=true --set "reorder.at_steps=[]") ;;
esac
cd /work/abl
OMP_NUM_THREADS=1 PYTHONPATH=/work/abl /work/main/.venv/bin/python -m elasticmoe run --config tiny --set train.seed=$seed "${extra[@]}" --baselines all --out /work/main/runs/fam23/$arm-s$seed > /work/main/runs/fam23/$arm-s$seed.log 2>&1

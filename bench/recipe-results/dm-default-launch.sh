#!/bin/bash
# the default pipeline at commit 7310677 (document mask + level mix [8,4,2,1]; worktree /work/dm2), seed $1, one thread
seed=$1
cd /work/dm2
OMP_NUM_THREADS=1 PYTHONPATH=/work/dm2 /work/main/.venv/bin/python -m elasticmoe run --set train.seed=$seed --out /work/main/runs/dm-s$seed > /work/main/runs/dm-s$seed.log 2>&1

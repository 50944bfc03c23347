#!/bin/bash
# the default pipeline at commit 617472a (worktree /work/def), seed $1, one thread
seed=$1
cd /work/def
OMP_NUM_THREADS=1 PYTHONPATH=/work/def /work/main/.venv/bin/python -m elasticmoe run --set train.seed=$seed --out /work/main/runs/def-s$seed > /work/main/runs/def-s$seed.log 2>&1

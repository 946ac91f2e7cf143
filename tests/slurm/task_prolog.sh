#!/bin/sh
# SLURM TaskProlog of the test cluster: runs before every task of every step with the
# task's environment; a "print" line goes to the task's stdout, i.e. the job's SLURM log.
echo "print sacpo-slurm-test task: job=${SLURM_JOB_ID:-?} step=${SLURM_STEP_ID:-?} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"

#!/usr/bin/env bash
# One shard of avepipe extract as a SLURM job array: 16 shards, one GPU each (docs/scale-out.md). Submit it with
# submit.sh, which also submits the merge job that starts once every shard has succeeded:
#
#   bash docs/slurm/submit.sh                     # the array and the dependent merge job
#   bash docs/slurm/submit.sh rerun-failed ID     # re-runs the failed tasks of array job ID, then merges again
#
# Task K (0..15, $SLURM_ARRAY_TASK_ID) runs `avepipe extract --shard K/16 --device cuda` into its own cache
# $SHARDS_DIR/features-K.h5. Changing the number of shards: --array=0-(N-1) and the N of --shard K/N must stay equal.
# Settings (environment, read when submitting and by every task): VIDEOS, SHARDS_DIR, and AVEPIPE, the command that
# runs avepipe (default "avepipe" from PATH; e.g. "apptainer run --nv avepipe.sif" for the container image).
#
#SBATCH --job-name=avepipe-extract
#SBATCH --array=0-15
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=avepipe-extract-%A_%a.log
set -uo pipefail

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    echo "$0: a SLURM array task; submit it with: bash docs/slurm/submit.sh" >&2
    exit 2
fi
VIDEOS=${VIDEOS:-/data/videos}
SHARDS_DIR=${SHARDS_DIR:-/data/shards}
read -r -a avepipe <<< "${AVEPIPE:-avepipe}"

# One task: one shard, on the GPU SLURM gave it (--device cuda: no GPU is an error, never a silent CPU run);
# decoders on the other allocated cores.
"${avepipe[@]}" extract "${VIDEOS}" --cache "${SHARDS_DIR}/features-${SLURM_ARRAY_TASK_ID}.h5" \
    --shard "${SLURM_ARRAY_TASK_ID}/16" --device cuda --workers "$(( ${SLURM_CPUS_PER_TASK:-8} - 1 ))"
status=$?
# 1 = some videos are bad input: listed above and recorded under /failed in the shard cache; a retry cannot fix them,
# so the shard counts as done (the merge still runs). Other codes (2: usage error, 3: bug, 143: terminated) fail it.
if [[ ${status} -eq 1 ]]; then
    exit 0
fi
exit "${status}"

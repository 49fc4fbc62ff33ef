#!/usr/bin/env bash
# avepipe extract as a SLURM job array: 16 shards, then a merge job that starts when all of them succeeded
# (docs/scale-out.md).
#
#   bash docs/slurm/extract-array.sh                       # submits the array and the dependent merge job
#   sbatch --array=3,7 docs/slurm/extract-array.sh         # re-runs shards 3 and 7 only (they resume from their caches)
#
# Task K (0..15, $SLURM_ARRAY_TASK_ID) runs `avepipe extract --shard K/16` into its own cache $SHARDS_DIR/features-K.h5.
# Changing the number of shards: --array=0-(N-1) and the N of --shard K/N must stay equal.
# Settings (environment, read when submitting and by every task): VIDEOS, SHARDS_DIR, OUT, and AVEPIPE, the command
# that runs avepipe (default "avepipe" from PATH; e.g. "apptainer run --nv avepipe.sif" for the Docker image).
#
#SBATCH --job-name=avepipe-extract
#SBATCH --array=0-15
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=avepipe-extract-%A_%a.log
set -uo pipefail

VIDEOS=${VIDEOS:-/data/videos}
SHARDS_DIR=${SHARDS_DIR:-/data/shards}
OUT=${OUT:-/data/features.h5}
read -r -a avepipe <<< "${AVEPIPE:-avepipe}"

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    # Submitting (from a login node): the array, then the merge once every task has ended successfully.
    export VIDEOS SHARDS_DIR OUT
    array_id=$(sbatch --parsable --export=ALL "$0") || exit
    merge="${AVEPIPE:-avepipe} cache merge ${SHARDS_DIR}/features-*.h5 --out ${OUT} --overwrite"
    merge_id=$(sbatch --parsable --export=ALL --dependency=afterok:"${array_id}" --job-name=avepipe-merge \
        --cpus-per-task=1 --mem=4G --time=01:00:00 --output=avepipe-merge-%j.log --wrap="${merge}") || exit
    echo "submitted array job ${array_id} (16 shards) and merge job ${merge_id} (into ${OUT})"
    exit 0
fi

# One task: one shard, on the GPU SLURM gave it; decoders on the other allocated cores.
"${avepipe[@]}" extract "${VIDEOS}" --cache "${SHARDS_DIR}/features-${SLURM_ARRAY_TASK_ID}.h5" \
    --shard "${SLURM_ARRAY_TASK_ID}/16" --workers "$(( ${SLURM_CPUS_PER_TASK:-8} - 1 ))"
status=$?
# 1 = some videos are bad input: listed above and recorded under /failed in the shard cache; a retry cannot fix them,
# so the shard counts as done (the merge still runs). Other codes (2: usage error, 3: bug, 130: interrupted) fail it.
if [[ ${status} -eq 1 ]]; then
    exit 0
fi
exit "${status}"

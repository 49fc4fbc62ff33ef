#!/usr/bin/env bash
# Submits avepipe extract as a SLURM job array (extract-array.sh, 16 shards) and the merge (merge.sh) that starts once
# every shard has succeeded (docs/scale-out.md). Run it on a login node:
#
#   bash docs/slurm/submit.sh                     # the array, then the merge
#   bash docs/slurm/submit.sh rerun-failed ID     # the tasks of array job ID that did not succeed, then a new merge
#
# A failed task cancels the pending merge (--kill-on-invalid-dep=yes) instead of leaving it pending forever;
# rerun-failed submits the failed tasks again (they resume from their caches) and a merge that waits for them.
# Settings (environment, passed on to every job): VIDEOS, SHARDS_DIR, OUT, AVEPIPE (see extract-array.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
export VIDEOS=${VIDEOS:-/data/videos}
export SHARDS_DIR=${SHARDS_DIR:-/data/shards}
export OUT=${OUT:-/data/features.h5}
export AVEPIPE=${AVEPIPE:-avepipe}

# sbatch --parsable prints "ID", or "ID;CLUSTER" on a multi-cluster installation: keep the ID.
submit() {
    local out
    out=$(sbatch --parsable --export=ALL "$@")
    echo "${out%%;*}"
}

submit_merge() {  # submit_merge ARRAY_ID: the merge, once every task of ARRAY_ID has succeeded
    submit --dependency="afterok:$1" --kill-on-invalid-dep=yes "${here}/merge.sh"
}

case "${1:-}" in
    "")
        array_id=$(submit "${here}/extract-array.sh")
        merge_id=$(submit_merge "${array_id}")
        echo "submitted array job ${array_id} (16 shards) and merge job ${merge_id} (into ${OUT})"
        ;;
    rerun-failed)
        array_id=${2:?usage: $0 rerun-failed ARRAY_JOB_ID}
        failed=() waiting=()
        # One line per task: ID_K|STATE (tasks not started yet: ID_[K-M]|PENDING).
        states=$(sacct --jobs="${array_id}" --allocations --noheader --parsable2 --format=JobID,State)
        while IFS='|' read -r job state; do
            [[ -n "${job}" ]] || continue
            task=${job#*_}
            case "${state}" in
                COMPLETED) ;;
                PENDING | RUNNING | REQUEUED | RESIZING | SUSPENDED | CONFIGURING | COMPLETING) waiting+=("${task}") ;;
                *) failed+=("${task}") ;;  # FAILED, TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED, ...
            esac
        done <<< "${states}"
        if [[ ${#waiting[@]} -gt 0 ]]; then
            echo "array job ${array_id} still has tasks pending or running (${waiting[*]}): wait for them" >&2
            exit 2
        fi
        if [[ ${#failed[@]} -eq 0 ]]; then
            echo "every task of array job ${array_id} completed; to merge again: sbatch ${here}/merge.sh"
            exit 0
        fi
        tasks=$(IFS=,; echo "${failed[*]}")
        rerun_id=$(submit --array="${tasks}" "${here}/extract-array.sh")
        merge_id=$(submit_merge "${rerun_id}")
        echo "resubmitted tasks ${tasks} of array job ${array_id} as array job ${rerun_id}, and merge job ${merge_id}"
        ;;
    *)
        echo "usage: $0 [rerun-failed ARRAY_JOB_ID]" >&2
        exit 2
        ;;
esac

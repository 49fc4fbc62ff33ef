#!/usr/bin/env bash
# shellcheck disable=SC2310
# Runs the extract Job, waits until it is complete, then runs the merge Job and waits for it (docs/scale-out.md).
# A Job that fails stops the script at once (no waiting for the timeout); exit 0 only when the merge is complete.
#
#   bash docs/k8s/run.sh          # kubectl's current context and namespace; the volume of data-pvc.yaml filled
#
# After a failure, run the failed indexes again: `kubectl delete job avepipe-extract`, then this script again
# (finished shards skip everything they already hold). Settings (environment): EXTRACT_TIMEOUT (default 49h, above
# the Job's activeDeadlineSeconds), MERGE_TIMEOUT (default 7h).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
extract_timeout=${EXTRACT_TIMEOUT:-49h}
merge_timeout=${MERGE_TIMEOUT:-7h}

# wait_for_job NAME TIMEOUT: 0 once job/NAME is complete; 1 as soon as it has failed, or at the timeout.
# `kubectl wait` waits for one condition: one for `complete` and one for `failed` run side by side, and the first to
# return decides. It is called in `if` (SC2310: set -e is off there on purpose, the function returns a status).
wait_for_job() {
    local job=$1 timeout=$2 complete failed
    kubectl wait --for=condition=complete --timeout="${timeout}" "job/${job}" >/dev/null &
    complete=$!
    kubectl wait --for=condition=failed --timeout="${timeout}" "job/${job}" >/dev/null &
    failed=$!
    while kill -0 "${complete}" 2>/dev/null && kill -0 "${failed}" 2>/dev/null; do
        sleep 1
    done
    if kill -0 "${failed}" 2>/dev/null; then  # the wait for `complete` returned first: its status decides
        kill "${failed}" 2>/dev/null || true
        wait "${failed}" 2>/dev/null || true
        wait "${complete}"
        return
    fi
    kill "${complete}" 2>/dev/null || true
    wait "${complete}" 2>/dev/null || true
    return 1
}

kubectl apply -f "${here}/extract-job.yaml"
if ! wait_for_job avepipe-extract "${extract_timeout}"; then
    echo "job/avepipe-extract did not complete: kubectl describe job/avepipe-extract (failed indexes:" \
        "$(kubectl get job/avepipe-extract -o jsonpath='{.status.failedIndexes}' || true))." \
        "To run them again: kubectl delete job avepipe-extract && bash $0" >&2
    exit 1
fi
# A Job's pod template cannot change: replace an earlier merge Job instead of applying over it.
kubectl delete job avepipe-merge --ignore-not-found
kubectl apply -f "${here}/merge-job.yaml"
if ! wait_for_job avepipe-merge "${merge_timeout}"; then
    echo "job/avepipe-merge did not complete: kubectl logs job/avepipe-merge" >&2
    exit 1
fi
echo "merged: features.h5 on the volume avepipe-data"

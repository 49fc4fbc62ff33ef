#!/usr/bin/env bash
# Joins the shard caches of extract-array.sh into one cache (docs/scale-out.md). submit.sh submits it with
# --dependency=afterok:<array job>, so it starts once every shard has succeeded; `avepipe cache merge` checks that it
# gets all the shard caches of one run and names the missing ones. --overwrite: the shard caches are the source of
# truth; after re-running shards, merge again. Settings (environment): SHARDS_DIR, OUT, AVEPIPE (as extract-array.sh).
#
#SBATCH --job-name=avepipe-merge
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=06:00:00
#SBATCH --output=avepipe-merge-%j.log
set -euo pipefail

SHARDS_DIR=${SHARDS_DIR:-/data/shards}
OUT=${OUT:-/data/features.h5}
read -r -a avepipe <<< "${AVEPIPE:-avepipe}"

exec "${avepipe[@]}" cache merge "${SHARDS_DIR}"/features-*.h5 --out "${OUT}" --overwrite

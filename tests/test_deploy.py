"""The array-job files in docs/ (Kubernetes manifests and run.sh, SLURM scripts): parsed, checked for the settings a
cluster needs, and run with stand-ins for avepipe, kubectl, sbatch and sacct."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S, SLURM = ROOT / "docs/k8s", ROOT / "docs/slurm"


def manifest(name: str) -> dict:
    documents = list(yaml.safe_load_all((K8S / name).read_text()))
    assert len(documents) == 1 and documents[0]["apiVersion"] and documents[0]["metadata"]["name"]
    return documents[0]


def stand_in(bin_dir: Path, name: str, body: str) -> Path:
    """An executable ``name`` in ``bin_dir`` (put first on PATH) that stands in for a real command."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


# A stand-in avepipe: writes its arguments (one per line) to $FAKE_LOG and exits with $FAKE_EXIT; with FAKE_RUN set it
# runs until SIGTERM, then takes a moment to finish (as avepipe folds its finished videos in) and exits 143.
FAKE_AVEPIPE = """printf '%s\\n' "$@" > "$FAKE_LOG"
if [ -n "${FAKE_RUN:-}" ]; then
    trap 'echo terminated >> "$FAKE_LOG"; sleep 0.5; echo finished >> "$FAKE_LOG"; exit 143' TERM
    echo started >> "$FAKE_LOG"
    for _ in $(seq 300); do sleep 0.1; done
    exit 0
fi
exit "${FAKE_EXIT:-0}"
"""


@pytest.fixture
def fake_avepipe(tmp_path):
    stand_in(tmp_path / "bin", "avepipe", FAKE_AVEPIPE)
    log = tmp_path / "avepipe.log"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(log)}
    return env, log


# -- Kubernetes --------------------------------------------------------------------------------------------------------

def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def check_job_policies(job: dict) -> None:
    """What both Jobs need: a failure policy that stops at a usage error, bounded run time, clean-up, non-root."""
    spec, pod = job["spec"], pod_spec(job)
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy and backoffLimitPerIndex require it
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    rules = spec["podFailurePolicy"]["rules"]
    containers = {c["name"] for c in pod["containers"]}
    fail_job = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail_job) == 1 and fail_job[0]["onExitCodes"]["operator"] == "In"
    assert fail_job[0]["onExitCodes"]["values"] == [2] and fail_job[0]["onExitCodes"]["containerName"] in containers
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert ignore and ignore[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000 and security["fsGroup"] == 1000
    assert security["fsGroupChangePolicy"] == "OnRootMismatch"
    for container in pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"]["ephemeral-storage"]
        assert container["command"] == ["/bin/sh", "-c"] and len(container["args"]) == 1


def test_the_extract_job_runs_one_shard_per_index_on_a_gpu():
    job = manifest("extract-job.yaml")
    spec, pod = job["spec"], pod_spec(job)
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"] and spec["backoffLimitPerIndex"] >= 1
    check_job_policies(job)
    (container,) = pod["containers"]
    script = container["args"][0]
    shard = re.search(r'--shard "\$\{JOB_COMPLETION_INDEX\}/(\d+)"', script)
    assert shard and int(shard.group(1)) == spec["completions"]  # N of --shard K/N == completions
    assert "--device cuda" in script and "--device auto" not in script  # a GPU job never falls back to the CPU
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    # The decoders' shared memory: a memory-backed /dev/shm instead of the runtime's 64 MiB.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == manifest("data-pvc.yaml")["metadata"][
        "name"]
    assert "ReadWriteMany" in manifest("data-pvc.yaml")["spec"]["accessModes"]


def test_the_merge_job_joins_the_extract_job_s_shard_caches():
    job = manifest("merge-job.yaml")
    check_job_policies(job)
    (container,) = pod_spec(job)["containers"]
    command = container["args"][0]
    assert command.startswith("exec avepipe cache merge ") and "--device" not in command
    extract = pod_spec(manifest("extract-job.yaml"))["containers"][0]["args"][0]
    cache = re.search(r'--cache "([^"]+)"', extract).group(1)
    assert cache.replace("${JOB_COMPLETION_INDEX}", "*") in command.split()  # every shard cache, by its glob
    assert "nvidia.com/gpu" not in str(job)


def run_container_script(name: str, env: dict, index: int = 3) -> subprocess.CompletedProcess:
    """The container's command and args of a manifest, as Kubernetes runs them (``JOB_COMPLETION_INDEX`` set)."""
    container = pod_spec(manifest(name))["containers"][0]
    return subprocess.run([*container["command"], *container["args"]], env={**env, "JOB_COMPLETION_INDEX": str(index)},
                          capture_output=True, text=True, timeout=60)


def test_the_extract_container_runs_avepipe_and_counts_bad_videos_as_done(fake_avepipe):
    env, log = fake_avepipe
    assert run_container_script("extract-job.yaml", env).returncode == 0
    assert log.read_text().split() == ["extract", "/data/videos", "--cache", "/data/shards/features-3.h5", "--shard",
                                       "3/16", "--device", "cuda", "--workers", "7"]
    for code, expected in ((1, 0), (2, 2), (3, 3), (143, 143)):  # 1: bad videos, recorded; the rest: failure policy
        assert run_container_script("extract-job.yaml", {**env, "FAKE_EXIT": str(code)}).returncode == expected, code
    merge = run_container_script("merge-job.yaml", env)
    assert merge.returncode == 0
    assert log.read_text().split() == ["cache", "merge", "/data/shards/features-*.h5", "--out", "/data/features.h5",
                                       "--overwrite"]


def test_the_extract_container_passes_sigterm_on_to_avepipe(fake_avepipe):
    # The shell is the container's first process: without passing SIGTERM on, avepipe would be SIGKILLed at the end of
    # the grace period instead of keeping its finished videos.
    env, log = fake_avepipe
    container = pod_spec(manifest("extract-job.yaml"))["containers"][0]
    shell = subprocess.Popen([*container["command"], *container["args"]],
                             env={**env, "JOB_COMPLETION_INDEX": "0", "FAKE_RUN": "1"})
    try:
        deadline = time.monotonic() + 20
        while "started" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and shell.poll() is None
            time.sleep(0.05)
        shell.send_signal(signal.SIGTERM)
        assert shell.wait(timeout=20) == 143
    finally:
        shell.kill()
    assert log.read_text().splitlines()[-2:] == ["terminated", "finished"]  # the shell waited for avepipe's exit


FAKE_KUBECTL = """echo "$*" >> "$FAKE_LOG"
case "$1" in
    wait)  # wait --for=condition=C --timeout=T job/NAME: returns when job NAME's outcome (file) is C
        condition=${2#--for=condition=}
        outcome=$(cat "$FAKE_DIR/${4#job/}" 2>/dev/null || echo running)
        if [ "$condition" = "$outcome" ]; then sleep 0.3; exit 0; fi
        exec sleep 120 ;;
    get) echo '3,7' ;;
esac
exit 0
"""


def run_k8s_script(tmp_path: Path, extract: str, merge: str) -> tuple[subprocess.CompletedProcess, list[str], float]:
    stand_in(tmp_path / "bin", "kubectl", FAKE_KUBECTL)
    (tmp_path / "avepipe-extract").write_text(extract)
    (tmp_path / "avepipe-merge").write_text(merge)
    log = tmp_path / "kubectl.log"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "FAKE_DIR": str(tmp_path)}
    started = time.monotonic()
    run = subprocess.run(["bash", str(K8S / "run.sh")], env=env, capture_output=True, text=True, timeout=60)
    calls = [line for line in log.read_text().splitlines() if not line.startswith("wait")]
    return run, calls, time.monotonic() - started


def test_k8s_run_script_merges_once_the_extract_job_is_complete(tmp_path):
    run, calls, _ = run_k8s_script(tmp_path, "complete", "complete")
    assert run.returncode == 0, run.stderr
    assert calls == [f"apply -f {K8S}/extract-job.yaml", "delete job avepipe-merge --ignore-not-found",
                     f"apply -f {K8S}/merge-job.yaml"]


def test_k8s_run_script_stops_at_once_when_a_job_fails(tmp_path):
    run, calls, elapsed = run_k8s_script(tmp_path, "failed", "complete")
    assert run.returncode == 1 and elapsed < 30  # not the wait for `complete` running into its timeout
    assert calls[0] == f"apply -f {K8S}/extract-job.yaml" and not any("merge" in call for call in calls)
    assert "job/avepipe-extract did not complete" in run.stderr and "failed indexes: 3,7" in run.stderr
    assert "kubectl delete job avepipe-extract" in run.stderr
    run, calls, elapsed = run_k8s_script(tmp_path, "complete", "failed")
    assert run.returncode == 1 and elapsed < 30 and "kubectl logs job/avepipe-merge" in run.stderr


# -- SLURM -------------------------------------------------------------------------------------------------------------

def test_slurm_scripts_parse_and_carry_the_key_settings():
    for script in (SLURM / "extract-array.sh", SLURM / "merge.sh", SLURM / "submit.sh", K8S / "run.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    task = (SLURM / "extract-array.sh").read_text()
    first, last = map(int, re.search(r"^#SBATCH --array=(\d+)-(\d+)$", task, re.M).groups())
    assert first == 0 and f'--shard "${{SLURM_ARRAY_TASK_ID}}/{last + 1}"' in task
    assert "--device cuda" in task and "--device auto" not in task and re.search(r"^#SBATCH --gres=gpu:1$", task, re.M)
    submit = (SLURM / "submit.sh").read_text()
    assert "--parsable" in submit and '"${out%%;*}"' in submit  # "ID;CLUSTER" cut at the ;
    assert '--dependency="afterok:$1" --kill-on-invalid-dep=yes' in submit
    assert "cache merge" in (SLURM / "merge.sh").read_text()


FAKE_SBATCH = """n=$(( $(cat "$FAKE_DIR/next" 2>/dev/null || echo 100) ))
echo $(( n + 1 )) > "$FAKE_DIR/next"
echo "$*" >> "$FAKE_LOG"
echo "$n;cluster-a"
"""
FAKE_SACCT = """cat "$FAKE_DIR/sacct"
"""


def run_submit(tmp_path: Path, *args: str, sacct: str = "") -> tuple[subprocess.CompletedProcess, list[str]]:
    stand_in(tmp_path / "bin", "sbatch", FAKE_SBATCH)
    stand_in(tmp_path / "bin", "sacct", FAKE_SACCT)
    (tmp_path / "sacct").write_text(sacct)
    log = tmp_path / "sbatch.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "FAKE_DIR": str(tmp_path)}
    run = subprocess.run(["bash", str(SLURM / "submit.sh"), *args], env=env, capture_output=True, text=True,
                         timeout=60)
    return run, log.read_text().splitlines() if log.exists() else []


def test_slurm_submit_chains_the_merge_on_the_array(tmp_path):
    run, calls = run_submit(tmp_path)
    assert run.returncode == 0, run.stderr
    assert calls == [f"--parsable --export=ALL {SLURM}/extract-array.sh",
                     f"--parsable --export=ALL --dependency=afterok:100 --kill-on-invalid-dep=yes {SLURM}/merge.sh"]
    assert "array job 100 (16 shards) and merge job 101" in run.stdout


def test_slurm_rerun_failed_resubmits_the_failed_tasks_and_the_merge(tmp_path):
    states = "100_0|COMPLETED\n100_3|FAILED\n100_1|COMPLETED\n100_7|TIMEOUT\n100_9|CANCELLED by 1000\n"
    run, calls = run_submit(tmp_path, "rerun-failed", "100", sacct=states)
    assert run.returncode == 0, run.stderr
    assert calls == [f"--parsable --export=ALL --array=3,7,9 {SLURM}/extract-array.sh",
                     f"--parsable --export=ALL --dependency=afterok:100 --kill-on-invalid-dep=yes {SLURM}/merge.sh"]
    run, calls = run_submit(tmp_path, "rerun-failed", "100", sacct="100_3|FAILED\n100_[5-15]|PENDING\n")
    assert run.returncode == 2 and calls == [] and "still has tasks pending or running" in run.stderr
    run, calls = run_submit(tmp_path, "rerun-failed", "100", sacct="100_0|COMPLETED\n")
    assert run.returncode == 0 and calls == [] and "every task of array job 100 completed" in run.stdout


def test_slurm_task_and_merge_run_avepipe(tmp_path, fake_avepipe):
    env, log = fake_avepipe
    task = {**env, "SLURM_ARRAY_TASK_ID": "5", "SLURM_CPUS_PER_TASK": "8", "SHARDS_DIR": "/scratch/s"}
    for code, expected in ((0, 0), (1, 0), (2, 2)):
        run = subprocess.run(["bash", str(SLURM / "extract-array.sh")], env={**task, "FAKE_EXIT": str(code)},
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == expected, run.stderr
    assert log.read_text().split() == ["extract", "/data/videos", "--cache", "/scratch/s/features-5.h5", "--shard",
                                       "5/16", "--device", "cuda", "--workers", "7"]
    outside = subprocess.run(["bash", str(SLURM / "extract-array.sh")], env=env, capture_output=True, text=True)
    assert outside.returncode == 2 and "submit.sh" in outside.stderr
    for k in (0, 1):
        (tmp_path / f"features-{k}.h5").touch()
    merge = subprocess.run(["bash", str(SLURM / "merge.sh")], env={**env, "SHARDS_DIR": str(tmp_path), "OUT": "/o.h5"},
                           capture_output=True, text=True, timeout=60)
    assert merge.returncode == 0, merge.stderr
    assert log.read_text().split() == ["cache", "merge", f"{tmp_path}/features-0.h5", f"{tmp_path}/features-1.h5",
                                       "--out", "/o.h5", "--overwrite"]

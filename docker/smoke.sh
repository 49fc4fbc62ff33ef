#!/usr/bin/env bash
# Docker smoke test (issue 16): builds the image from the repository's Dockerfile and runs the batch job in it, with
# no Docker daemon: buildah builds, podman runs (runc, cgroupfs). .ci/run calls it after the tests.
#
#   bash docker/smoke.sh          # as root; installs buildah, podman, runc, uidmap, debootstrap with apt-get if missing
#
# Steps (docs/docker.md, "Testing the image without Docker"):
#  1. a Python base image: Debian bookworm bootstrapped with debootstrap (python3, venv, ca-certificates), kept as an
#     archive in /var/cache/avepipe-smoke for later runs on the same machine;
#  2. the image, built twice: cold, then after a code-only change (a .py file touched in a copy of the build context),
#     which must reuse every dependency layer; pip's configuration goes in as the build secret `pipconf` and the local
#     folders it names as read-only bind mounts, as docs/docker.md describes;
#  3. in the image, as uid 1000 with --network none: --help; extract of two short clips (weights mounted read-only);
#     the Kubernetes Indexed Job exactly as docs/k8s/extract-job.yaml defines it (command, args, env, security context
#     and volumes read from the file at run time) for every index, then the merge Job of docs/k8s/merge-job.yaml;
#     every cache bit-identical to a local run of the same extract;
#  4. failures: an unwritable output volume and --device cuda without a GPU exit 2 with a clear message; podman stop
#     during an extract (plain image, and the Job's shell) ends it with exit 143, finished videos kept, no SIGKILL.
#
# Two changes to the manifest's command, printed in the log: `--vggish-weights random` (the real VGGish weights are not
# available to CI) and `--device cuda` -> `--device cpu` (no GPU). Resources, node selectors and tolerations are not
# emulated. Images and containers live in an image store of the run's own, removed at the end (runs at once do not
# meet). Environment: AVEPIPE_WEIGHTS_DIR, AVEPIPE_TEST_MEDIA (default ../shared/...); AVEPIPE_SMOKE_KEEP_IMAGE=1 uses
# and keeps a store in /var/lib/avepipe-smoke instead (the next such run rebuilds only what changed);
# AVEPIPE_SMOKE_REBUILD_BASE=1 bootstraps the base image again. Exit code 0 only when every check passed.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${AVEPIPE_SHARED:-$ROOT/../shared}
WEIGHTS=$(cd "${AVEPIPE_WEIGHTS_DIR:-$SHARED/weights}" && pwd)
MEDIA=$(cd "${AVEPIPE_TEST_MEDIA:-$SHARED/media}" && pwd)
DEBIAN_MIRROR=${AVEPIPE_SMOKE_DEBIAN_MIRROR:-}
BASE_IMAGE=localhost/avepipe-smoke-base:bookworm
BASE_ARCHIVE=/var/cache/avepipe-smoke/base-bookworm.tar
IMAGE=localhost/avepipe-smoke:cold
IMAGE_WARM=localhost/avepipe-smoke:warm
EXTRACT_JOB=$ROOT/docs/k8s/extract-job.yaml
MERGE_JOB=$ROOT/docs/k8s/merge-job.yaml
CLIPS=(sample_1s.mp4 big_buck_bunny_432_433.webm)  # two short clips (1 s each) in different shards of 16
LONG_CLIP=trailer_bbb.mp4                            # 55 s: still running when the stop checks stop it
T_START=$(date +%s)

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { log "FAIL: $*"; log "RESULT: FAIL"; exit 1; }
trap 'log "FAIL: unexpected error (exit $?) at docker/smoke.sh line $LINENO: $BASH_COMMAND"; log "RESULT: FAIL"' ERR

FAILED=()
PASSED=0
# record NAME OK DETAIL: one PASS/FAIL line per check
record() {
    if [ "$2" = 1 ]; then PASSED=$((PASSED + 1)); log "PASS  $1 ($3)"; else FAILED+=("$1"); log "FAIL  $1 ($3)"; fi
}

# --- tools -----------------------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "must run as root (buildah/podman with the machine's image store, apt-get)"
missing=()
for tool in buildah podman runc newuidmap debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ -x /usr/lib/podman/netavark ] || missing+=(netavark)  # podman's network backend (a recommended package)
/usr/bin/python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
WORK_APT_LOG=$(mktemp /var/tmp/avepipe-smoke-apt.XXXXXX)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing with apt-get (missing: ${missing[*]})"
    t0=$(date +%s)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq buildah podman runc uidmap debootstrap netavark python3-yaml >"$WORK_APT_LOG" 2>&1 \
        || { tail -20 "$WORK_APT_LOG"; die "apt-get install failed"; }
    log "tools installed in $(( $(date +%s) - t0 )) s"
fi
rm -f "$WORK_APT_LOG"
for tool in buildah podman runc debootstrap; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
command -v avepipe >/dev/null || die "avepipe is not on PATH (the local run to compare with needs it: activate the venv)"
PY=$(dirname "$(command -v avepipe)")/python  # the venv that has avepipe and h5py
"$PY" -c 'import h5py' || die "$PY cannot import h5py"
log "tools: $(buildah --version | head -1); $(podman --version); runc $(runc --version | sed -n 's/^runc version //p')"

WORK=$(mktemp -d /var/tmp/avepipe-smoke.XXXXXX)
NAME=avepipe-smoke-$$
KEEP=${AVEPIPE_SMOKE_KEEP_IMAGE:-0}
# The image store: the run's own, or a lasting one with AVEPIPE_SMOKE_KEEP_IMAGE=1.
if [ "$KEEP" = 1 ]; then STORE=/var/lib/avepipe-smoke; RUNROOT=/run/avepipe-smoke; else STORE=$WORK/store; RUNROOT=$WORK/run; fi
printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' "$STORE" "$RUNROOT" >"$WORK/storage.conf"
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
cleanup() {  # the run's containers, images and store; the base image's archive stays for the next run
    local c
    for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null | grep "^$NAME-" || true); do
        podman rm -f -t 0 "$c" >/dev/null 2>&1 || true
    done
    buildah rm --all >/dev/null 2>&1 || true  # working containers of an interrupted build
    podman rmi -f "$IMAGE_WARM" >/dev/null 2>&1 || true
    if [ "$KEEP" != 1 ]; then
        podman rmi -a -f >/dev/null 2>&1 || true
        findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | xargs -r umount -l 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# podman on this kind of machine: crun refuses hybrid cgroups (runc, cgroupfs), and the default ulimits are above what
# the machine allows.
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf

# --- 1. base image ---------------------------------------------------------------------------------------------------
if [ "${AVEPIPE_SMOKE_REBUILD_BASE:-0}" = 1 ]; then podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true; rm -f "$BASE_ARCHIVE"; fi
if podman image exists "$BASE_IMAGE"; then
    log "base image: $BASE_IMAGE (in the kept store)"
elif [ -s "$BASE_ARCHIVE" ] && podman load -q -i "$BASE_ARCHIVE" >/dev/null && podman image exists "$BASE_IMAGE"; then
    log "base image: $BASE_IMAGE (reused: $BASE_ARCHIVE)"
else
    if [ -z "$DEBIAN_MIRROR" ]; then  # the mirror apt uses
        # shellcheck disable=SC2016  # apt's own $(FIELD) placeholders
        DEBIAN_MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(CODENAME)' 2>/dev/null \
            | awk '$2 == "bookworm" { print $1; exit }' || true)
        DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian/}
    fi
    log "base image: debootstrap bookworm from $DEBIAN_MIRROR"
    t0=$(date +%s)
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    ctr=$(buildah from scratch)
    buildah copy --quiet "$ctr" "$WORK/rootfs" / >/dev/null
    buildah config --env LANG=C.UTF-8 --cmd python3 "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
    mkdir -p "$(dirname "$BASE_ARCHIVE")"
    podman save -q -o "$BASE_ARCHIVE.tmp" "$BASE_IMAGE" && mv "$BASE_ARCHIVE.tmp" "$BASE_ARCHIVE"
    log "base image: $BASE_IMAGE built in $(( $(date +%s) - t0 )) s" \
        "($(podman run --rm --network none "$BASE_IMAGE" python --version 2>&1))"
fi

# --- 2. build ----------------------------------------------------------------------------------------------------------
# pip's effective configuration on this machine (files and PIP_* variables) as one pip.conf: the build secret.
python3 -m pip config list >"$WORK/pip-config.txt" 2>/dev/null || true
/usr/bin/python3 - "$WORK/pip-config.txt" "$WORK/pip.conf" "$WORK/pip-mounts" <<'EOF'
import os, re, sys
sections = {}
for line in open(sys.argv[1]):
    m = re.match(r"^(.+?)\.([A-Za-z0-9_-]+)='(.*)'$", line.strip())
    if m:
        section = "global" if m[1] == ":env:" else m[1]
        sections.setdefault(section, {})[m[2]] = m[3]
with open(sys.argv[2], "w") as f:
    for section, values in sections.items():
        f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
# The local files and folders it names, mounted read-only at the same paths. An index folder .../simple links to
# ../../files: its parent is mounted.
mounts = set()
for values in sections.values():
    for value in values.values():
        for token in value.split():
            path = token[len("file://"):] if token.startswith("file://") else token
            if not path.startswith("/") or not os.path.exists(path):
                continue
            path = os.path.normpath(path)
            if os.path.basename(path) == "simple":
                path = os.path.dirname(path)
            mounts.add(path)
open(sys.argv[3], "w").write("".join(f"{m}\n" for m in sorted(mounts)))
EOF
BUILD_OPTS=(--isolation chroot --network host --layers --pull=never --build-arg "PYTHON_IMAGE=$BASE_IMAGE"
            --secret "id=pipconf,src=$WORK/pip.conf" -f "$ROOT/Dockerfile")
while read -r m; do BUILD_OPTS+=(-v "$m:$m:ro"); done <"$WORK/pip-mounts"
log "pip configuration for the build: $(grep -c = "$WORK/pip.conf") settings (secret pipconf), mounts: $(tr '\n' ' ' <"$WORK/pip-mounts")"

# The build context: the repository's files (tracked and untracked, not ignored), copied so that a code-only change
# can be made for the second build without touching the checkout.
CTX=$WORK/context
mkdir -p "$CTX"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
        | (cd "$ROOT" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$CTX" -xf -
else
    cp -a "$ROOT/." "$CTX/"
fi

build() {  # build TAG LOG VAR: sets VAR to the seconds it took
    local t0
    t0=$(date +%s)
    buildah bud "${BUILD_OPTS[@]}" -t "$1" "$CTX" >"$2" 2>&1 || { tail -40 "$2"; die "buildah bud failed (log above)"; }
    printf -v "$3" '%s' $(( $(date +%s) - t0 ))
}
log "build: cold (context $(du -sh "$CTX" | cut -f1))"
build "$IMAGE" "$WORK/build-cold.log" COLD_S
SIZE=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "build: cold build $COLD_S s; image size $(awk -v b="$SIZE" 'BEGIN { printf "%.2f GB (%.0f bytes)", b / 1e9, b }')"
grep -q 'Using cache' "$WORK/build-cold.log" && log "build: (layers from an earlier run on this machine were reused)"

# A code-only change: the dependency layers must come from the cache, only the avepipe layers are built again.
printf '\n# smoke rebuild %s\n' "$$" >>"$CTX/avepipe/__init__.py"
build "$IMAGE_WARM" "$WORK/build-warm.log" WARM_S
/usr/bin/python3 - "$WORK/build-warm.log" <<'EOF' >"$WORK/layers.txt" || true
import re, sys
steps, current = [], None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"^\[\d+/\d+\] STEP \d+/\d+: (.*)", line)
    if m:
        current = [m[1], False]; steps.append(current)
    elif current and line.startswith("--> Using cache"):
        current[1] = True
# the dependency steps: torch, and the other requirements
deps = [s for s in steps if "torch==" in s[0] or "requirements.txt" in s[0]]
rebuilt = [s[0][:60] for s in steps if not s[1] and not s[0].startswith(("FROM", "ARG", "ENV", "USER", "WORKDIR",
                                                                           "ENTRYPOINT", "CMD", "LABEL"))]
ok = len(deps) >= 2 and all(s[1] for s in deps)
print(int(ok), len(deps), sum(s[1] for s in deps), "; ".join(rebuilt))
EOF
read -r LAYERS_OK DEPS_N DEPS_CACHED REBUILT <"$WORK/layers.txt" || LAYERS_OK=0
record "rebuild after a .py change reuses the dependency layers" "${LAYERS_OK:-0}" \
    "$WARM_S s; ${DEPS_CACHED:-0}/${DEPS_N:-0} dependency steps from cache; rebuilt: ${REBUILT:-?}"
podman rmi -f "$IMAGE_WARM" >/dev/null 2>&1 || true

USER_CFG=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
record "image user is uid 1000" "$([ "$USER_CFG" = 1000 ] && echo 1 || echo 0)" "Config.User=$USER_CFG"

# --- 3. runs -----------------------------------------------------------------------------------------------------------
DATA=$WORK/data                         # the Jobs' volume: videos/ in, shards/ and features.h5 out
mkdir -p "$DATA/videos" "$WORK/plain" "$WORK/local"
for c in "${CLIPS[@]}"; do cp "$MEDIA/$c" "$DATA/videos/"; done
chown -R 1000:1000 "$DATA" "$WORK/plain"
LOCAL_PATHS=()
for c in "${CLIPS[@]}"; do LOCAL_PATHS+=("$MEDIA/$c"); done
RUN=(podman run --rm --network none --user 1000:1000 --shm-size 1g)
N_RUN=0

# run_check NAME EXPECTED_RC COMMAND...: runs it, records exit code and wall time; output in $WORK/out-<n>.log
run_check() {
    local name=$1 want=$2 t0 rc
    shift 2
    N_RUN=$((N_RUN + 1)); LAST_LOG=$WORK/out-$N_RUN.log
    t0=$(date +%s.%N)
    rc=0
    "$@" >"$LAST_LOG" 2>&1 || rc=$?
    LAST_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" = "$want" ]; then record "$name" 1 "exit $rc, $LAST_S s"
    else record "$name" 0 "exit $rc, expected $want, $LAST_S s"; sed 's/^/    | /' "$LAST_LOG" | tail -15; fi
}
# compare A B: every dataset bit-identical (the same paths, dtypes, shapes and bytes) and the same feature spec
compare() {
    "$PY" - "$@" <<'EOF'
import os, sys, h5py, numpy as np
def load(path):
    out = {}
    if not os.path.exists(path):
        sys.exit(f"{path}: missing")
    # The feature arrays; not /index (format_version 2): it holds each entry's attributes, whose paths and times
    # differ between the image and the local run by design (the groups' attributes are not compared either).
    def keep(name, obj):
        if isinstance(obj, h5py.Dataset) and not name.startswith("index/"):
            out[name] = obj[()]
    with h5py.File(path, "r") as f:
        f.visititems(keep)
        return out, f.attrs.get("feature_spec"), sorted(f.get("failed", {}))
(a, spec_a, failed_a), (b, spec_b, failed_b) = load(sys.argv[1]), load(sys.argv[2])
problems = []
if sorted(a) != sorted(b):
    problems.append(f"datasets differ: {sorted(set(a) ^ set(b))}")
for name in sorted(set(a) & set(b)):
    x, y = a[name], b[name]
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
        problems.append(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}, max |diff| "
                        f"{np.abs(x.astype(np.float64) - y.astype(np.float64)).max() if x.shape == y.shape else '-'}")
if spec_a != spec_b:
    problems.append(f"feature_spec differs: {spec_a} vs {spec_b}")
if failed_a or failed_b:
    problems.append(f"failures recorded: {failed_a} {failed_b}")
videos = sorted({n.split("/")[1] for n in a if n.startswith("videos/")})
print(f"{len(a)} datasets ({', '.join(videos)}; {sum(v.nbytes for v in a.values())} bytes) "
      + ("bit-identical" if not problems else "DIFFER: " + "; ".join(problems)))
sys.exit(1 if problems else 0)
EOF
}
compare_check() {  # compare_check NAME A B
    local out
    if out=$(compare "$2" "$3" 2>&1); then record "$1" 1 "$out"; else record "$1" 0 "$out"; fi
}

run_check "--help" 0 "${RUN[@]}" "$IMAGE" --help
grep -q "extract" "$LAST_LOG" || record "--help lists the commands" 0 "no 'extract' in the output"

log "local run of the same extract (the reference)"
# The image has no system ffmpeg, so it decodes with imageio-ffmpeg's static build; the reference must decode with the
# same binary (a host's own ffmpeg, e.g. Debian's 5.1, resamples audio differently: ~1.5e-5 in the VGGish embeddings).
IMAGE_FFMPEG=$("$PY" -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')
log "reference ffmpeg: $IMAGE_FFMPEG (the static build the image uses)"
run_check "local extract (reference, $(command -v avepipe))" 0 \
    env AVEPIPE_WEIGHTS_DIR="$WEIGHTS" AVEPIPE_FFMPEG="$IMAGE_FFMPEG" \
    avepipe extract "${LOCAL_PATHS[@]}" --cache "$WORK/local/f.h5" --vggish-weights random
LOCAL=$WORK/local/f.h5

IN_PATHS=()
for c in "${CLIPS[@]}"; do IN_PATHS+=("/videos/$c"); done
run_check "extract in the image (weights read-only, uid 1000, no network)" 0 "${RUN[@]}" \
    -v "$WEIGHTS:/weights:ro" -v "$DATA/videos:/videos:ro" -v "$WORK/plain:/out" \
    "$IMAGE" extract "${IN_PATHS[@]}" --cache /out/f.h5 --vggish-weights random
compare_check "extract in the image = local run" "$WORK/plain/f.h5" "$LOCAL"

# The Jobs, as their manifests define them: podman options and arguments from the YAML, at run time.
# k8s_run MANIFEST INDEX OUTFILE: writes the NUL-separated podman run options, then the image's arguments.
k8s_args() {
    /usr/bin/python3 - "$@" <<'EOF'
import json, os, re, sys, tempfile
import yaml

manifest, index, data, weights, out = sys.argv[1:6]
docs = [d for d in yaml.safe_load_all(open(manifest)) if d and d.get("kind") == "Job"]
job = docs[0]
pod = job["spec"]["template"]["spec"]
(container,) = pod["containers"]
notes = []
env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
notes += [f"env {e['name']} (valueFrom) not emulated" for e in container.get("env", []) if "value" not in e]
if job["spec"].get("completionMode") == "Indexed":
    env["JOB_COMPLETION_INDEX"] = index
opts = ["--network", "none"]
for k, v in env.items():
    opts += ["-e", f"{k}={v}"]
psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
uid, gid = csc.get("runAsUser", psc.get("runAsUser")), csc.get("runAsGroup", psc.get("runAsGroup"))
if uid is not None:
    opts += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
if (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")) and uid == 0:
    sys.exit("runAsNonRoot with runAsUser 0")
if psc.get("fsGroup") is not None:
    opts += ["--group-add", str(psc["fsGroup"])]
for g in psc.get("supplementalGroups", []):
    opts += ["--group-add", str(g)]
if csc.get("readOnlyRootFilesystem"):
    opts += ["--read-only", "--read-only-tmpfs=false"]
if csc.get("allowPrivilegeEscalation") is False:
    opts += ["--security-opt", "no-new-privileges"]
caps = csc.get("capabilities", {})
for c in caps.get("drop", []):
    opts += ["--cap-drop", c.lower()]
for c in caps.get("add", []):
    opts += ["--cap-add", c.lower()]
if container.get("workingDir"):
    opts += ["-w", container["workingDir"]]
volumes = {v["name"]: v for v in pod.get("volumes", [])}
for m in container.get("volumeMounts", []):
    v = volumes[m["name"]]
    target, ro = m["mountPath"], m.get("readOnly", False)
    if "persistentVolumeClaim" in v:
        sub = m.get("subPath", "")
        host = weights if sub == "weights" else os.path.join(data, sub)
        os.makedirs(host, exist_ok=True)
        opts += ["-v", f"{host}:{target}" + (":ro" if ro else "")]
    elif "emptyDir" in v:
        size = v["emptyDir"].get("sizeLimit")
        if target == "/dev/shm":
            opts += ["--shm-size", str(size).replace("Gi", "g").replace("Mi", "m") if size else "64m"]
        elif v["emptyDir"].get("medium") == "Memory":
            opts += ["--tmpfs", f"{target}:rw,mode=1777" + (f",size={size.replace('Gi', 'g').replace('Mi', 'm')}"
                                                              if size else "")]
        else:
            host = tempfile.mkdtemp(dir=os.path.dirname(data), prefix="emptydir-")
            os.chmod(host, 0o1777)
            opts += ["-v", f"{host}:{target}"]
    else:
        sys.exit(f"volume {m['name']}: {sorted(v)} not emulated by docker/smoke.sh")
args = list(container.get("args", []))
changes = []
def sub(pattern, repl, what):
    global args
    new = [re.sub(pattern, repl, a) for a in args]
    if new != args:
        changes.append(what)
    args = new
sub(r"(\bavepipe\s+extract\b)", r"\1 --vggish-weights random", "+ --vggish-weights random")
sub(r"--device(\s+|=)[\"']?cuda(:\d+)?[\"']?", r"--device\1cpu", "--device cuda -> cpu")
# Kubernetes expands $(VAR) in command and args from the container's environment ($$ escapes)
def expand(s):
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), s)
args = [expand(a) for a in args]
command = [expand(c) for c in container.get("command", [])]
if command:
    opts += ["--entrypoint", json.dumps(command)]
with open(out, "wb") as f:
    f.write(b"".join(o.encode() + b"\0" for o in opts) + b"--\0" + b"".join(a.encode() + b"\0" for a in args))
info = {"image_entrypoint_replaced": bool(command), "changes": changes, "notes": notes,
        "completions": job["spec"].get("completions"),
        "grace": pod.get("terminationGracePeriodSeconds", 30)}
print(json.dumps(info))
EOF
}
# k8s_cmd MANIFEST INDEX DATA_DIR [PODMAN_OPTION...]: fills the array K8S with the whole podman run command line
k8s_cmd() {
    local info opts=() args=() seen=0 x
    info=$(k8s_args "$1" "$2" "$3" "$WEIGHTS" "$WORK/k8s.args") || die "cannot read $1"
    while IFS= read -r -d '' x; do
        if [ "$seen" = 0 ] && [ "$x" = "--" ]; then seen=1; elif [ "$seen" = 0 ]; then opts+=("$x"); else args+=("$x"); fi
    done <"$WORK/k8s.args"
    K8S=(podman run "${@:4}" "${opts[@]}" "$IMAGE" "${args[@]}")
    K8S_INFO=$info
}

k8s_cmd "$EXTRACT_JOB" 0 "$DATA"
N_SHARDS=$(/usr/bin/python3 -c 'import json, sys; print(json.loads(sys.argv[1])["completions"])' "$K8S_INFO")
log "extract Job (docs/k8s/extract-job.yaml): $N_SHARDS shards; changes to its command: $K8S_INFO"
shard_of() {  # the documented shard function (docs/scale-out.md): first 8 bytes of SHA-1 of the id, big-endian, mod N
    /usr/bin/python3 -c 'import hashlib, sys; print(int.from_bytes(hashlib.sha1(sys.argv[1].encode()).digest()[:8], "big") % int(sys.argv[2]))' "$1" "$2"
}
declare -A CLIP_SHARD=()
for c in "${CLIPS[@]}"; do CLIP_SHARD[$c]=$(shard_of "${c%.*}" "$N_SHARDS"); done
# every index, as the Job runs them: the merge refuses an incomplete set of shards
mapfile -t INDEXES < <(seq 0 $((N_SHARDS - 1)))
log "shards: $(for c in "${CLIPS[@]}"; do printf '%s -> %s; ' "$c" "${CLIP_SHARD[$c]}"; done)running indexes 0..$((N_SHARDS - 1))"
for k in "${INDEXES[@]}"; do
    k8s_cmd "$EXTRACT_JOB" "$k" "$DATA" --rm --name "$NAME-extract-$k"
    run_check "extract Job, JOB_COMPLETION_INDEX=$k" 0 "${K8S[@]}"
done
# each clip in the shard cache of its index, and nowhere else
shard_ok=1; shard_detail=""; empty=0
for k in "${INDEXES[@]}"; do
    f=$DATA/shards/features-$k.h5
    got=""
    if [ -e "$f" ]; then
        got=$("$PY" -c 'import sys, h5py; print(" ".join(sorted(h5py.File(sys.argv[1], "r").get("videos", {}))))' "$f")
    fi
    want=""
    for c in "${CLIPS[@]}"; do if [ "${CLIP_SHARD[$c]}" = "$k" ]; then want+="${want:+ }${c%.*}"; fi; done
    if [ -n "$got" ]; then shard_detail+="features-$k.h5: $got; "; else empty=$((empty + 1)); fi
    [ "$got" = "$want" ] || shard_ok=0
done
record "each clip in the shard its id hashes to" "$shard_ok" "${shard_detail}$empty other shards empty"

k8s_cmd "$MERGE_JOB" 0 "$DATA" --rm --name "$NAME-merge"
run_check "merge Job (docs/k8s/merge-job.yaml)" 0 "${K8S[@]}"
compare_check "merged shard caches = local run" "$DATA/features.h5" "$LOCAL"

expect_message() {  # expect_message NAME REGEX: the last run's one-line error must match
    local line
    line=$(grep -iE "$2" "$LAST_LOG" | head -1 || true)
    if [ -n "$line" ]; then log "      message: $line"; else record "$1: a clear message" 0 "got: $(tail -1 "$LAST_LOG")"; fi
}

# --- 4. failures ---------------------------------------------------------------------------------------------------
mkdir -p "$WORK/root-owned"; chmod 755 "$WORK/root-owned"   # owned by root: not writable by uid 1000
run_check "unwritable output volume (root-owned) exits 2" 2 "${RUN[@]}" -v "$WEIGHTS:/weights:ro" \
    -v "$DATA/videos:/videos:ro" -v "$WORK/root-owned:/out" "$IMAGE" extract /videos/sample_1s.mp4 --cache /out/f.h5 \
    --vggish-weights random
expect_message "unwritable output volume" "error:.*(writ|permission)"
run_check "read-only output volume exits 2" 2 "${RUN[@]}" -v "$WEIGHTS:/weights:ro" \
    -v "$DATA/videos:/videos:ro" -v "$WORK/plain:/out:ro" "$IMAGE" extract /videos/sample_1s.mp4 --cache /out/g.h5 \
    --vggish-weights random
expect_message "read-only output volume" "error:.*(writ|read-only)"
run_check "--device cuda without a GPU exits 2" 2 "${RUN[@]}" -v "$WEIGHTS:/weights:ro" -v "$DATA/videos:/videos:ro" \
    -v "$WORK/plain:/out" "$IMAGE" extract /videos/sample_1s.mp4 --cache /out/cuda.h5 --vggish-weights random --device cuda
expect_message "--device cuda" "error:.*cuda"

# wait_for CACHE ID CONTAINER: until the video is committed to the cache (or staged beside it)
wait_for() {
    HDF5_USE_FILE_LOCKING=FALSE "$PY" - "$@" <<'EOF'
import os, subprocess, sys, time, h5py
cache, vid, container = sys.argv[1:4]
deadline = time.time() + 600
while time.time() < deadline:
    if os.path.exists(os.path.join(cache + ".staging", vid + ".h5")):
        sys.exit(0)
    try:
        with h5py.File(cache, "r") as f:
            if f"videos/{vid}" in f:
                sys.exit(0)
    except OSError:
        pass
    state = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", container],
                           capture_output=True, text=True).stdout.strip()
    if state != "true":
        sys.exit(f"container ended before {vid} was finished")
    time.sleep(0.5)
sys.exit("timed out")
EOF
}
# stop_check NAME TIMEOUT CACHE FIRST_ID CONTAINER PODMAN_RUN_ARGS...: runs the container (the arguments must name it
# CONTAINER and detach it), stops it once FIRST_ID is finished
stop_check() {
    local name=$1 timeout=$2 cache=$3 first=$4 ctr=$5 t0 rc stop_s kept failed pid1
    shift 5
    "$@" >/dev/null 2>"$WORK/stop.err" || { record "$name" 0 "did not start: $(tail -1 "$WORK/stop.err")"; return; }
    if ! wait_for "$cache" "$first" "$ctr" 2>"$WORK/wait.err"; then
        record "$name" 0 "$(tail -1 "$WORK/wait.err")"; podman logs "$ctr" 2>&1 | tail -15 | sed 's/^/    | /'
        podman rm -f -t 0 "$ctr" >/dev/null 2>&1; return
    fi
    pid1=$(podman exec "$ctr" cat /proc/1/cmdline 2>/dev/null | tr '\0\n' '  ' | cut -c1-40 || true)
    t0=$(date +%s.%N)
    podman stop -t "$timeout" "$ctr" >/dev/null 2>&1 || true
    stop_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    rc=$(podman inspect --format '{{.State.ExitCode}}' "$ctr")
    podman logs "$ctr" >"$WORK/stop.log" 2>&1 || true
    podman rm -f -t 0 "$ctr" >/dev/null 2>&1 || true
    kept=$("$PY" -c 'import os, sys, h5py
c = sys.argv[1]; ids = set(h5py.File(c, "r").get("videos", {})) if os.path.exists(c) else set()
s = c + ".staging"; ids |= {f[:-3] for f in os.listdir(s) if f.endswith(".h5")} if os.path.isdir(s) else set()
print(" ".join(sorted(ids)))' "$cache")
    failed=$("$PY" -c 'import os, sys, h5py; c = sys.argv[1]; print(" ".join(h5py.File(c, "r").get("failed", {})) if os.path.exists(c) else "")' "$cache")
    local ok=1
    [ "$rc" = 143 ] || ok=0
    [[ " $kept " == *" $first "* ]] || ok=0
    [ -z "$failed" ] || ok=0
    grep -q "terminated (SIGTERM)" "$WORK/stop.log" || ok=0
    record "$name" "$ok" "exit $rc (143 expected, 137 = SIGKILL), stopped in $stop_s s, kept: ${kept:-none}, failed: ${failed:-none}, PID 1: $pid1"
    [ "$ok" = 1 ] || sed 's/^/    | /' "$WORK/stop.log" | tail -8
}

STOP=$WORK/stop
mkdir -p "$STOP/videos" "$STOP/out"
cp "$MEDIA/sample_1s.mp4" "$MEDIA/$LONG_CLIP" "$STOP/videos/"
chown -R 1000:1000 "$STOP"
stop_check "podman stop -t 10 during an extract" 10 "$STOP/out/f.h5" sample_1s "$NAME-stop1" \
    podman run -d --name "$NAME-stop1" --network none --user 1000:1000 --shm-size 1g -v "$WEIGHTS:/weights:ro" \
    -v "$STOP/videos:/videos:ro" -v "$STOP/out:/out" "$IMAGE" \
    extract /videos/sample_1s.mp4 "/videos/$LONG_CLIP" --cache /out/f.h5 --vggish-weights random

# The Job's pod: its shell is PID 1 (the manifest's command replaces the image's entrypoint). A data volume with a short
# and the long clip of one shard; stopped with the pod's grace period, as the kubelet does.
JOBSTOP=$WORK/jobstop
K=$(shard_of "${LONG_CLIP%.*}" "$N_SHARDS")
SHORT=""
for f in "$MEDIA"/*; do
    b=$(basename "$f"); [ "$b" != "$LONG_CLIP" ] && [ "$(stat -c %s "$f")" -lt 200000 ] || continue
    [ "$(shard_of "${b%.*}" "$N_SHARDS")" = "$K" ] && { SHORT=$b; break; }
done
[ -n "$SHORT" ] || die "no short clip in shard $K of $N_SHARDS next to $LONG_CLIP: choose other clips"
mkdir -p "$JOBSTOP/videos"
cp "$MEDIA/$SHORT" "$MEDIA/$LONG_CLIP" "$JOBSTOP/videos/"
chown -R 1000:1000 "$JOBSTOP"
k8s_cmd "$EXTRACT_JOB" "$K" "$JOBSTOP" -d --name "$NAME-stop2"
GRACE=$(/usr/bin/python3 -c 'import json, sys; print(json.loads(sys.argv[1])["grace"])' "$K8S_INFO")
stop_check "podman stop -t $GRACE during the extract Job (index $K: $SHORT, $LONG_CLIP)" "$GRACE" \
    "$JOBSTOP/shards/features-$K.h5" "${SHORT%.*}" "$NAME-stop2" "${K8S[@]}"

# --- summary -------------------------------------------------------------------------------------------------------
TOTAL_S=$(( $(date +%s) - T_START ))
log "times: cold build $COLD_S s, rebuild after a .py change $WARM_S s, whole smoke test $TOTAL_S s"
log "image: $(awk -v b="$SIZE" 'BEGIN { printf "%.2f GB", b / 1e9 }')"
if [ "${#FAILED[@]}" -gt 0 ]; then
    log "RESULT: FAIL ($PASSED passed, ${#FAILED[@]} failed: $(IFS=';'; echo "${FAILED[*]}"))"
    exit 1
fi
log "RESULT: PASS ($PASSED checks passed)"

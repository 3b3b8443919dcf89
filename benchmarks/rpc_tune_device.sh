#!/usr/bin/env bash
# Remote measurement end to end on one CUDA GPU machine: a TVM RPC tracker and an RPC server
# (with the GPU) on loopback, then `shardtune tune --rpc-tracker` into DB, the best records'
# table, and both servers stopped. Candidates are built by the tuning process and run by the
# server's session processes, as they would be on a remote GPU.
#
#   bash benchmarks/rpc_tune_device.sh DB [more tune arguments, e.g. --time-budget 10m]
#
# Environment: RPC_PORT (default 9190; the server takes a port from 9300), RPC_KEY (default h100),
# ARCH (default sm_90), MODEL (default llama2-7b), TRIALS (per kernel, default 8), PYTHON (default python3).
# (ARCH=cpu MODEL=tiny TRIALS=2 runs the same thing on a machine without a GPU.)
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${1:?usage: bash benchmarks/rpc_tune_device.sh DB [tune arguments...]}
shift
PY=${PYTHON:-python3}
# Lent GPU machines: TVM from the staged parts, this checkout importable as shardtune.
if ! "$PY" -c "import tvm, shardtune" 2>/dev/null && [ -f .device/part2/setup.sh ]; then
  source benchmarks/device_env.sh
fi
PORT=${RPC_PORT:-9190}
KEY=${RPC_KEY:-h100}
LOGS=$(mktemp -d)

groups=()
stop() {  # each server runs in its own process group: TVM's real work is in child processes
  for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  sleep 1
  for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
  echo "servers stopped (logs in $LOGS)"
}
trap stop EXIT

setsid "$PY" -m tvm.exec.rpc_tracker --host 127.0.0.1 --port "$PORT" --port-end "$((PORT + 1))" \
  >"$LOGS/tracker.log" 2>&1 &
groups+=($!)

# The RPC server under a supervisor. When a session's process dies with an error (a kernel
# that crashes, a client gone mid-call) TVM's server stops serving while its process stays:
# the tracker stops listing it, and the supervisor starts a new one.
setsid "$PY" - "$PORT" "$KEY" >"$LOGS/server.log" 2>&1 <<'EOF' &
import os, signal, subprocess, sys, time
from shardtune.tuner.remote import _count, _summary

port, key = int(sys.argv[1]), sys.argv[2]
server = None

def kill(*_):
    if server is not None:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()

def on_term(*_):
    kill()
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)

def listed():
    try:
        return _count(_summary("127.0.0.1", port), key)[0]
    except (OSError, RuntimeError):
        return 0

while True:
    # --no-fork: sessions are spawned, not forked. A forked session inherits the server's CUDA
    # state and fails with cudaErrorInitializationError on the first GPU call.
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--no-fork", "--host", "127.0.0.1",
                               "--port", "9300", "--port-end", "9400", "--tracker", f"127.0.0.1:{port}",
                               "--key", key], start_new_session=True)
    deadline = time.time() + 120
    while not listed() and time.time() < deadline:
        time.sleep(0.5)
    misses = 0
    while misses < 3:   # three polls in a row without it: it is gone
        time.sleep(1)
        misses = 0 if listed() else misses + 1
    print(f"{time.strftime('%H:%M:%S')} RPC server gone from the tracker: restarting", flush=True)
    kill()
EOF
groups+=($!)

"$PY" - "$PORT" "$KEY" <<'EOF'
import sys, time
from shardtune.tuner.remote import _count, _summary

port, key = int(sys.argv[1]), sys.argv[2]
deadline = time.time() + 120
while time.time() < deadline:
    try:
        if _count(_summary("127.0.0.1", port), key)[0]:
            print(f"tracker 127.0.0.1:{port} lists a server under key {key}")
            sys.exit(0)
    except (OSError, RuntimeError):
        pass
    time.sleep(0.5)
sys.exit("the RPC server did not register with the tracker in 2 minutes")
EOF

"$PY" -c "import tvm; d = tvm.cuda(0); print('GPU:', d.device_name, 'sm_' + d.compute_version.replace('.', ''))" \
  2>/dev/null || echo "no CUDA GPU visible to this process"
ARCH=${ARCH:-sm_90}
"$PY" -m shardtune tune --arch "$ARCH" --model "${MODEL:-llama2-7b}" --shards 1 \
  --rpc-tracker "127.0.0.1:$PORT" --rpc-key "$KEY" --trials-per-kernel "${TRIALS:-8}" --db "$DB" --no-progress "$@"
echo
# Records of --arch cpu carry the machine's name.
"$PY" -m shardtune db best --arch "$([ "$ARCH" = cpu ] && uname -m || echo "$ARCH")" --shards 1 "$DB"
grep -h "restarting" "$LOGS/server.log" || true

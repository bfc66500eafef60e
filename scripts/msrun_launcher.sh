#!/bin/bash
# MindFormers-compatible launcher over MindSpore's `msrun` (dynamic cluster: one scheduler + N workers).
#
#   bash scripts/msrun_launcher.sh "CMD" [WORKER_NUM]
#   bash scripts/msrun_launcher.sh "CMD" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   bash scripts/msrun_launcher.sh "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN \
#        CLUSTER_TIME_OUT
#
# What it adds to a bare `msrun`:
#   * CMD ("script.py args...", or "python script.py args...") is split like a shell would (quotes kept), and
#     the script path is made absolute against the current directory, so the launcher works from any directory.
#   * PYTHONPATH starts with the project root (the folder above scripts/).
#   * It always waits for the job and exits non-zero when a worker fails, whatever JOIN says: msrun itself runs
#     with --join=True; JOIN only decides whether worker logs are also streamed to this console.
#   * Several "nodes" on ONE host (NODE_RANK > 0 with MASTER_ADDR local to this host, e.g. 127.0.0.1): msrun
#     would start a second scheduler there, which fails to bind the master port and makes the node exit 1 even
#     though its workers succeed. Such a node's workers are started directly with the environment msrun gives
#     workers (MS_WORKER_NUM, MS_SCHED_HOST, MS_SCHED_PORT, MS_TOPO_TIMEOUT, MS_ROLE=MS_WORKER, MS_NODE_ID,
#     RANK_ID, RANK_SIZE, DEVICE_ID; see mindspore/parallel/cluster/process_entity/_api.py) and watched here.
#   * When the job fails, it prints to stderr, for each failed worker of this node (msrun path: each worker of
#     this node whose log shows an error, as msrun does not say which rank failed; then scheduler.log if no
#     worker log does), the log path and its last error lines: the final exception (or a line like
#     `run_mindformer.py: error: ...`) and the latest lines matching error/Error/ERROR/Traceback/Exception, at
#     most 15, MindSpore/MindFormers INFO/WARNING lines left out.
#
# MSRUN_LAUNCHER_DRY_RUN=1 prints the msrun command (or the worker environment) instead of running it.
#
# Exit status: 0 when every worker of this node exits 0; 2 on a usage error; non-zero (1 or msrun's status)
# when a worker or the scheduler fails.

set -u

usage() {
  cat <<'EOF'
Usage:
  bash msrun_launcher.sh "CMD"
      8 workers on this machine, defaults below.
  bash msrun_launcher.sh "CMD" WORKER_NUM
      WORKER_NUM workers on this machine.
  bash msrun_launcher.sh "CMD" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
      one machine, explicit port, log folder, join flag and cluster timeout.
  bash msrun_launcher.sh "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
      one node of a multi-node job: run it on every node with that node's NODE_RANK.
  bash msrun_launcher.sh -h | --help

  CMD               python script (path relative to the current directory) and its arguments, in one quoted
                    string, e.g. "../../run_mindformer.py --config run_train_deepseek2_236B.yaml --run_mode train";
                    may start with python/python3.
  WORKER_NUM        total number of workers (processes/cards) of the job      default 8
  LOCAL_WORKER      workers started on this node                              default WORKER_NUM
  MASTER_ADDR       address of node 0 (where the scheduler runs)             default 127.0.0.1
  MASTER_PORT       scheduler port on MASTER_ADDR                             default 8118
  NODE_RANK         index of this node; its workers get ranks
                    NODE_RANK*LOCAL_WORKER ... NODE_RANK*LOCAL_WORKER+LOCAL_WORKER-1   default 0
  LOG_DIR           worker_<rank>.log and scheduler.log go here               default output/msrun_log
  JOIN              True: also stream worker logs to this console; False: logs only in LOG_DIR.
                    Either way the launcher waits and exits non-zero when a worker fails.   default False
  CLUSTER_TIME_OUT  seconds to wait for the cluster to form (negative: forever)   default 7200

Exit status: 0 all workers of this node succeeded; 1 (or msrun's status) a worker/scheduler failed; 2 usage error.
EOF
}

die_usage() {
  echo "msrun_launcher.sh: error: $*" >&2
  usage >&2
  exit 2
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_int() { [[ "$1" =~ ^-?[0-9]+$ ]]; }

if [ $# -ge 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then
  usage
  exit 0
fi

# ---------------------------------------------------------------- positional arguments (MindFormers defaults)
EXECUTE_ORDER="${1:-}"
WORKER_NUM=8
MASTER_ADDR="127.0.0.1"
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR="output/msrun_log"
JOIN="False"
CLUSTER_TIME_OUT=7200
case $# in
  1) ;;
  2) WORKER_NUM="$2" ;;
  6) WORKER_NUM="$2"; MASTER_PORT="$3"; LOG_DIR="$4"; JOIN="$5"; CLUSTER_TIME_OUT="$6" ;;
  9) WORKER_NUM="$2"; LOCAL_WORKER="$3"; MASTER_ADDR="$4"; MASTER_PORT="$5"; NODE_RANK="$6"; LOG_DIR="$7"
     JOIN="$8"; CLUSTER_TIME_OUT="$9" ;;
  *) die_usage "expected 1, 2, 6 or 9 arguments, got $#" ;;
esac
LOCAL_WORKER="${LOCAL_WORKER:-$WORKER_NUM}"

[ -n "$EXECUTE_ORDER" ] || die_usage "CMD (argument 1) is empty"
is_uint "$WORKER_NUM" && [ "$WORKER_NUM" -gt 0 ] || die_usage "WORKER_NUM must be a positive integer, got '$WORKER_NUM'"
is_uint "$LOCAL_WORKER" && [ "$LOCAL_WORKER" -gt 0 ] \
  || die_usage "LOCAL_WORKER must be a positive integer, got '$LOCAL_WORKER'"
[ "$LOCAL_WORKER" -le "$WORKER_NUM" ] || die_usage "LOCAL_WORKER=$LOCAL_WORKER exceeds WORKER_NUM=$WORKER_NUM"
is_uint "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
  || die_usage "MASTER_PORT must be an integer in [1, 65535], got '$MASTER_PORT'"
is_uint "$NODE_RANK" || die_usage "NODE_RANK must be a non-negative integer, got '$NODE_RANK'"
is_int "$CLUSTER_TIME_OUT" || die_usage "CLUSTER_TIME_OUT must be an integer (seconds), got '$CLUSTER_TIME_OUT'"
[ -n "$MASTER_ADDR" ] || die_usage "MASTER_ADDR is empty"
[ -n "$LOG_DIR" ] || die_usage "LOG_DIR is empty"
case "${JOIN,,}" in
  true) JOIN="True" ;;
  false) JOIN="False" ;;
  *) die_usage "JOIN must be True or False, got '$JOIN'" ;;
esac
if [ "$WORKER_NUM" -gt "$LOCAL_WORKER" ] && [ $(( (NODE_RANK + 1) * LOCAL_WORKER )) -gt "$WORKER_NUM" ]; then
  die_usage "NODE_RANK=$NODE_RANK x LOCAL_WORKER=$LOCAL_WORKER leaves no rank below WORKER_NUM=$WORKER_NUM"
fi

# ---------------------------------------------------------------- paths
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT_ROOT="$(dirname "$SCRIPT_DIR")"
export PYTHONPATH="$PROJECT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="python"   # msrun starts workers with `python` from PATH; use the same interpreter here

# Split CMD like a shell (quotes group words, no expansion), re-quoted so `eval` only rebuilds the words.
if ! QUOTED_CMD="$("$PYTHON" -c 'import shlex, sys
print(" ".join(shlex.quote(word) for word in shlex.split(sys.argv[1])))' "$EXECUTE_ORDER" 2>&1)"; then
  die_usage "cannot split CMD '$EXECUTE_ORDER': $QUOTED_CMD"
fi
eval "CMD_WORDS=($QUOTED_CMD)"
[ ${#CMD_WORDS[@]} -gt 0 ] || die_usage "CMD (argument 1) holds no words"
# msrun runs `python SCRIPT ARGS` unless the first word already is python/python3/pytest.
SCRIPT_INDEX=0
case "${CMD_WORDS[0]}" in
  python|python3|pytest) SCRIPT_INDEX=1 ;;
esac
if [ ${#CMD_WORDS[@]} -gt "$SCRIPT_INDEX" ]; then
  SCRIPT_PATH="${CMD_WORDS[$SCRIPT_INDEX]}"
  if [ -e "$SCRIPT_PATH" ]; then
    CMD_WORDS[$SCRIPT_INDEX]="$(cd "$(dirname "$SCRIPT_PATH")" && pwd)/$(basename "$SCRIPT_PATH")"
  elif [ "$SCRIPT_INDEX" -eq 0 ] || [[ "$SCRIPT_PATH" == *.py ]]; then
    echo "msrun_launcher.sh: error: script '$SCRIPT_PATH' of CMD not found (relative to $(pwd))" >&2
    exit 2
  fi
fi

case "$LOG_DIR" in
  /*) ;;
  *) LOG_DIR="$(pwd)/${LOG_DIR#./}" ;;
esac
DRY_RUN="${MSRUN_LAUNCHER_DRY_RUN:-0}"   # 1: print what would be started, start nothing
if [ "$DRY_RUN" != "1" ]; then
  mkdir -p "$LOG_DIR" || { echo "msrun_launcher.sh: error: cannot create LOG_DIR '$LOG_DIR'" >&2; exit 2; }
fi

# Ranks of this node, as msrun numbers them.
if [ "$LOCAL_WORKER" -eq "$WORKER_NUM" ]; then
  FIRST_RANK=0                           # single node: msrun ignores NODE_RANK
else
  FIRST_RANK=$(( NODE_RANK * LOCAL_WORKER ))
fi

# Is MASTER_ADDR an address of this host? Prints the resolved IP; exit 0 local, 1 remote, 2 unresolvable.
master_probe() {
  "$PYTHON" - "$1" <<'EOF'
import ipaddress, socket, sys
addr = sys.argv[1].strip().strip("[]")
try:
    ip = socket.getaddrinfo(addr, None, socket.AF_UNSPEC, socket.SOCK_STREAM)[0][4][0]
except (OSError, IndexError):
    sys.exit(2)
print(ip)
if ipaddress.ip_address(ip).is_loopback:
    sys.exit(0)
with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as sock:
    try:
        sock.bind((ip, 0))          # binding works only for an address of this host
    except OSError:
        sys.exit(1)
sys.exit(0)
EOF
}

MASTER_IP="$(master_probe "$MASTER_ADDR")"
MASTER_STATE=$?
[ "$MASTER_STATE" -ne 2 ] || { echo "msrun_launcher.sh: error: cannot resolve MASTER_ADDR '$MASTER_ADDR'" >&2; exit 2; }

DIRECT_WORKERS=0
if [ "$LOCAL_WORKER" -lt "$WORKER_NUM" ] && [ "$NODE_RANK" -gt 0 ] && [ "$MASTER_STATE" -eq 0 ]; then
  DIRECT_WORKERS=1
fi

echo "msrun_launcher.sh: $WORKER_NUM workers in total, $LOCAL_WORKER on this node (node_rank $NODE_RANK)," \
     "master $MASTER_ADDR:$MASTER_PORT, join $JOIN, cluster_time_out $CLUSTER_TIME_OUT"
echo "msrun_launcher.sh: command: ${CMD_WORDS[*]}"
echo "msrun_launcher.sh: PYTHONPATH=$PYTHONPATH"
for (( i = 0; i < LOCAL_WORKER; i++ )); do
  echo "msrun_launcher.sh: rank $(( FIRST_RANK + i )) log: $LOG_DIR/worker_$(( FIRST_RANK + i )).log"
done
if [ "$DIRECT_WORKERS" -eq 0 ] && [ "$MASTER_STATE" -eq 0 ]; then
  echo "msrun_launcher.sh: scheduler log: $LOG_DIR/scheduler.log"
fi

# ---------------------------------------------------------------- failure report: the last error lines of logs
# report_errors START_EPOCH KIND NAME LOG [KIND NAME LOG ...] prints, to stdout, a short block per log:
#   KIND "failed:STATUS"  a worker known to have failed: its error lines (or, if none, its last lines);
#   KIND "worker"         a worker that may have failed: its error lines, nothing if its log shows none;
#   KIND "scheduler"      only when no block was printed for the logs before it: its error lines.
# "worker"/"scheduler" logs last written before START_EPOCH (left by an earlier job) are skipped.
# Exit status 0 when some block was printed, 1 otherwise.
report_errors() {
  "$PYTHON" - "$@" <<'EOF'
import os, re, sys

MAX_LINES = 15                 # error lines per log
MAX_CHARS = 300                # a longer line is cut
TAIL_BYTES = 1 << 20           # only the end of a log is read
ERROR = re.compile(r"error|Error|ERROR|Traceback|Exception")
NOISE = re.compile(r"^\s*\[(DEBUG|INFO|WARNING|WARN)\]"          # MindSpore: [WARNING] ME(pid,...):time [...] ...
                   r"|^\S.{0,200}? - (DEBUG|INFO|WARNING) - "      # MindFormers: time - name[file:line] - INFO - ...
                   r"|^\S+:\d+: [A-Z]\w*Warning: ")                # Python warnings: file.py:12: UserWarning: ...
USAGE_ERROR = re.compile(r"^\S+: error: ")                         # argparse-style: run_mindformer.py: error: ...
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def read_tail(path):
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - TAIL_BYTES))
        data = handle.read()
    lines = [ANSI.sub("", line).rstrip() for line in data.decode("utf-8", "replace").splitlines()]
    return lines[1:] if size > TAIL_BYTES else lines      # the first line may be cut


def cut(line):
    return line if len(line) <= MAX_CHARS else line[:MAX_CHARS] + " ..."


def error_lines(lines):
    """The lines to show (in log order, "..." where a traceback's frames are left out); [] if none."""
    priority = {}                                   # line index -> 0 (the cause), 1 (its context), 2 (other)
    final = None                                    # (first, last) line of the final traceback
    tb = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")),
             default=None)
    if tb is not None:
        i, frame = tb + 1, None
        while i < len(lines) and lines[i][:1] in (" ", "\t"):       # frames: "  File ...", "    code", "    ^^^"
            if lines[i].lstrip().startswith('File "'):
                frame = i
            i += 1
        priority[tb] = 1
        if frame is not None:
            priority[frame] = 1
            if frame + 1 < i and not lines[frame + 1].lstrip().startswith(('File "', "^", "~")):
                priority[frame + 1] = 1
        start = i
        while i < len(lines) and i - start < 4 and lines[i].strip() and not NOISE.search(lines[i]) \
                and not lines[i].startswith("-----"):
            priority[i] = 0                         # the exception line(s)
            i += 1
        final = (tb, i - 1)
    usage = [i for i, line in enumerate(lines) if USAGE_ERROR.search(line)]
    if usage:
        priority[usage[-1]] = 0
    similar = {}                                    # other error lines, the latest first; lines that differ
    for i in range(len(lines) - 1, -1, -1):         # only in numbers (pids, times, counters) are shown once
        line = lines[i]
        if i in priority or (final and final[0] <= i <= final[1]) or not ERROR.search(line) or NOISE.search(line):
            continue
        key = re.sub(r"\d+", "#", line)
        if key in similar:
            similar[key][1] += 1
        else:
            similar[key] = [i, 1]
            priority[i] = 2
    repeats = {i: count for i, count in similar.values() if count > 1}
    chosen = sorted(sorted(priority, key=lambda i: (priority[i], -i))[:MAX_LINES])
    shown, previous = [], None
    for i in chosen:
        if final and previous is not None and final[0] <= previous and i <= final[1] \
                and any(lines[j].lstrip().startswith('File "') for j in range(previous + 1, i)):
            shown.append("  ...")                   # frames left out
        shown.append(cut(lines[i]) + (f"  [{repeats[i]} similar lines]" if i in repeats else ""))
        previous = i
    return shown


def last_lines(lines, count=8):
    kept = [line for line in lines if line.strip() and not NOISE.search(line)]
    return [cut(line) for line in kept[-count:]]


def main(argv):
    start, entries = float(argv[0]), [argv[i:i + 3] for i in range(1, len(argv) - 2, 3)]
    printed = False
    for kind, name, path in entries:
        if kind == "scheduler" and printed:
            continue
        failed = kind.startswith("failed:")
        try:
            if not failed and os.path.getmtime(path) < start - 1:
                continue                            # left by an earlier job
            lines = read_tail(path)
        except OSError as exc:
            if failed:
                print(f"msrun_launcher.sh: {name} failed (exit status {kind[7:]}); cannot read its log {path}: "
                      f"{exc.strerror}")
                printed = True
            continue
        shown = error_lines(lines)
        if failed and shown:
            print(f"msrun_launcher.sh: {name} failed (exit status {kind[7:]}); last error lines of {path}:")
        elif failed:
            shown = last_lines(lines)
            print(f"msrun_launcher.sh: {name} failed (exit status {kind[7:]}); no error line in {path}, "
                  f"its last lines:")
        elif shown and kind == "scheduler":
            print(f"msrun_launcher.sh: no worker log of this node shows an error; last error lines of {path}:")
        elif shown:
            print(f"msrun_launcher.sh: {name} log shows errors; last error lines of {path}:")
        else:
            continue
        for line in shown:
            print("    " + line)
        printed = True
    return 0 if printed else 1


sys.exit(main(sys.argv[1:]))
EOF
}

# ---------------------------------------------------------------- path 1: msrun (always joined)
run_with_msrun() {
  local msrun_cmd=(msrun)
  command -v msrun >/dev/null 2>&1 || msrun_cmd=("$PYTHON" -m mindspore.parallel.cluster.run)
  # JOIN False: tail no worker log (rank WORKER_NUM does not exist); JOIN True: msrun tails them all.
  local tail_arg="-1"
  [ "$JOIN" = "True" ] || tail_arg="$WORKER_NUM"
  local full=("${msrun_cmd[@]}" --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER"
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR"
    --join=True --cluster_time_out="$CLUSTER_TIME_OUT" --tail_worker_log="$tail_arg" "${CMD_WORDS[@]}")
  if [ "$DRY_RUN" = "1" ]; then
    echo "msrun_launcher.sh: dry run: $(printf '%q ' "${full[@]}")"
    return 0
  fi
  local start_epoch
  start_epoch="$(date +%s)"
  "${full[@]}" &
  local msrun_pid=$!
  # msrun kills its workers on SIGINT; forward INT/TERM to it.
  trap 'kill -INT '"$msrun_pid"' 2>/dev/null' INT TERM
  local status
  while true; do
    wait "$msrun_pid"
    status=$?
    kill -0 "$msrun_pid" 2>/dev/null || break   # wait was interrupted by a trapped signal: wait again
  done
  trap - INT TERM
  if [ "$status" -ne 0 ]; then
    # msrun does not say which rank failed: show every worker log of this node with errors (else scheduler.log).
    local -a entries=()
    local i
    for (( i = 0; i < LOCAL_WORKER; i++ )); do
      entries+=(worker "rank $(( FIRST_RANK + i ))" "$LOG_DIR/worker_$(( FIRST_RANK + i )).log")
    done
    entries+=(scheduler scheduler "$LOG_DIR/scheduler.log")
    report_errors "$start_epoch" "${entries[@]}" >&2
  fi
  return "$status"
}

# ---------------------------------------------------------------- path 2: workers without msrun's scheduler
WORKER_PIDS=()
kill_workers() {
  local pid
  for pid in "${WORKER_PIDS[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
  done
}

run_direct_workers() {
  echo "msrun_launcher.sh: MASTER_ADDR $MASTER_ADDR is this host and NODE_RANK=$NODE_RANK > 0: starting this" \
       "node's workers without a second msrun scheduler (it could not bind $MASTER_ADDR:$MASTER_PORT)"
  local cmd=("${CMD_WORDS[@]}")
  case "${cmd[0]}" in
    python|python3|pytest) ;;
    *) cmd=("$PYTHON" "${cmd[@]}") ;;
  esac
  local i rank log
  local -a logs=()
  for (( i = 0; i < LOCAL_WORKER; i++ )); do
    rank=$(( FIRST_RANK + i ))
    log="$LOG_DIR/worker_$rank.log"
    logs+=("$log")
    echo "msrun_launcher.sh: start worker rank $rank (RANK_ID=$rank, DEVICE_ID=$i), log file: $log"
    if [ "$DRY_RUN" = "1" ]; then
      echo "msrun_launcher.sh: dry run: MS_WORKER_NUM=$WORKER_NUM MS_SCHED_HOST=$MASTER_IP" \
           "MS_SCHED_PORT=$MASTER_PORT MS_TOPO_TIMEOUT=$CLUSTER_TIME_OUT MS_ROLE=MS_WORKER MS_NODE_ID=$rank" \
           "RANK_ID=$rank RANK_SIZE=$WORKER_NUM DEVICE_ID=$i $(printf '%q ' "${cmd[@]}")"
      continue
    fi
    MS_WORKER_NUM="$WORKER_NUM" MS_SCHED_HOST="$MASTER_IP" MS_SCHED_PORT="$MASTER_PORT" \
      MS_TOPO_TIMEOUT="$CLUSTER_TIME_OUT" MS_ROLE="MS_WORKER" MS_NODE_ID="$rank" RANK_ID="$rank" \
      RANK_SIZE="$WORKER_NUM" DEVICE_ID="$i" setsid "${cmd[@]}" >"$log" 2>&1 </dev/null &
    WORKER_PIDS+=($!)
  done
  [ "$DRY_RUN" = "1" ] && return 0
  local tail_pid=""
  if [ "$JOIN" = "True" ]; then
    tail -n +1 -F "${logs[@]}" 2>/dev/null &
    tail_pid=$!
  fi
  trap 'kill_workers; [ -n "'"$tail_pid"'" ] && kill '"$tail_pid"' 2>/dev/null; exit 130' INT TERM

  # Poll: a finished worker is reaped by bash, then `wait PID` returns its saved status.
  # Every worker found failed in the same round is reported (the others are then killed, and not reported).
  local -a running=("${WORKER_PIDS[@]}")
  local -a failed=()                       # report_errors entries: failed:STATUS "rank R" LOG
  local status=0 pid idx
  while [ ${#running[@]} -gt 0 ] && [ "$status" -eq 0 ]; do
    sleep 1
    for idx in "${!running[@]}"; do
      pid="${running[$idx]}"
      kill -0 "$pid" 2>/dev/null && continue
      wait "$pid"
      local rc=$?
      unset 'running[idx]'
      if [ "$rc" -ne 0 ]; then
        local failed_log=""
        for (( i = 0; i < LOCAL_WORKER; i++ )); do
          [ "${WORKER_PIDS[$i]}" = "$pid" ] && failed_log="${logs[$i]}" && rank=$(( FIRST_RANK + i ))
        done
        echo "msrun_launcher.sh: worker rank $rank (pid $pid) exited with status $rc; killing the others" >&2
        failed+=("failed:$rc" "rank $rank" "$failed_log")
        status=1
      fi
    done
  done
  [ "$status" -eq 0 ] || kill_workers
  wait "${WORKER_PIDS[@]}" 2>/dev/null
  if [ -n "$tail_pid" ]; then
    kill "$tail_pid" 2>/dev/null
    wait "$tail_pid" 2>/dev/null
  fi
  trap - INT TERM
  [ ${#failed[@]} -eq 0 ] || report_errors 0 "${failed[@]}" >&2
  return "$status"
}

if [ "$DIRECT_WORKERS" -eq 1 ]; then
  run_direct_workers
else
  run_with_msrun
fi
STATUS=$?
if [ "$DRY_RUN" = "1" ]; then
  exit "$STATUS"
elif [ "$STATUS" -eq 0 ]; then
  echo "msrun_launcher.sh: all $LOCAL_WORKER workers of this node finished OK; logs in $LOG_DIR"
else
  echo "msrun_launcher.sh: job FAILED (status $STATUS); see the logs in $LOG_DIR" >&2
fi
exit "$STATUS"

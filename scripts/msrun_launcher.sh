#!/bin/bash
# MindFormers' msrun_launcher.sh for this package: the same argument forms and defaults, over MindSpore's `msrun`
# (one scheduler + N workers). Beyond upstream's: CMD is split as a shell splits it (quotes kept) and its script
# path made absolute, so "../../run_mindformer.py ..." works from any directory; msrun always runs with
# --join=True, as without it msrun returns 0 at once whatever the workers do (JOIN only decides whether worker logs
# are also streamed here); a failed job prints the last error lines of the failed workers' logs to stderr.
# MSRUN_LAUNCHER_DRY_RUN=1 prints the msrun command (or the worker environment) and starts nothing.
# The Python it needs is research/deepseek2/run/launcher.py.

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

error() { echo "msrun_launcher.sh: error: $*" >&2; exit 2; }
die_usage() { echo "msrun_launcher.sh: error: $*" >&2; usage >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

case "${1:-}" in -h|--help) usage; exit 0 ;; esac

# MindFormers' defaults
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
[[ "$CLUSTER_TIME_OUT" =~ ^-?[0-9]+$ ]] \
  || die_usage "CLUSTER_TIME_OUT must be an integer (seconds), got '$CLUSTER_TIME_OUT'"
[ -n "$MASTER_ADDR" ] || die_usage "MASTER_ADDR is empty"
[ -n "$LOG_DIR" ] || die_usage "LOG_DIR is empty"
case "${JOIN,,}" in
  true) JOIN="True" ;;
  false) JOIN="False" ;;
  *) die_usage "JOIN must be True or False, got '$JOIN'" ;;
esac
[ "$WORKER_NUM" -gt "$LOCAL_WORKER" ] && [ $(( (NODE_RANK + 1) * LOCAL_WORKER )) -gt "$WORKER_NUM" ] \
  && die_usage "NODE_RANK=$NODE_RANK x LOCAL_WORKER=$LOCAL_WORKER leaves no rank below WORKER_NUM=$WORKER_NUM"

PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$PROJECT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="python"   # msrun starts workers with `python` from PATH; the helpers run with the same interpreter
WORK_DIR="$(pwd)"
# launcher.py runs from the project root: `python -m` puts the current directory first on sys.path, and a
# `research` folder there (MindFormers has one) would hide ours. run_helper replaces the shell it runs in, so that
# a signal sent to a background `run_helper ... &` ($!) reaches Python; helper runs it in a subshell.
run_helper() { cd "$PROJECT_ROOT" && exec "$PYTHON" -m research.deepseek2.run.launcher "$@"; }
helper() { (run_helper "$@"); }

# CMD's words come back shell-quoted, so `eval` only rebuilds them.
QUOTED_CMD="$(helper split "$EXECUTE_ORDER" 2>&1)" || die_usage "cannot split CMD '$EXECUTE_ORDER': $QUOTED_CMD"
eval "CMD_WORDS=($QUOTED_CMD)"
[ ${#CMD_WORDS[@]} -gt 0 ] || die_usage "CMD (argument 1) holds no words"
# msrun runs `python SCRIPT ARGS` unless the first word already is python/python3/pytest.
SCRIPT_INDEX=0
case "${CMD_WORDS[0]}" in python|python3|pytest) SCRIPT_INDEX=1 ;; esac
SCRIPT_PATH="${CMD_WORDS[SCRIPT_INDEX]:-}"
if [ -e "$SCRIPT_PATH" ]; then
  CMD_WORDS[SCRIPT_INDEX]="$(cd "$(dirname "$SCRIPT_PATH")" && pwd)/$(basename "$SCRIPT_PATH")"
elif [ "$SCRIPT_INDEX" -eq 0 ] || [[ "$SCRIPT_PATH" == *.py ]]; then
  error "script '$SCRIPT_PATH' of CMD not found (relative to $WORK_DIR)"
fi

[[ "$LOG_DIR" == /* ]] || LOG_DIR="$WORK_DIR/${LOG_DIR#./}"
DRY_RUN="${MSRUN_LAUNCHER_DRY_RUN:-0}"
[ "$DRY_RUN" = "1" ] || mkdir -p "$LOG_DIR" || error "cannot create LOG_DIR '$LOG_DIR'"
FIRST_RANK=$(( LOCAL_WORKER == WORKER_NUM ? 0 : NODE_RANK * LOCAL_WORKER ))   # msrun ignores NODE_RANK on one node
MASTER_IP="$(helper probe "$MASTER_ADDR")"
MASTER_STATE=$?   # 0: an address of this host, 1: another host's, 2: unresolvable
[ "$MASTER_STATE" -ne 2 ] || error "cannot resolve MASTER_ADDR '$MASTER_ADDR'"
DIRECT_WORKERS=0
[ "$LOCAL_WORKER" -lt "$WORKER_NUM" ] && [ "$NODE_RANK" -gt 0 ] && [ "$MASTER_STATE" -eq 0 ] && DIRECT_WORKERS=1

echo "msrun_launcher.sh: $WORKER_NUM workers in total, $LOCAL_WORKER on this node (node_rank $NODE_RANK)," \
     "master $MASTER_ADDR:$MASTER_PORT, join $JOIN, cluster_time_out $CLUSTER_TIME_OUT"
echo "msrun_launcher.sh: command: ${CMD_WORDS[*]}"
echo "msrun_launcher.sh: PYTHONPATH=$PYTHONPATH"
for (( rank = FIRST_RANK; rank < FIRST_RANK + LOCAL_WORKER; rank++ )); do
  echo "msrun_launcher.sh: rank $rank log: $LOG_DIR/worker_$rank.log"
done
if [ "$DIRECT_WORKERS" -eq 0 ] && [ "$MASTER_STATE" -eq 0 ]; then
  echo "msrun_launcher.sh: scheduler log: $LOG_DIR/scheduler.log"
fi

# Waits for the background job $!, passing INT/TERM on to it as SIGINT, on which it stops its workers: bash runs
# no trap while it waits for a foreground job, so a TERM would leave the workers running.
wait_forwarding() {
  CHILD_PID=$!
  trap 'kill -INT "$CHILD_PID" 2>/dev/null' INT TERM
  while true; do
    wait "$CHILD_PID"
    STATUS=$?
    kill -0 "$CHILD_PID" 2>/dev/null || break   # still running: a trapped signal interrupted `wait`
  done
  trap - INT TERM
  return "$STATUS"
}

run_with_msrun() {
  local msrun=(msrun) tail_rank=-1 start_epoch status rank entries=()
  command -v msrun >/dev/null 2>&1 || msrun=("$PYTHON" -m mindspore.parallel.cluster.run)
  [ "$JOIN" = "True" ] || tail_rank="$WORKER_NUM"   # a rank that does not exist: no worker log tailed
  local full=("${msrun[@]}" --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER"
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR"
    --join=True --cluster_time_out="$CLUSTER_TIME_OUT" --tail_worker_log="$tail_rank" "${CMD_WORDS[@]}")
  if [ "$DRY_RUN" = "1" ]; then
    echo "msrun_launcher.sh: dry run: $(printf '%q ' "${full[@]}")"
    return 0
  fi
  start_epoch="$(date +%s)"
  "${full[@]}" &
  wait_forwarding
  status=$?
  if [ "$status" -ne 0 ]; then
    # msrun does not say which rank failed: report each worker log of this node with errors, else scheduler.log.
    for (( rank = FIRST_RANK; rank < FIRST_RANK + LOCAL_WORKER; rank++ )); do
      entries+=(worker "rank $rank" "$LOG_DIR/worker_$rank.log")
    done
    helper report "$start_epoch" "${entries[@]}" scheduler scheduler "$LOG_DIR/scheduler.log" >&2
  fi
  return "$status"
}

# Several "nodes" on one host exist for the tests (tests/test_msrun_launcher.py runs 2-node jobs on 127.0.0.1):
# msrun on NODE_RANK > 0 would start a second scheduler there, which cannot bind the master port, and that node
# would exit 1 though its workers succeed. So such a node's workers are started by launcher.py's run_workers, with
# the environment msrun gives workers. On a real cluster MASTER_ADDR is another host and msrun runs as usual.
run_direct_workers() {
  echo "msrun_launcher.sh: MASTER_ADDR $MASTER_ADDR is this host and NODE_RANK=$NODE_RANK > 0: starting this" \
       "node's workers without a second msrun scheduler (it could not bind $MASTER_ADDR:$MASTER_PORT)"
  [ "$SCRIPT_INDEX" -eq 1 ] || CMD_WORDS=("$PYTHON" "${CMD_WORDS[@]}")
  run_helper workers "$WORK_DIR" "$WORKER_NUM" "$FIRST_RANK" "$LOCAL_WORKER" "$MASTER_IP" "$MASTER_PORT" \
    "$CLUSTER_TIME_OUT" "$LOG_DIR" "$JOIN" "$DRY_RUN" "${CMD_WORDS[@]}" &
  wait_forwarding
}

if [ "$DIRECT_WORKERS" -eq 0 ]; then
  run_with_msrun
else
  run_direct_workers
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

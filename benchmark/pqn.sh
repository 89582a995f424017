#!/usr/bin/env bash
# PQN benchmarks. Each block runs its commands with benchmark/run.py (resumable: run again, it skips
# the runs that finished and continues those stopped with a checkpoint) and then writes
# benchmark/results/<benchmark>.md and .png with benchmark/report.py.
#
#   classic  pqn_classic_control: pqn.py on CartPole-v1 and Acrobot-v1 (default flags) and on
#            MountainCar-v0 with --exploration-fraction 0.1 --q-lambda 0.95; 500k steps (the default),
#            32 seeds per env, trained in one process per env (--num-seeds 32).
#   atari    pqn_atari: pqn_atari_envpool.py on Breakout-v5, Pong-v5, BeamRider-v5; 10M steps.
#   lstm     pqn_atari_lstm: pqn_atari_envpool_lstm.py on Breakout-v5, BeamRider-v5; 10M steps.
#            The Atari blocks need a GPU and have not been timed on one here (for scale only:
#            cleanrl reports about 43 min per 10M-step run of its PQN on Atari with a GPU). On a
#            2-core CPU without GPU, PQN trained at 282–495 env steps/s over its first 49k steps
#            (benchmark/results/speed.md).
#   atari-cpu  pqn_atari_cpu: pqn_atari_envpool.py on Breakout-v5 (or CPU_ENVS), 2M steps, seed 1,
#            greedy evaluation every 500k steps and at the end (8 games): the Atari budget a CPU can run.
#   lstm-cpu   pqn_atari_lstm_cpu: the same for pqn_atari_envpool_lstm.py. Measured on that 2-core
#            CPU, atari-cpu and lstm-cpu side by side (two shells): 1 h 22 min to 1 h 31 min per run.
#   cartpole-epsilon  pqn_cartpole_epsilon: pqn.py on CartPole-v1, 32 seeds in one process, with three
#            epsilon schedules: the default (1 to 0.05 over half the run, cleanrl's), --end-e 0.2, and
#            --end-e 0.2 --exploration-fraction 0.2 (purejaxql's); 13-16 min each beside other runs.
#
# Usage (from anywhere):  bash benchmark/pqn.sh [classic] [atari] [lstm] [atari-cpu] [lstm-cpu] [cartpole-epsilon]
#                         (no argument: classic, atari and lstm)
# Environment variables:
#   SEEDS         the seeds (default "1 2 3"; "1" for classic, atari-cpu, lstm-cpu and cartpole-epsilon);
#                 with NUM_SEEDS, the first seed of each process
#   NUM_SEEDS     agents per process, pqn.py's --num-seeds (classic and cartpole-epsilon; default 32)
#   WORKERS       runs at a time (default 2 for classic, 1 for the others)
#   EXTRA_FLAGS   flags appended to every command, e.g. "--total-timesteps 100000"
#   SUFFIX        appended to the benchmark names (a run with other flags needs another name)
#   ATARI_ENVS, LSTM_ENVS   the env ids of the Atari blocks
#   CPU_ENVS      the env ids of atari-cpu and lstm-cpu (default Breakout-v5)
#   RUNNER_FLAGS  flags for run.py: "--dry-run" prints the commands; "--slurm --slurm-gpus 1" submits
#                 them as slurm jobs (see python benchmark/run.py --help); the report is then skipped
#   MACHINE       the machine line of the report (default: this machine's cores, CPU and GPU)
#   PYTHON        the Python to run (default: python)
# A smaller version (1 seed, 100k steps: 3 runs of 22–25 s each, 50 s in all on a 2-core CPU without GPU):
#   NUM_SEEDS=1 EXTRA_FLAGS="--total-timesteps 100000" SUFFIX=_short bash benchmark/pqn.sh classic
set -euo pipefail
cd "$(dirname "$0")/.."

# How the script was called, for the report: the variables above that are set, and the blocks.
invocation=$(for v in SEEDS NUM_SEEDS WORKERS EXTRA_FLAGS SUFFIX ATARI_ENVS LSTM_ENVS CPU_ENVS; do [ -z "${!v:-}" ] || printf '%s="%s" ' "$v" "${!v}"; done)
SELF=benchmark/pqn.sh
PYTHON=${PYTHON:-python}
# The CPU Atari presets are single runs (seed 1) unless SEEDS is given; classic runs its seeds in one process.
CPU_SEEDS=${SEEDS:-1}
CLASSIC_SEEDS=${SEEDS:-1}
NUM_SEEDS=${NUM_SEEDS:-32}
SEEDS=${SEEDS:-"1 2 3"}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
SUFFIX=${SUFFIX:-}
RUNNER_FLAGS=${RUNNER_FLAGS:-}
ATARI_ENVS=${ATARI_ENVS:-"Breakout-v5 Pong-v5 BeamRider-v5"}
LSTM_ENVS=${LSTM_ENVS:-"Breakout-v5 BeamRider-v5"}
CPU_ENVS=${CPU_ENVS:-Breakout-v5}
status=0

# machine: this machine's cores, CPU model and GPU, for the report.
machine() {
    local cpu gpu
    cpu=$(grep -m1 "model name" /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || true)
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
    echo "$(getconf _NPROCESSORS_ONLN)-core CPU${cpu:+ ($cpu)}, ${gpu:-no GPU}"
}

# quote WORD...: the words as a shell reads them back (single quotes where needed).
quote() {
    local word out=()
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=-]+$ ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}

# run BENCHMARK WORKERS EXP SCRIPT "ENV ..." FLAG...: one run.py call; a failure is remembered, not fatal.
# RUN_NUM_SEEDS (default 1) is run.py's --num-seeds.
run() {
    local benchmark=$1 workers=$2 exp=$3 script=$4 envs=$5
    shift 5
    # shellcheck disable=SC2086  # SEEDS, envs, RUNNER_FLAGS and EXTRA_FLAGS are lists of words
    $PYTHON benchmark/run.py --benchmark "$benchmark" --exp-name "$exp" --script "$script" --env-ids $envs \
        --seeds $SEEDS --num-seeds "${RUN_NUM_SEEDS:-1}" --workers "$workers" $RUNNER_FLAGS -- "$@" $EXTRA_FLAGS || status=1
}

# report BENCHMARK ARGS: the table and curves, unless the commands were only shown or submitted.
report() {
    local args=(--benchmark "$1" --machine "${MACHINE:-$(machine)}" --command "${invocation}bash $SELF${2:+ $2}")
    case " $RUNNER_FLAGS " in
        *" --dry-run "* | *" --slurm "*) echo "# when the runs have finished: python benchmark/report.py $(quote "${args[@]}")" ;;
        *) $PYTHON benchmark/report.py "${args[@]}" || status=1 ;;
    esac
}

blocks=("$@")
[ ${#blocks[@]} -gt 0 ] || blocks=(classic atari lstm)
for block in "${blocks[@]}"; do
    case $block in
        classic)
            name=pqn_classic_control$SUFFIX
            SEEDS=$CLASSIC_SEEDS RUN_NUM_SEEDS=$NUM_SEEDS run "$name" "${WORKERS:-2}" pqn pqn.py "CartPole-v1 Acrobot-v1"
            SEEDS=$CLASSIC_SEEDS RUN_NUM_SEEDS=$NUM_SEEDS run "$name" "${WORKERS:-2}" pqn pqn.py MountainCar-v0 \
                --exploration-fraction 0.1 --q-lambda 0.95
            report "$name" classic
            ;;
        atari)
            run "pqn_atari$SUFFIX" "${WORKERS:-1}" pqn pqn_atari_envpool.py "$ATARI_ENVS"
            report "pqn_atari$SUFFIX" atari
            ;;
        lstm)
            run "pqn_atari_lstm$SUFFIX" "${WORKERS:-1}" pqn pqn_atari_envpool_lstm.py "$LSTM_ENVS"
            report "pqn_atari_lstm$SUFFIX" lstm
            ;;
        atari-cpu | lstm-cpu)
            if [ "$block" = atari-cpu ]; then name=pqn_atari_cpu script=pqn_atari_envpool.py; else name=pqn_atari_lstm_cpu script=pqn_atari_envpool_lstm.py; fi
            SEEDS=$CPU_SEEDS run "$name$SUFFIX" "${WORKERS:-1}" pqn "$script" "$CPU_ENVS" \
                --total-timesteps 2000000 --eval-frequency 500000
            report "$name$SUFFIX" "$block"
            ;;
        cartpole-epsilon)
            name=pqn_cartpole_epsilon$SUFFIX
            SEEDS=$CLASSIC_SEEDS RUN_NUM_SEEDS=$NUM_SEEDS run "$name" "${WORKERS:-1}" pqn pqn.py CartPole-v1
            SEEDS=$CLASSIC_SEEDS RUN_NUM_SEEDS=$NUM_SEEDS run "$name" "${WORKERS:-1}" pqn_end_e_0.2 pqn.py CartPole-v1 \
                --end-e 0.2
            SEEDS=$CLASSIC_SEEDS RUN_NUM_SEEDS=$NUM_SEEDS run "$name" "${WORKERS:-1}" pqn_purejaxql_epsilon pqn.py CartPole-v1 \
                --end-e 0.2 --exploration-fraction 0.2
            report "$name" cartpole-epsilon
            ;;
        *)
            echo "error: unknown block $block (use classic, atari, lstm, atari-cpu, lstm-cpu or cartpole-epsilon)" >&2
            exit 2
            ;;
    esac
done
exit $status

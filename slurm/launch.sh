#!/usr/bin/env bash
# Body of slurm/{pretrain,finetune,linprobe}.sbatch: one `accelerate launch` per node of the allocation,
# joined into one process group whose rank-0 machine is the allocation's first node.
#
#   slurm/launch.sh MODULE [recipe=NAME] [key=value ...]        (inside an allocation)
#
# Environment (all optional):
#   MAE_PROCS_PER_NODE   training processes per node (default: the node's GPUs; 1 without GPUs)
#   ACCELERATE_CONFIG    accelerate config file (default: slurm/accelerate/{1node_8gpu,multinode_8gpu,cpu}.yaml)
#   MAE_MAIN_PORT        rendezvous port on the first node (default: derived from the job id)
set -euo pipefail

module=${1:?usage: launch.sh MODULE [recipe=NAME] [key=value ...]}
shift
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: not inside a SLURM allocation; submit with: sbatch slurm/${module#mae.}.sbatch recipe=NAME ..." >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The run directory comes from the job name, not the job id: a requeued (or resubmitted) job resumes there.
args=("$@")
has_output_dir=0
for a in "$@"; do [[ $a == output_dir=* ]] && has_output_dir=1; done
((has_output_dir)) || args+=("output_dir=runs/$SLURM_JOB_NAME")

gpus=${SLURM_GPUS_ON_NODE:-0}
nodes=${SLURM_JOB_NUM_NODES:-1}
per_node=${MAE_PROCS_PER_NODE:-$((gpus > 0 ? gpus : 1))}
[[ $per_node =~ ^[1-9][0-9]*$ ]] || { echo "error: MAE_PROCS_PER_NODE must be a positive integer, got '$per_node'" >&2; exit 2; }
if ((gpus > 0)); then
    default_config=$here/accelerate/$( ((nodes > 1)) && echo multinode_8gpu || echo 1node_8gpu).yaml
else
    default_config=$here/accelerate/cpu.yaml
    export ACCELERATE_USE_CPU=1
fi
config=${ACCELERATE_CONFIG:-$default_config}
[[ -f $config ]] || { echo "error: accelerate config not found: $config" >&2; exit 2; }

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
main_ip=$(scontrol show node -o "${hosts[0]}" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
main_ip=${main_ip:-${hosts[0]}}
main_port=${MAE_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# On SIGTERM the launcher passes the signal on and gives the training processes this long to checkpoint
# (SLURM's KillWait still bounds it) before it kills them.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
export MAE_LAUNCH_CONFIG=$config MAE_LAUNCH_MAIN=$main_ip MAE_LAUNCH_PORT=$main_port
export MAE_LAUNCH_TOTAL=$((nodes * per_node)) MAE_LAUNCH_MODULE=$module

echo "[$(date '+%F %T')] job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}:" \
    "$nodes node(s) x $per_node process(es), main process $main_ip:$main_port, config $config," \
    "args: ${args[*]}"

step=(--nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
# srun does not inherit --cpus-per-task from the batch allocation in every SLURM version.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

# Signals. SLURM signals every process of a job step (the warning --signal=USR1@N, scancel, preemption, the
# time limit): the training processes finish the step, checkpoint, exit 0 (and on SIGUSR1 ask for the
# requeue); their data workers ignore it. The launcher (torch elastic agent) ignores SIGUSR1 and SIGTERM and
# keeps watching its workers: by default it would forward SIGTERM, and a second SIGTERM during that
# forwarding makes it exit at once, which ends the step and kills the processes still checkpointing.
# shellcheck disable=SC2016  # expanded on each node: SLURM_NODEID is that node's rank
step_cmd='
    trap "" USR1 TERM
    export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT  # torchrun --signals-to-handle
    exec accelerate launch --config_file "$MAE_LAUNCH_CONFIG" \
        --num_machines "$SLURM_JOB_NUM_NODES" --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MAE_LAUNCH_MAIN" --main_process_port "$MAE_LAUNCH_PORT" \
        --num_processes "$MAE_LAUNCH_TOTAL" -m "$MAE_LAUNCH_MODULE" "$@"
'
# srun turns a SIGTERM it receives itself into SIGKILL for the whole step. Signals meant for this batch shell
# (scancel --batch / --full, --signal=B:...) are sent to its process group, so srun runs in a session of its
# own, and this shell passes them on to the step (where the training processes take them) and waits.
setsid srun "${step[@]}" bash -c "$step_cmd" launch "${args[@]}" &
srun_pid=$!
forward() {
    echo "[$(date '+%F %T')] job $SLURM_JOB_ID: SIG$1 to the batch shell; passed on to the training processes"
    # bounded: while SLURM is ending the job (requeue, time limit) scancel can block until KillWait, and a
    # late delivery would reach the requeued job's new processes
    timeout 3 scancel --signal="$1" "$SLURM_JOB_ID" >/dev/null 2>&1 || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
# The job ends when this shell does: it waits for srun, whatever signals arrive meanwhile.
while :; do
    status=0
    wait "$srun_pid" || status=$?
    # above 128 with srun still there (a zombie counts): a trapped signal cut the wait short
    ((status > 128)) && kill -0 "$srun_pid" 2>/dev/null && continue
    break
done
echo "[$(date '+%F %T')] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: exit status $status"
exit "$status"

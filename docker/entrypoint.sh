#!/usr/bin/env bash
# The pods' entrypoint (both images). The RunPod worker starts a pod with the command
# `prefect flow-run execute` and PREFECT__FLOW_RUN_ID in its env: run it. Without a command and without a
# flow run (a dev pod: `python -m ow_prefect.runpod.devpod`), stay up so that ssh and the terminal work.
set -euo pipefail

# The Hugging Face cache lives on the pod's volume when it has one (HF_HOME, see the Dockerfiles), so a
# restarted pod or the next run on the same network volume does not download the weights again.
mkdir -p "${HF_HOME:-/workspace/.cache/huggingface}"

# RunPod passes the account's (or --public-key's) ssh key as PUBLIC_KEY; images with sshd serve it.
if [[ -n "${PUBLIC_KEY:-}" ]] && command -v sshd >/dev/null; then
  mkdir -p ~/.ssh /run/sshd
  chmod 700 ~/.ssh
  echo "${PUBLIC_KEY}" >>~/.ssh/authorized_keys
  chmod 600 ~/.ssh/authorized_keys
  ssh-keygen -A >/dev/null
  /usr/sbin/sshd
fi

# CUDA forward compatibility (docs/runpod.md, "CUDA"): on a host driver older than 580 (no native CUDA 13), use the
# image's cuda-compat libcuda; never on a newer driver, where it would shadow the host's and break CUDA.
compat_dir="${OW_CUDA_COMPAT_DIR:-}"
if [[ -n "${compat_dir}" && -d "${compat_dir}" ]]; then
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
  if [[ -z "${driver}" && -r /proc/driver/nvidia/version ]]; then
    driver="$(sed -n 's/.*Kernel Module *\([0-9][0-9.]*\).*/\1/p' /proc/driver/nvidia/version | head -n 1)"
  fi
  if [[ "${driver%%.*}" =~ ^[0-9]+$ ]] && ((${driver%%.*} < 580)); then
    export LD_LIBRARY_PATH="${compat_dir}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
    echo "host driver ${driver} < 580: using CUDA forward compatibility from ${compat_dir}"
  fi
fi

# A pod kept warm between runs (keep_warm_seconds > 0: OW_KEEP_WARM_SECONDS) runs its commands through the agent
# (ow_prefect/runpod/agent.py), which asks for its next run itself, after the health check below.
warm=""
if [[ -n "${PREFECT__FLOW_RUN_ID:-}" && "${OW_KEEP_WARM_SECONDS:-0}" != "0" ]]; then
  warm=1
fi

# A restarted container whose flow run is already over (RunPod restarts a command that exited; the worker deletes
# the pod moments later) must not run it again: it stays idle until the worker deletes it (ow_prefect/runpod/run_state.py;
# whatever it cannot tell, a failed import included, means "run it"). The agent makes the same check per run.
if [[ -z "${warm}" && -n "${PREFECT__FLOW_RUN_ID:-}" ]] && python -m ow_prefect.runpod.run_state 2>/dev/null; then
  exec sleep infinity
fi

# The GPU health check (docs/runpod.md, "GPU health check"): the RunPod worker passes what it rented in
# OW_HEALTH_EXPECT. A pod that does not see it (no GPU, less memory, a driver too old for the image, a full disk)
# stops here, before the flow starts: the worker deletes it and retries the run on another GPU type or data center.
if [[ -n "${OW_HEALTH_EXPECT:-}" ]]; then
  python -m ow_prefect.runpod.health || exit $?
fi

if [[ -n "${warm}" ]]; then
  exec python -m ow_prefect.runpod.agent "$@"
fi
if [[ $# -gt 0 ]]; then
  exec "$@"
fi
if [[ -n "${PREFECT__FLOW_RUN_ID:-}" ]]; then
  exec prefect flow-run execute
fi
echo "ow_prefect image: no command and no flow run; staying up (dev pod). Stop the pod to end it."
exec sleep infinity

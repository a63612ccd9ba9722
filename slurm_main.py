"""Run ``main.py`` as one task of a SLURM job step (one task per GPU), e.g. via ``train_slurm.sh``:

    srun --ntasks 16 --ntasks-per-node 8 --gres gpu:8 python -u slurm_main.py --cfg configs/dat_base.yaml

SLURM describes the task (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
``SLURM_NODELIST``); torch.distributed wants ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. This file only translates one into the other and then
runs ``main`` unchanged, with the same command-line arguments. It also says what a stopped
run's checkpoint is good for in the mode the task runs in (:func:`resume_hint`), and keeps
SLURM's time-limit warning (SIGUSR1) that arrives during start-up until training can act on it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Callable, List, Mapping, Optional, Sequence

DEFAULT_PORT = 29501


class SlurmEnvError(ValueError):
    """The SLURM environment is missing or malformed; the message is one line."""


def _expand_range(body: str) -> List[str]:
    """``'01-03,07'`` -> ``['01', '02', '03', '07']`` (zero padding kept)."""
    out: List[str] = []
    for part in body.split(','):
        if '-' in part:
            lo, hi = part.split('-', 1)
            width = len(lo)
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif part:
            out.append(part)
    return out


def parse_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM host list without ``scontrol``: ``'gpu[01-02,05],cpu3'`` ->
    ``['gpu01', 'gpu02', 'gpu05', 'cpu3']``. Handles one bracket group per host name, which
    covers the forms SLURM prints for ordinary clusters."""
    hosts: List[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r'[^,\[]+(?:\[[^\]]*\])?[^,]*', nodelist):
        match = re.fullmatch(r'([^\[]*)\[([^\]]*)\](.*)', item)
        if match:
            prefix, body, suffix = match.groups()
            hosts.extend(prefix + h + suffix for h in _expand_range(body))
        elif item:
            hosts.append(item)
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` when available (it knows
    every syntax), otherwise :func:`parse_nodelist`."""
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = parse_nodelist(nodelist)
    if not hosts:
        raise SlurmEnvError(f"cannot read a host name from SLURM_NODELIST={nodelist!r}; "
                            f"set MASTER_ADDR to the first node's address")
    return hosts[0]


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None or value == '':
        raise SlurmEnvError(f"{name} is not set: slurm_main.py runs inside 'srun' (see train_slurm.sh); "
                            f"use main.py or train.sh outside SLURM")
    try:
        return int(value)
    except ValueError:
        raise SlurmEnvError(f"{name}={value!r} is not an integer") from None


def slurm_env_to_torch(env: Mapping[str, str],
                       resolve_host: Callable[[str], str] = first_host) -> dict:
    """torch.distributed's variables (strings) for the SLURM task described by ``env``.

    ``MASTER_ADDR`` / ``MASTER_PORT`` already in ``env`` win; otherwise the address is the first
    node of the job and the port is derived from the job id (so that two jobs sharing a node
    do not collide), or 29501 without one.
    """
    rank = _int(env, 'SLURM_PROCID')
    world_size = _int(env, 'SLURM_NTASKS')
    local_rank = _int(env, 'SLURM_LOCALID') if env.get('SLURM_LOCALID') else 0
    if not 0 <= rank < world_size:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is outside 0..SLURM_NTASKS-1 ({world_size} tasks)")
    addr = env.get('MASTER_ADDR')
    if not addr:
        nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_NODELIST') or env.get('SLURM_JOB_NODELIST')
        if not nodelist:
            raise SlurmEnvError("SLURM_NODELIST is not set: cannot tell the first node; set MASTER_ADDR")
        addr = resolve_host(nodelist)
    port = env.get('MASTER_PORT')
    if not port:
        job = env.get('SLURM_JOB_ID', '')
        port = str(20000 + int(job) % 20000) if job.isdigit() else str(DEFAULT_PORT)
    return {'RANK': str(rank), 'WORLD_SIZE': str(world_size), 'LOCAL_RANK': str(local_rank),
            'MASTER_ADDR': addr, 'MASTER_PORT': str(port)}


def resume_hint(signum: Optional[int] = None, env: Mapping[str, str] = os.environ) -> str:
    """What resumes a run whose state was just saved, true for the way this process was started:
    outside SLURM, in an interactive ``srun`` job (which SLURM cannot requeue), or in a batch job."""
    job = env.get('SLURM_JOB_ID')
    if not job:
        return "run the same command again to resume"
    if env.get('ENVIRONMENT') != 'BATCH':
        return (f"run the same command again to resume (SLURM job {job} is an interactive srun job, which "
                f"SLURM cannot requeue; 'train_slurm.sh --batch' submits a requeueable one)")
    if env.get('DAT_SLURM_REQUEUE_ON_WARNING') and signum == signal.SIGUSR1:
        return (f"batch job {job} resumes from it when requeued: its batch script requeues it after the "
                f"time-limit warning, and 'scontrol requeue {job}' does so by hand")
    return f"batch job {job} resumes from it when requeued ('scontrol requeue {job}'), as does submitting it again"


_held: List[int] = []


def _hold(signum: int, frame) -> None:
    _held.append(signum)


def hold_warning() -> None:
    """Until training starts, keep SLURM's time-limit warning (SIGUSR1, which would otherwise end
    the process) instead of dying of it; :func:`release_warning` delivers it."""
    if hasattr(signal, 'SIGUSR1') and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, _hold)


def release_warning() -> None:
    """Deliver a warning held since start-up to the handler installed now (the training loop's)."""
    if _held and hasattr(signal, 'SIGUSR1'):
        _held.clear()
        os.kill(os.getpid(), signal.SIGUSR1)


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Set the torch.distributed environment from SLURM's, then run ``main`` with ``argv``."""
    try:
        os.environ.update(slurm_env_to_torch(os.environ))
    except SlurmEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import main     # after the environment is set: nothing in main reads it at import, but be safe
    return main.run(argv)


if __name__ == '__main__':
    import slurm_main   # one copy of this module, whose held warning main.py releases
    slurm_main.hold_warning()       # first: SLURM may warn while the task is still importing torch
    sys.exit(slurm_main.run())

"""A real one-node SLURM for the launcher tests: Debian's ``slurmctld slurmd slurm-client munge``.

:func:`start_cluster` installs the packages when they are missing (as root), writes a minimal
``slurm.conf`` for this machine (its real CPUs and memory from ``slurmd -C``; linuxproc process
tracking, no task plugin, cons_tres, no accounting), a munge key, and starts ``munged`` (as the
munge user), ``slurmctld -D`` and ``slurmd -D`` in the background, each on ports and files of
its own under one temporary folder: a second cluster on the same machine (another test session)
does not interfere. Clients find it through ``SLURM_CONF``. :meth:`Cluster.stop` ends exactly the
daemons it started, by pid.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

PACKAGES = ('slurmctld', 'slurmd', 'slurm-client', 'munge')
DAEMONS = ('munged', 'slurmctld', 'slurmd', 'sinfo', 'srun', 'sbatch', 'scontrol', 'squeue', 'sacct')
# Seconds between SLURM's SIGTERM and its SIGKILL (30 by default): the tests that need a stop to be
# honoured before SIGKILL make 100 steps take longer. Not shorter: after saving, a task still needs
# a few seconds to exit (interpreter shutdown, ~2 s alone, more on a loaded machine).
KILL_WAIT = 20


class ClusterError(RuntimeError):
    """SLURM could not be brought up; the message says where it stopped."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def missing_reason() -> Optional[str]:
    """Why a cluster cannot be started here (None: it can, installing the packages if needed)."""
    if os.geteuid() != 0:
        return 'a test SLURM needs root (to start slurmd and munged)'
    if all(shutil.which(d) or os.path.exists(f'/usr/sbin/{d}') for d in DAEMONS[:3] + ('sinfo',)):
        return None
    if not shutil.which('apt-get'):
        return "SLURM is not installed and there is no apt-get to install " + ' '.join(PACKAGES)
    return None


def install_packages() -> None:
    if all(shutil.which(d) or os.path.exists(f'/usr/sbin/{d}') for d in DAEMONS[:3] + ('sinfo',)):
        return
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    for cmd in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def _node_line() -> str:
    """``NodeName=... CPUs=... RealMemory=...`` of this machine, as slurmd sees it."""
    out = subprocess.run(['slurmd', '-C'], capture_output=True, text=True, timeout=60).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith('NodeName=')), None)
    if line is None:
        raise ClusterError(f"'slurmd -C' did not describe this node: {out!r}")
    fields = dict(f.split('=', 1) for f in line.split())
    # Leave the other processes of the machine some memory; the tests ask for none.
    fields['RealMemory'] = str(max(int(fields.get('RealMemory', '1024')) - 512, 256))
    return ' '.join(f'{k}={v}' for k, v in fields.items()) + ' NodeAddr=127.0.0.1 State=UNKNOWN'


class Cluster:
    """One running test cluster: ``env`` points SLURM's clients at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / 'slurm.conf'
        self.procs: Dict[str, subprocess.Popen] = {}
        self.node = ''
        self.partition = 'debug'

    @property
    def env(self) -> Dict[str, str]:
        return {'SLURM_CONF': str(self.conf)}

    def client_env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
        env.update(self.env)
        return env

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.client_env(), capture_output=True, text=True, timeout=timeout)

    def debug(self) -> str:
        """What the cluster says now: for assertion messages."""
        return '\n'.join([self.run('sinfo', '-N', '-l').stdout, self.run('squeue', '-l').stdout, self.log_tail()])

    def log_tail(self) -> str:
        parts = []
        for name in ('munged.log', 'slurmctld.log', 'slurmd.log'):
            path = self.root / name
            if path.exists():
                parts.append(f'--- {name}\n' + '\n'.join(path.read_text(errors='replace').splitlines()[-15:]))
        return '\n'.join(parts)

    # ------------------------------------------------------------------ start / stop
    def write_config(self) -> None:
        root = self.root
        munge_dir = root / 'munge'
        munge = pwd.getpwnam('munge')
        munge_dir.mkdir()
        os.chmod(munge_dir, 0o711)          # munged: clients must reach its socket, nobody list it
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        key = munge_dir / 'munge.key'
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        for sub in ('ctld', 'spool'):
            (root / sub).mkdir()
        node = _node_line()
        self.node = node.split()[0].split('=', 1)[1]
        lines = [
            f'ClusterName=dat{os.getpid()}',
            f'SlurmctldHost={self.node}(127.0.0.1)',
            f'SlurmctldPort={_free_port()}',
            f'SlurmdPort={_free_port()}',
            'SlurmUser=root',
            'AuthType=auth/munge',
            'CredType=cred/munge',
            f'AuthInfo=socket={munge_dir}/munge.socket',
            f'StateSaveLocation={root}/ctld',
            f'SlurmdSpoolDir={root}/spool',
            f'SlurmctldPidFile={root}/slurmctld.pid',
            f'SlurmdPidFile={root}/slurmd.pid',
            f'SlurmctldLogFile={root}/slurmctld.log',
            f'SlurmdLogFile={root}/slurmd.log',
            'ProctrackType=proctrack/linuxproc',
            'TaskPlugin=task/none',
            'SelectType=select/cons_tres',
            'SelectTypeParameters=CR_CPU',
            'SchedulerType=sched/backfill',
            'JobAcctGatherType=jobacct_gather/none',
            'AccountingStorageType=accounting_storage/none',
            'JobCompType=jobcomp/none',
            'MpiDefault=none',
            'SwitchType=switch/none',
            'ReturnToService=2',
            'SlurmctldTimeout=30',
            'SlurmdTimeout=60',
            'InactiveLimit=0',
            f'KillWait={KILL_WAIT}',
            'MinJobAge=600',
            'JobRequeue=1',
            'SlurmctldDebug=info',
            'SlurmdDebug=info',
            node,
            f'PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP',
        ]
        self.conf.write_text('\n'.join(lines) + '\n')

    def _start(self, name: str, cmd: List[str], **kwargs) -> None:
        log = open(self.root / f'{name}.out', 'w')
        self.procs[name] = subprocess.Popen(cmd, env=self.client_env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, **kwargs)
        log.close()

    def start(self, timeout: float = 120) -> None:
        munge_dir = self.root / 'munge'
        self._start('munged', ['munged', '--foreground', f'--socket={munge_dir}/munge.socket',
                               f'--key-file={munge_dir}/munge.key', f'--pid-file={munge_dir}/munged.pid',
                               f'--seed-file={munge_dir}/munged.seed', f'--log-file={self.root}/munged.log'],
                    user='munge', group='munge')
        self._wait(lambda: (munge_dir / 'munge.socket').exists(), 30, 'munged did not create its socket')
        self._start('slurmctld', ['slurmctld', '-D', '-f', str(self.conf)])
        self._wait(lambda: self.run('scontrol', 'ping').returncode == 0 and
                   'UP' in self.run('scontrol', 'ping').stdout, timeout, 'slurmctld did not answer')
        self._start('slurmd', ['slurmd', '-D', '-f', str(self.conf), '-N', self.node])
        self._wait(self._idle, timeout, f'node {self.node} did not become idle')

    def _idle(self) -> bool:
        proc = self.run('sinfo', '-h', '-N', '-o', '%T')
        return proc.returncode == 0 and proc.stdout.strip() == 'idle'

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f'{name} exited with {proc.returncode}\n{self.log_tail()}')
            try:
                if predicate():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        raise ClusterError(f'{what} within {timeout:.0f}s\n{self.log_tail()}')

    def stop(self) -> None:
        """End the daemons this cluster started (by pid, newest first), then remove its folder."""
        for name in ('slurmd', 'slurmctld', 'munged'):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_idle(self, timeout: float = 120) -> None:
        """Wait until no job of this cluster is left (between tests)."""
        self._wait(lambda: self.run('squeue', '-h').stdout.strip() == '' and self._idle(), timeout,
                   'jobs still running')


def start_cluster() -> Cluster:
    install_packages()
    # Not under pytest's temporary folder: the munge user must reach its own folder inside it.
    root = Path(tempfile.mkdtemp(prefix='dat-slurm-'))
    os.chmod(root, 0o755)
    cluster = Cluster(root)
    try:
        cluster.write_config()
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


IN_CI = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')


@pytest.fixture(scope='session')
def slurm():
    """The test cluster, started once per session (conftest.py gives every SLURM test module to
    one pytest-xdist worker, so one session starts it). Outside CI, without root or packages,
    the tests skip with the reason; under CI they fail."""
    reason = missing_reason()
    if reason is None:
        try:
            cluster = start_cluster()
        except (ClusterError, OSError, subprocess.SubprocessError, KeyError) as e:
            reason = f'cannot start a test SLURM: {e}'
    if reason is not None:
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    try:
        yield cluster
    finally:
        cluster.stop()

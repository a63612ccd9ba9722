"""Shared fixtures for the end-to-end tests: demo datasets on disk and running ``main.py``.

The entry-point tests start real processes (``python main.py``, ``torchrun``) on real JPEG
folders made by ``data.demo``, on the CPU (GPUs are hidden from them). Property tests use a tiny
model (``TINY_OPTS``) on the small ``tiny_data`` set so that each process finishes in seconds;
only ``test_train`` trains the demo config for accuracy.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / 'shared' / 'fixtures'


IN_CI = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')
# For tests that read ../shared/fixtures: skipped, with the reason, outside CI when the folder is
# missing; under CI they run and fail.
needs_fixtures = pytest.mark.skipif(not SHARED_FIXTURES.is_dir() and not IN_CI,
                                    reason=f'official fixtures not found at {SHARED_FIXTURES} (../shared beside the checkout)')


def fixture_dir(name: str) -> Path:
    """``../shared/fixtures/<name>`` (official float64 outputs). Outside CI a missing folder skips
    the calling test with the reason; under CI (``CI=true``) it fails: the fixtures are the ground
    truth and must not be skipped silently."""
    path = SHARED_FIXTURES / name
    if not path.is_dir():
        message = f'official fixtures not found at {path} (../shared beside the checkout)'
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-300) -> float:
    """Max absolute difference relative to the largest reference magnitude (the fixtures' measure)."""
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), floor)


@contextlib.contextmanager
def float64_default():
    """Build modules in float64 (the default dtype), so fixture weights load without rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def pytest_configure(config) -> None:
    config.addinivalue_line('markers', 'slow: starts real processes (main.py, torchrun, train.sh); '
                                       'deselect with -m "not slow"')
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        # pytest-xdist workers share the cores: neither a worker's in-process tests nor the
        # processes it starts should take them all (threads waiting for a core only burn time).
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault('OMP_NUM_THREADS', str(threads))


# ----------------------------------------------------------------------------- pytest-xdist
# ``-n 2``: each test module goes to one worker as a whole (its module-scoped fixtures, such as one
# real training run read by several tests, are then made once), except in the modules below, whose
# tests share nothing but session fixtures (``made_once``) and are spread one by one. The end-to-end
# tests that take longest start first, so that the short ones fill the gaps at the end.
SPREAD = ('test_bad_input.py', 'test_checkpoint_safety.py', 'test_crash.py', 'test_resume.py',
          'test_preemption.py', 'test_observability.py', 'test_timm_type.py', 'test_startup_errors.py',
          'test_benchmark.py', 'test_faults.py')
FIRST = ('test_slurm.py', 'test_train.py', 'test_crash.py', 'test_distributed.py', 'test_benchmark.py',
         'test_timm_type.py', 'test_debiformer.py', 'test_checkpoint_safety.py')


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue('dist') != 'load':
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split('::', 1)[0]
            if Path(module).name.startswith('test_slurm'):
                return 'slurm'          # one worker: one test SLURM (slurm_cluster.py) per session
            return nodeid if Path(module).name in SPREAD else module

    config.option.loadscopereorder = False          # keep the order of the collection below
    return ByModule(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        return

    def rank(item) -> int:
        if item.get_closest_marker('slow') is None:
            return len(FIRST) + 1
        return FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST)
    items.sort(key=rank)


DEMO_CFG = str(REPO / 'configs' / 'demo.yaml')
MODEL_NAME = 'dat_demo'          # MODEL.NAME of configs/demo.yaml (part of the output path)

# A very small DAT++ with the demo's block types, for tests of properties that need no learning.
TINY_OPTS = [
    'MODEL.DAT.dim_stem', '8', 'MODEL.DAT.dims', '[8,16,32,64]', 'MODEL.DAT.heads', '[1,2,4,4]',
    'MODEL.DAT.groups', '[1,1,2,2]', 'MODEL.DAT.expansion', '2',
    'DATA.BATCH_SIZE', '2', 'TRAIN.EPOCHS', '4', 'TRAIN.WARMUP_EPOCHS', '1',
    'TRAIN.BASE_LR', '0.05', 'TRAIN.WARMUP_LR', '0.0005', 'TRAIN.MIN_LR', '0.0005',
    'AUG.MIXUP', '0.2',                  # exercises numpy's RNG (mixup) in the resume tests
    'PRINT_FREQ', '1', 'TENSORBOARD', 'False',
]
# Bit-exact resume on the CPU: deterministic kernels and augmentations drawn in the main process.
EXACT_OPTS = ['DETERMINISTIC', 'True', 'DATA.NUM_WORKERS', '0']


def subprocess_env(**extra: str) -> Dict[str, str]:
    """Environment for a child process: this repository importable, one CPU thread, no GPU, and
    no launcher or dataset variables inherited from the calling shell."""
    env = dict(os.environ)
    path = [str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               CUDA_VISIBLE_DEVICES='')
    for name in list(env):
        if name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'DAT_DATA_PATH') \
                or name.startswith(('SLURM_', 'TORCHELASTIC_')):
            del env[name]
    env.update(extra)
    return env


@dataclass
class Run:
    """A finished ``main.py`` process."""
    returncode: int
    stdout: str
    stderr: str
    output: Path            # <output>/<MODEL.NAME>/<tag>
    seconds: float

    def log(self, rank: int = 0) -> str:
        path = self.output / f'log_rank{rank}.txt'
        return path.read_text() if path.exists() else ''

    def metrics(self) -> List[dict]:
        path = self.output / 'metrics.jsonl'
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def accuracies(self) -> List[float]:
        """Every ``Accuracy of the network on the N test images: X%`` value, in order."""
        return [float(x) for _, x in ACC_LINE.findall(self.stdout)]

    def check(self) -> 'Run':
        assert self.returncode == 0, f"exit {self.returncode}\nSTDOUT:\n{self.stdout[-3000:]}\nSTDERR:\n{self.stderr[-3000:]}"
        return self


ACC_LINE = re.compile(r'Accuracy of the network on the (\d+) test images: ([\d.]+)%')
ACC_DETAIL = re.compile(r'\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) Loss ([\d.]+) \((\d+) images')


def run_process(cmd: Sequence[str], cwd, env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` in its own process group, so that a timeout also ends the workers of a
    launcher (torchrun) instead of leaving them orphaned."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group led by ``proc`` (started with ``start_new_session=True``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def main_cmd(args: Sequence[str], output: Path, tag: str = 'run', cfg: str = DEMO_CFG) -> List[str]:
    return ['main.py', '--cfg', cfg, '--output', str(output), '--tag', tag, *args]


def run_main(args: Sequence[str], output: Path, tag: str = 'run', timeout: float = 300,
             cfg: str = DEMO_CFG, env: Optional[Dict[str, str]] = None) -> Run:
    """Run ``python main.py --cfg CFG --output OUTPUT --tag TAG ARGS`` to the end."""
    start = time.time()
    proc = run_process([sys.executable, *main_cmd(args, output, tag, cfg)], REPO, env or subprocess_env(),
                       timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr, Path(output) / MODEL_NAME / tag,
               time.time() - start)


def start_main(args: Sequence[str], output: Path, tag: str = 'run', cfg: str = DEMO_CFG) -> subprocess.Popen:
    """Start ``main.py`` in the background (stdout/stderr to files in ``output``)."""
    output.mkdir(parents=True, exist_ok=True)
    n = len(list(output.glob('proc*.out')))
    out = open(output / f'proc{n}.out', 'w')
    err = open(output / f'proc{n}.err', 'w')
    return subprocess.Popen([sys.executable, *main_cmd(args, output, tag, cfg)], cwd=REPO,
                            env=subprocess_env(), stdout=out, stderr=err)


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, size: str, why_skip: str = ''):
    """A real tmpfs of ``size`` at ``mount`` (a real full filesystem); skips the test where mounting
    is not allowed, and unmounts at the end."""
    mount.mkdir()
    made = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({made.stderr.strip() or made.returncode}){why_skip}')
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], capture_output=True)


def free_port() -> int:
    """A port the kernel hands out as free (bound sockets never share one, so tests running side by
    side in pytest-xdist workers get different ports)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, args: Sequence[str], output: Path, tag: str = 'run', timeout: float = 300,
                 cfg: str = DEMO_CFG) -> Run:
    """``torchrun --nproc_per_node NPROC main.py ...`` on this machine (gloo on the CPU)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
           '--master_addr', '127.0.0.1', '--master_port', str(free_port()),
           *main_cmd(args, output, tag, cfg)]
    start = time.time()
    proc = run_process(cmd, REPO, subprocess_env(), timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr, Path(output) / MODEL_NAME / tag,
               time.time() - start)


def wait_for(predicate, timeout: float, interval: float = 0.02, proc: Optional[subprocess.Popen] = None) -> bool:
    """Poll ``predicate`` until true; False on timeout or when ``proc`` ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(interval)
    return False


# ----------------------------------------------------------------------------- checkpoints
def load_ckpt(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def checkpoint_files(output: Path) -> List[Path]:
    return sorted(Path(p) for p in glob.glob(str(output / '*.pth')))


def file_digests(output: Path, skip: Iterable[str] = ()) -> Dict[str, str]:
    """sha256 of every file directly in ``output`` except those named in ``skip``."""
    out = {}
    for p in sorted(output.iterdir()) if output.is_dir() else []:
        if p.is_file() and p.name not in skip and not p.name.startswith('log_rank'):
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_same_training_state(a: dict, b: dict) -> None:
    """Model parameters/buffers and optimizer state bit-identical."""
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), f"model tensor {k} differs"
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys()
    for pid in sa:
        for name, value in sa[pid].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[pid][name])), \
                f"optimizer state {pid}.{name} differs"
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']


# ----------------------------------------------------------------------------- data
def made_once(tmp_path_factory, name: str, make):
    """``make(folder)`` for this test session, JSON-serialisable result: once per pytest-xdist run
    too, where each worker has a session of its own (the first worker makes it under a lock in
    the folder the workers share, the others read it)."""
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    result = shared / f'{name}.json'
    with open(shared / f'{name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            folder = shared / name
            if folder.exists():
                pytest.fail(f'making {name} failed in another worker (see its error)', pytrace=False)
            folder.mkdir()
            result.write_text(json.dumps(make(folder)))
    return json.loads(result.read_text())


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory) -> str:
    """The demo set configs/demo.yaml is tuned for: 4 classes, 256 train + 32 val JPEGs each, 64x64."""
    from data.demo import make_demo_dataset
    return make_demo_dataset(str(tmp_path_factory.mktemp('demo') / 'data'), train_per_class=256,
                             val_per_class=32)


@pytest.fixture(scope='session')
def demo_small(tmp_path_factory) -> str:
    """The generator's default demo set: 4 classes, 64 train + 16 val JPEGs each, 64x64."""
    from data.demo import make_demo_dataset
    return make_demo_dataset(str(tmp_path_factory.mktemp('demo_small') / 'data'))


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> str:
    """3 classes, 8 train + 3 val JPEGs each (9 val images: odd, to test exact distributed eval)."""
    from data.demo import make_demo_dataset
    return made_once(tmp_path_factory, 'tiny', lambda folder: make_demo_dataset(
        str(folder / 'data'), classes=3, train_per_class=8, val_per_class=3, size=64, seed=1))


TINY_DATA_OPTS = ['MODEL.NUM_CLASSES', '3', 'MODEL.DAT.num_classes', '3']
TINY_EPOCHS = 4           # 12 iterations per epoch at batch 2: 48 optimizer steps in all


def tiny_args(data: str, *extra: str) -> List[str]:
    """Command-line arguments for the tiny model on ``tiny_data``, deterministic (``extra`` are
    more ``--opts`` pairs, applied last)."""
    return ['--data-path', data, '--opts', *TINY_OPTS, *EXACT_OPTS, *TINY_DATA_OPTS, *extra]


@pytest.fixture(scope='session')
def tiny_reference(tmp_path_factory, tiny_data) -> Run:
    """An uninterrupted, deterministic run of the tiny model: the trajectory that resumed and
    crashed runs must reproduce bit for bit. Keeps every epoch checkpoint."""
    def make(out: Path) -> dict:
        run = run_main(tiny_args(tiny_data, 'TRAIN.KEEP_CHECKPOINTS', '0'), out, tag='straight').check()
        return {**run.__dict__, 'output': str(run.output)}
    fields = made_once(tmp_path_factory, 'reference', make)
    return Run(**{**fields, 'output': Path(fields['output'])})


def final_checkpoint(run_output: Path) -> dict:
    return load_ckpt(run_output / f'ckpt_epoch_{TINY_EPOCHS - 1}.pth')

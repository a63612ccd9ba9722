"""tools/benchmark.py: interleaved rounds and their summary, the logits check that guards every
speed-up, failure rows, peak memory, the MFU arithmetic, and the CPU smoke run as a real process."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import benchmark  # noqa: E402

SMALL = ['--small', '--device', 'cpu', '--models', 'tiny', '--rounds', '1']


@pytest.fixture(autouse=True)
def fresh_kernel_verdicts():
    """The self-check caches verdicts per process; tests that break a kernel must not leave theirs."""
    from models import kernel_check
    kernel_check._CACHE.clear()
    yield
    kernel_check._CACHE.clear()


# ----------------------------------------------------------------------------- rounds, summary, table
class FakeWork:
    """Stands in for a Workload: records the order of steps; fails on request."""

    device = torch.device('cpu')

    def __init__(self, name: str, log: list, fail_after: int = -1):
        self.name, self.log, self.fail_after = name, log, fail_after

    def train_step(self) -> None:
        if len(self.log) == self.fail_after:
            raise RuntimeError('out of memory\ndetails')
        self.log.append(self.name)

    infer_step = train_step


def fake_entries(log: list, fail_after: int = -1):
    names = ['dat:reference', 'dat:fused', 'swin', 'convnext']
    entries = []
    for name in names:
        row = benchmark.Row(model='tiny', entry=name, arch=name, batch_size=8, dtype='fp32', img_size=224)
        entries.append(benchmark.Entry(row, FakeWork(name, log, fail_after if name == 'swin' else -1)))
    return entries


def test_rounds_interleave_and_rotate() -> None:
    log: list = []
    entries = fake_entries(log)
    args = benchmark.parse_args(['--device', 'cpu', '--rounds', '3', '--steps-per-round', '2'])
    benchmark.run_rounds(entries, args, 'train')
    assert len(log) == 3 * 4 * 2
    rounds = [log[i:i + 8] for i in range(0, len(log), 8)]
    assert rounds[0] == ['dat:reference'] * 2 + ['dat:fused'] * 2 + ['swin'] * 2 + ['convnext'] * 2
    assert rounds[1][0] == 'dat:fused' and rounds[2][0] == 'swin'     # each round starts one entry later
    assert all(len(e.train_times) == 6 and not e.infer_times for e in entries)
    assert all(0 <= s for e in entries for s in e.cpu_shares)


def test_a_failing_entry_stops_alone() -> None:
    log: list = []
    entries = fake_entries(log, fail_after=5)
    args = benchmark.parse_args(['--device', 'cpu', '--rounds', '2'])
    benchmark.run_rounds(entries, args, 'train')
    swin = entries[2]
    assert swin.row.error == 'RuntimeError: out of memory' and swin.work is None
    # Round 1 runs all four (5 steps logged after fused starts round 2); swin fails in round 2.
    assert [len(e.train_times) for e in entries] == [2, 2, 1, 2]


def test_summary_medians_and_ratios() -> None:
    entries = fake_entries([])
    times = {'dat:reference': [4.0, 2.0, 2.2], 'dat:fused': [1.0, 1.1, 9.0], 'swin': [1.0, 1.0, 1.0],
             'convnext': [0.5, 0.5, 0.5]}
    for e in entries:
        e.train_times = times[e.row.entry]
        e.infer_times = [t / 2 for t in times[e.row.entry]]
        e.row.first_train_step_s = 3 * statistics.median(times[e.row.entry])
        e.row.train_peak_mem_gib = {'swin': 2.0}.get(e.row.entry, 3.0)
    benchmark.summarise(entries, peak=None)
    rows = {e.row.entry: e.row for e in entries}
    assert rows['dat:reference'].train_img_s == pytest.approx(8 / 2.2)
    assert rows['dat:fused'].train_img_s == pytest.approx(8 / 1.1)              # a median: the 9 s outlier is ignored
    assert rows['swin'].train_vs_baseline == 1.0                               # the first baseline
    assert rows['dat:fused'].train_vs_baseline == pytest.approx(1 / 1.1)
    assert rows['convnext'].infer_vs_baseline == pytest.approx(2.0)
    assert rows['dat:fused'].mem_vs_baseline == pytest.approx(1.5)
    assert rows['dat:fused'].train_vs_reference == pytest.approx(2.2 / 1.1)
    assert rows['dat:fused'].first_step_ratio == pytest.approx(3.0)
    assert rows['swin'].train_vs_reference is None
    table = benchmark.format_table([e.row for e in entries])
    assert 'dat:fused' in table and '0.91x' in table


def test_table_shows_errors() -> None:
    row = benchmark.Row(model='tiny', entry='dat:fused+compile', arch='dat_tiny', batch_size=2, dtype='fp32',
                        img_size=64, error='RuntimeError: backend exploded')
    table = benchmark.format_table([row])
    assert 'error' in table and 'dat:fused+compile: RuntimeError: backend exploded' in table


# ----------------------------------------------------------------------------- arithmetic and memory
@pytest.mark.parametrize('gpu,dtype,expected', [
    ('NVIDIA H100 80GB HBM3', 'bf16', 989.0),
    ('NVIDIA H100 80GB HBM3', 'fp32', 494.0),
    ('NVIDIA H100 PCIe', 'fp16', 756.0),
    ('NVIDIA H200', 'bf16', 989.0),
    ('NVIDIA A100-SXM4-80GB', 'bf16', 312.0),
    ('NVIDIA GeForce RTX 4090', 'bf16', None),
])
def test_peak_table(monkeypatch, gpu: str, dtype: str, expected) -> None:
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: gpu)
    assert benchmark.peak_tflops(torch.device('cuda'), dtype, None) == expected
    assert benchmark.peak_tflops(torch.device('cuda'), dtype, 123.0) == 123.0   # --peak-tflops wins


def test_peak_on_cpu_needs_the_argument() -> None:
    assert benchmark.peak_tflops(torch.device('cpu'), 'fp32', None) is None
    assert benchmark.peak_tflops(torch.device('cpu'), 'fp32', 2.5) == 2.5


def test_mfu_counts_training_as_three_forwards() -> None:
    # 1000 img/s x 8.6 GFLOP per forward x 3 = 25.8 TFLOP/s of a 989 TFLOP/s device.
    assert benchmark.mfu(1000.0, 8.6e9, 989.0, 3.0) == pytest.approx(25.8 / 989.0)
    assert benchmark.mfu(1000.0, 8.6e9, 989.0) == pytest.approx(8.6 / 989.0)
    assert benchmark.mfu(1000.0, 8.6e9, None) is None
    assert benchmark.mfu(None, 8.6e9, 989.0) is None
    assert benchmark.mfu(1000.0, None, 989.0) is None


@pytest.mark.skipif(not os.access('/proc/self/clear_refs', os.W_OK), reason='needs Linux /proc/self/clear_refs')
def test_cpu_peak_memory_sees_a_phase_allocation() -> None:
    memory = benchmark.PeakMemory(torch.device('cpu'))
    memory.reset()
    block = torch.ones(64 * 2 ** 20 // 4)          # 64 MiB, touched
    peak = memory.peak_gib()
    del block
    assert peak is not None and 0.05 <= peak <= 0.25
    memory.reset()                                  # the next phase starts from the current RSS
    assert memory.peak_gib() < 0.05


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize('argv,message', [
    (['--device', 'cpu', '--dtype', 'fp16'], '--dtype fp16 needs CUDA'),
    (['--models', 'tiny,huge'], "unknown ['huge']"),
    (['--variants', 'fused,turbo'], "unknown ['turbo']"),
    (['--baselines', 'vit'], "unknown ['vit']"),
    (['--variants', 'fused'], "include 'reference'"),
    (['--variants', '', '--baselines', ''], 'nothing to measure'),
    (['--rounds', '0'], '--rounds must be >= 1'),
])
def test_bad_arguments_are_one_line_errors(argv, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(['--device', 'cpu'] + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults() -> None:
    args = benchmark.parse_args(['--device', 'cpu', '--variants', 'fused+compile,reference'])
    assert args.variants == ['reference', 'fused+compile']       # reference first: the others compare to it
    assert args.baselines == ['swin', 'davit', 'convnext']
    assert (args.batch_size, args.dtype, args.compile_backend, args.rounds, args.steps_per_round) == \
        (128, 'fp32', 'inductor', 5, 1)
    small = benchmark.parse_args(['--small', '--device', 'cpu'])
    assert (small.batch_size, small.warmup, small.rounds, small.compile_backend) == (2, 1, 2, 'eager')
    assert small.variants == list(benchmark.VARIANTS)


# ----------------------------------------------------------------------------- real models
@pytest.mark.slow
def test_a_wrong_kernel_is_caught_and_not_timed(tmp_path: Path, monkeypatch, capsys) -> None:
    """An SDPA that drops the position bias: the start-up self-check stops the explicit 'fused'
    entry, which becomes an error row naming the failing call, gets no throughput, and the exit
    status is 1."""
    real_sdpa = F.scaled_dot_product_attention

    def sdpa_without_bias(q, k, v, attn_mask=None, **kwargs):
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', sdpa_without_bias)
    out = tmp_path / 'bad.json'
    assert benchmark.main([*SMALL, '--variants', 'reference,fused', '--baselines', '', '--json', str(out)]) == 1
    ref, fused = json.loads(out.read_text())['rows']
    assert ref['error'] is None and ref['train_img_s'] > 0
    assert 'attention self-check: deformable sdpa' in fused['error'] and 'output error' in fused['error']
    assert fused['train_img_s'] is None
    assert 'attention self-check' in capsys.readouterr().out


class _WrongBiasGrad(torch.autograd.Function):
    """The bias as it is forward, a zero gradient backward: right logits, wrong training."""

    @staticmethod
    def forward(ctx, bias):
        return bias.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


@pytest.mark.slow
def test_a_kernel_with_a_wrong_backward_is_an_error_row(tmp_path: Path, monkeypatch) -> None:
    """Past the self-check (switched off here), a kernel whose forward is right but whose bias
    gradient is wrong passes the logits check and is stopped by the gradient check."""
    import models.kernel_check
    real_sdpa = F.scaled_dot_product_attention

    def sdpa_wrong_bias_grad(q, k, v, attn_mask=None, **kwargs):
        if attn_mask is not None and attn_mask.requires_grad:
            attn_mask = _WrongBiasGrad.apply(attn_mask)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(models.kernel_check, 'check_model_kernels', lambda *args, **kwargs: [])
    monkeypatch.setattr(F, 'scaled_dot_product_attention', sdpa_wrong_bias_grad)
    out = tmp_path / 'bad_grad.json'
    assert benchmark.main([*SMALL, '--variants', 'reference,fused', '--baselines', '', '--json', str(out)]) == 1
    ref, fused = json.loads(out.read_text())['rows']
    assert ref['error'] is None
    assert 'gradients differ from the reference' in fused['error'] and fused['train_img_s'] is None
    assert fused['grad_max_rel_diff']['position tables'] > 0.1
    assert fused['logits_check'] == 'fail'


def test_gradient_check_reports_each_group() -> None:
    from tools.bench_models import GRAD_TOL, compare_grads, eval_grads
    from tools.bench_report import Row
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].register_parameter('rpe_table', torch.nn.Parameter(torch.randn(4)))
    model[0].forward = lambda x, m=model[0]: torch.nn.functional.linear(x, m.weight, m.bias) + m.rpe_table
    x = torch.randn(3, 4)
    reference = eval_grads(model, x)
    row = Row(model='t', entry='dat:fused', arch='t', batch_size=3, dtype='fp32', img_size=4)
    assert compare_grads(model, x, reference, row, 1.0)
    assert row.grad_max_rel_diff['position tables'] <= GRAD_TOL and 'offset network' not in row.grad_max_rel_diff
    wrong = dict(reference, **{'0.rpe_table': reference['0.rpe_table'] * 2})
    assert not compare_grads(model, x, wrong, row, 1.0)
    assert row.grad_max_rel_diff['position tables'] == pytest.approx(0.5)


@pytest.mark.slow
def test_compile_failure_is_a_row_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    def broken_compile(model, **kwargs):
        raise RuntimeError('backend exploded\nlong traceback that is not shown')

    monkeypatch.setattr(torch, 'compile', broken_compile)
    out = tmp_path / 'compile.json'
    assert benchmark.main([*SMALL, '--variants', 'reference,fused+compile', '--baselines', '',
                           '--json', str(out)]) == 0
    ref, compiled = json.loads(out.read_text())['rows']
    assert compiled['entry'] == 'dat:fused+compile' and compiled['error'] == 'RuntimeError: backend exploded'
    assert compiled['train_img_s'] is None and ref['train_img_s'] > 0


@pytest.mark.slow
def test_small_cpu_run_as_a_process(tmp_path: Path) -> None:
    """The smoke command: one row per entry with real numbers, ratios against Swin, compiled
    variants equal to the reference, the loader measured, the table on stdout."""
    out = tmp_path / 'bench.json'
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'benchmark.py'), *SMALL, '--json', str(out),
         '--loader-workers', '1', '--loader-images', '24', '--loader-image-size', '48', '--loader-batch-size', '4',
         '--loader-rounds', '1', '--loader-data', str(tmp_path / 'demo')],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r['entry']: r for r in result['rows']}
    assert list(rows) == ['dat:reference', 'dat:fused', 'dat:reference+compile', 'dat:fused+compile',
                          'swin', 'davit', 'convnext']
    for name, row in rows.items():
        assert row['error'] is None, (name, row['error'])
        assert row['train_img_s'] > 0 and row['infer_img_s'] > 0 and row['train_steps'] == 1, name
        assert row['first_train_step_s'] > 0 and row['train_vs_baseline'] > 0
        assert row['batch_size'] == 2 and row['dtype'] == 'fp32' and row['img_size'] == 64
    assert rows['swin']['train_vs_baseline'] == 1.0 and rows['davit']['arch'] == 'davit_tiny'
    for name in ('dat:fused', 'dat:reference+compile', 'dat:fused+compile'):
        assert rows[name]['logits_check'] == 'pass'
        assert rows[name]['logits_max_rel_diff']['fp32'] <= 1e-4
    assert 'tiled' in rows['dat:reference']['kernels']['neighborhood']
    loader = result['loader']
    assert loader['workers'] == 1 and loader['img_size'] == 224 and loader['rounds'] == 1
    assert loader['float_img_s_per_worker'] > 0 and loader['device_normalize_img_s_per_worker'] > 0
    assert loader['ratio'] == loader['device_normalize_img_s_per_worker'] / loader['float_img_s_per_worker']
    assert result['settings']['compile_backend'] == 'eager' and result['environment']['device'] == 'cpu'
    header = next(line for line in proc.stdout.splitlines() if line.startswith('entry '))
    for column in ('train img/s', 'infer img/s', 'train x base', 'mem x base', 'first/step'):
        assert column in header
    assert 'img/s per worker' in proc.stdout

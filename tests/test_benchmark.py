"""tools/benchmark.py: the CPU smoke run as a real process, the logits check that guards every
speed-up, failure rows, peak-memory measurement and the MFU arithmetic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import benchmark  # noqa: E402

SMALL = ['--small', '--device', 'cpu', '--models', 'tiny']


def test_small_cpu_run_as_a_process(tmp_path: Path) -> None:
    """The CI smoke command: one row per variant with real numbers, fast kernels equal to the
    reference, the table on stdout, and the environment recorded."""
    out = tmp_path / 'bench.json'
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'benchmark.py'), *SMALL,
         '--variants', 'reference,fast,compile,swin', '--json', str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    rows = {r['variant']: r for r in result['rows']}
    assert list(rows) == ['reference', 'fast', 'compile', 'swin']
    for variant, row in rows.items():
        assert row['error'] is None, (variant, row['error'])
        assert row['train_img_s'] > 0 and row['infer_img_s'] > 0, variant
        assert row['batch_size'] == 2 and row['dtype'] == 'fp32' and row['img_size'] == 64
        assert row['fwd_gflops_per_img'] > 0 and row['params_m'] > 0
        assert row['train_mfu'] is None          # no peak on a CPU unless --peak-tflops
    assert rows['reference']['arch'] == 'dat_tiny'
    assert rows['swin']['arch'] == 'swin_tiny_patch4_window7_224'
    assert rows['reference']['train_speedup_vs_reference'] == pytest.approx(1.0)
    assert rows['fast']['kernels'] == {'deformable': 'sdpa', 'neighborhood': 'reference'}
    for variant in ('fast', 'compile'):
        assert rows[variant]['logits_check'] == 'pass'
        assert 0 <= rows[variant]['logits_max_rel_diff']['fp32'] <= 1e-4
        assert rows[variant]['train_speedup_vs_reference'] > 0

    env_info = result['environment']
    assert env_info['torch'] == torch.__version__ and env_info['device'] == 'cpu'
    assert env_info['device_name'] and env_info['date']
    assert result['settings']['compile_backend'] == 'eager'
    assert [t['variant'] for t in result['targets']] == ['fast', 'fast+compile']
    assert not any(t['at_target_settings'] for t in result['targets'])

    header = next(line for line in proc.stdout.splitlines() if line.startswith('model '))
    for column in ('train img/s', 'infer img/s', 'train GiB', 'train x ref', 'MFU train'):
        assert column in header
    table_rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(('dat_tiny ', 'swin_'))]
    assert [r[1] for r in table_rows] == ['reference', 'fast', 'fast+compile', 'swin_tiny_patch4_window7_224']
    assert all(float(r[5]) > 0 and float(r[6]) > 0 for r in table_rows)   # train / infer img/s


def test_a_wrong_kernel_is_caught_and_not_timed(tmp_path: Path, monkeypatch, capsys) -> None:
    """An SDPA that drops the position bias changes the logits: the fast row becomes an error
    with the measured difference, gets no throughput, and the exit status is 1."""
    real_sdpa = F.scaled_dot_product_attention

    def sdpa_without_bias(q, k, v, attn_mask=None, **kwargs):
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', sdpa_without_bias)
    out = tmp_path / 'bad.json'
    assert benchmark.main([*SMALL, '--variants', 'fast', '--json', str(out)]) == 1
    (fast,) = json.loads(out.read_text())['rows']
    assert fast['logits_check'] == 'fail'
    assert fast['logits_max_rel_diff']['fp32'] > 10 * benchmark.CHECK_TOL['fp32']
    assert 'logits differ from the reference' in fast['error']
    assert fast['train_img_s'] is None and fast['train_speedup_vs_reference'] is None
    assert 'logits differ' in capsys.readouterr().out


def test_compile_failure_is_a_row_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    def broken_compile(model, **kwargs):
        raise RuntimeError('backend exploded\nlong traceback that is not shown')

    monkeypatch.setattr(torch, 'compile', broken_compile)
    out = tmp_path / 'compile.json'
    assert benchmark.main([*SMALL, '--variants', 'compile', '--json', str(out)]) == 0
    (row,) = json.loads(out.read_text())['rows']
    assert row['variant'] == 'compile' and row['label'] == 'fast+compile'
    assert row['error'] == 'RuntimeError: backend exploded'
    assert row['train_img_s'] is None


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


@pytest.mark.parametrize('argv,message', [
    (['--device', 'cpu', '--dtype', 'fp16'], '--dtype fp16 needs CUDA'),
    (['--models', 'tiny,huge'], "unknown ['huge']"),
    (['--variants', 'fast,turbo'], "unknown ['turbo']"),
])
def test_bad_arguments_are_one_line_errors(argv, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_and_variant_order() -> None:
    args = benchmark.parse_args(['--device', 'cpu', '--variants', 'swin,fast,reference'])
    assert args.variants == ['reference', 'fast', 'swin']      # reference first: the others compare to it
    assert (args.batch_size, args.dtype, args.compile_backend) == (128, 'fp32', 'inductor')
    small = benchmark.parse_args(['--small', '--device', 'cpu'])
    assert (small.batch_size, small.warmup, small.iters, small.compile_backend) == (2, 1, 2, 'eager')


def test_profile_prints_and_records_top_ops(tmp_path: Path, capsys) -> None:
    out = tmp_path / 'profile.json'
    assert benchmark.main([*SMALL, '--variants', 'fast', '--iters', '1', '--profile', '--profile-steps', '1',
                           '--json', str(out)]) == 0
    (row,) = json.loads(out.read_text())['rows']
    ops = row['profile_top_ops']
    assert 1 <= len(ops) <= 15
    assert all(op['op'] and op['self_time_ms'] >= 0 and 0 <= op['share'] <= 1 for op in ops)
    times = [op['self_time_ms'] for op in ops]
    assert times == sorted(times, reverse=True) and times[0] > 0
    printed = capsys.readouterr().out
    assert '== profile: dat_tiny fast' in printed and ops[0]['op'] in printed


def test_input_sizes() -> None:
    small = benchmark.parse_args(['--small', '--device', 'cpu'])
    assert benchmark.input_size(benchmark.MODELS['tiny'], small) == 64
    assert benchmark.input_size(benchmark.MODELS['base384'], small) == 96     # larger than the tables, like 384
    full = benchmark.parse_args(['--device', 'cpu'])
    assert benchmark.input_size(benchmark.MODELS['base'], full) == 224
    assert benchmark.input_size(benchmark.MODELS['base384'], full) == 384
    override = benchmark.parse_args(['--device', 'cpu', '--img-size', '256'])
    assert benchmark.input_size(benchmark.MODELS['tiny'], override) == 256

"""tools/gpu_check.sh in its reduced CPU mode, as a process: every section runs and passes, and the
report holds the lines BENCHMARKS.md takes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path: Path) -> None:
    out = tmp_path / 'report.md'
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'gpu_check.sh'), '--cpu', '--out', str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for heading in ('## CUDA-only tests', '## Attention self-check', '## DAT-T++ (reduced) on synthetic data',
                    '## Grad-scaler overflow path', '## Benchmark', '## Summary'):
        assert heading in report, heading
    assert 'deformable sdpa' in report and ': ok;' in report and 'FAILED' not in report
    assert '| step | fused loss | reference loss |' in report
    assert 'loss scale 65536 -> 32768: ok' in report
    assert 'dat:fused' in report and 'pass (' in report
    assert 'all sections passed' in report


def test_gpu_check_refuses_gpu_mode_without_cuda(tmp_path: Path) -> None:
    import torch
    if torch.cuda.is_available():
        pytest.skip('a GPU is visible: the full mode would run')
    from tools import gpu_check
    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(['--out', str(tmp_path / 'r.md')])
    assert info.value.code == 2

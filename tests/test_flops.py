"""FLOPs (MACs) counting: the paper's DAT++ numbers, the extra terms by hand, the command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models.nat as nat  # noqa: E402
from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.dat_blocks import DAttention  # noqa: E402
from tools.flops import PAPER_GMACS, count_flops, main as flops_main  # noqa: E402

# The tiny model in the fast layer; the larger ones (seconds each on CPU) in the slow layer.
PAPER = [('dat_tiny', 224, 4.3)] + [pytest.param(*row, marks=pytest.mark.slow) for row in
                                    (('dat_small', 224, 9.4), ('dat_base', 224, 16.6), ('dat_base_384', 384, 49.7))]


@pytest.mark.parametrize('name,size,paper', PAPER)
def test_dat_pp_matches_paper(name: str, size: int, paper: float) -> None:
    config = load_config(str(ROOT / 'configs' / f'{name}.yaml'))
    assert config.DATA.IMG_SIZE == size
    model = build_model(config)
    result = count_flops(model, size)
    assert abs(result['gmacs'] - paper) / paper < 0.03, f"{name}: {result['gmacs']:.3f} vs paper {paper}"
    assert PAPER_GMACS[(name, size)] == paper
    by_kind = result['macs_by_kind']
    # What torch.utils.flop_counter sees on the official model (dat_facts section 4) is conv + matmul.
    official_counter = {'dat_tiny': 4.18, 'dat_small': 9.26, 'dat_base': 16.34, 'dat_base_384': 49.01}[name]
    assert abs((by_kind['conv'] + by_kind['matmul']) / 1e9 - official_counter) < 0.01
    assert by_kind['neighborhood'] > 0 and by_kind['grid_sample'] > 0
    assert result['params'] == sum(p.numel() for p in model.parameters())


def _expected_extra(config, size: int) -> dict:
    """Neighborhood-attention and bilinear-sampling MACs of a DAT++ layout, from its config alone."""
    d = config.MODEL.DAT
    h = w = size
    for _ in range(2):                   # conv stem: two stride-2 3x3 convs, padding 1
        h, w = (h + 1) // 2, (w + 1) // 2
    na = grid = 0
    for i in range(4):
        if i:
            h, w = (h + 1) // 2, (w + 1) // 2
        dim, heads, k = d.dims[i], d.heads[i], d.nat_ksizes[i]
        for letter in d.stage_spec[i]:
            if letter == 'N':
                hp, wp = max(h, k), max(w, k)                        # padded up to the kernel
                na += 2 * heads * hp * wp * k * k * (dim // heads)   # q.k and attn.v
            elif letter == 'D':
                ks, s = d.ksizes[i], d.strides[i]
                pad = ks // 2 if ks != s else 0
                hk, wk = (h + 2 * pad - ks) // s + 1, (w + 2 * pad - ks) // s + 1
                grid += 4 * dim * hk * wk                            # keys/values: C channels per point
                grid += 4 * heads * h * w * hk * wk                  # position table: per head, query, key
    return dict(neighborhood=na, grid_sample=grid)


@pytest.mark.parametrize('size', [64, 96])
def test_extra_terms_by_hand(size: int) -> None:
    """The counts the flop counter cannot make equal the closed-form sums (demo layout, maps smaller
    than the kernel included)."""
    config = load_config(str(ROOT / 'configs' / 'demo.yaml'))
    result = count_flops(build_model(config), size)
    expected = _expected_extra(config, size)
    assert result['macs_by_kind']['neighborhood'] == expected['neighborhood']
    assert result['macs_by_kind']['grid_sample'] == expected['grid_sample']
    assert result['macs'] == sum(result['macs_by_kind'].values())


def test_batch_and_non_square_sizes_scale() -> None:
    model = build_model(load_config(str(ROOT / 'configs' / 'demo.yaml')))
    one = count_flops(model, (64, 96))
    two = count_flops(model, (64, 96), batch_size=2)
    assert one['img_size'] == (64, 96)
    assert two['macs'] == 2 * one['macs']


def test_counting_leaves_the_model_alone() -> None:
    model = build_model(load_config(str(ROOT / 'configs' / 'demo.yaml'))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_op = nat.neighborhood_attention
    count_flops(model, 64)
    assert model.training
    assert nat.neighborhood_attention is real_op
    after = model.state_dict()
    assert all(after[k].device.type == 'cpu' and torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
    assert any(isinstance(m, DAttention) for m in model.modules())


@pytest.mark.slow
def test_command_line_prints_table() -> None:
    run = subprocess.run([sys.executable, str(ROOT / 'tools' / 'flops.py'), '--cfg', 'configs/dat_tiny.yaml',
                          'configs/demo.yaml', '--img-size', '224'],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    tiny = next(line for line in lines if line.startswith('dat_tiny '))
    cells = tiny.split()
    assert cells[1] == '224x224' and cells[2] == '23.96' and cells[7] == '4.3'
    assert abs(float(cells[3]) - 4.3) / 4.3 < 0.03
    assert any(line.startswith('dat_demo ') for line in lines)


def test_command_line_bad_config(capsys) -> None:
    assert flops_main(['--cfg', str(ROOT / 'configs' / 'nope.yaml')]) == 1
    err = capsys.readouterr().err
    assert 'config file not found' in err and len(err.strip().splitlines()) == 1

"""The deformable-attention visualiser: PNGs on disk, drawn points = the model's sampling points,
attention weights captured without changing the model's outputs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from tools.visualize import (capture_deformable_attention, deformable_points, draw_stage,  # noqa: E402
                             load_image, load_model, visualize)

CFG = str(ROOT / 'configs' / 'demo.yaml')     # D blocks in stages 0, 2 and 3
# Smaller than the demo model; the same block layout.
OPTS = ['MODEL.DAT.dim_stem', '16', 'MODEL.DAT.dims', '[16,32,64,128]', 'MODEL.DAT.heads', '[2,2,4,8]',
        'MODEL.DAT.groups', '[2,1,2,4]']
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A random model saved as a checkpoint (with distinct EMA weights) and a real, non-square image."""
    folder = tmp_path_factory.mktemp('vis')
    torch.manual_seed(0)
    model = build_model(load_config(CFG, opts=OPTS))
    torch.manual_seed(1)
    ema = build_model(load_config(CFG, opts=OPTS))
    ckpt = folder / 'ckpt_epoch_0.pth'
    torch.save({'model': model.state_dict(), 'ema': ema.state_dict(), 'epoch': 0}, ckpt)
    yy, xx = np.mgrid[0:90, 0:120]
    rgb = np.stack([xx * 2 % 256, yy * 3 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    image = folder / 'scene.png'
    Image.fromarray(rgb).save(image)
    return dict(ckpt=str(ckpt), image=str(image), folder=folder)


def to_pixels(pos: torch.Tensor, fmap, image) -> torch.Tensor:
    """Independent statement of the documented mapping: align_corners=True normalised (y, x) -> feature
    pixel (p + 1) / 2 * (size - 1) -> image pixel whose cell centre it is."""
    out = torch.empty_like(pos)
    for axis in range(2):
        feature = (pos[..., axis] + 1) / 2 * (fmap[axis] - 1)
        stride = image[axis] / fmap[axis]
        out[..., axis] = feature * stride + (stride - 1) / 2
    return out


def test_png_per_deformable_stage_and_points_equal_model(files, tmp_path) -> None:
    out = tmp_path / 'vis'
    paths, blocks = visualize(CFG, files['ckpt'], files['image'], str(out), query=(30.0, 70.0),
                              img_size=[64, 96], opts=OPTS)
    assert [Path(p).name for p in paths] == ['stage0_deformable.png', 'stage2_deformable.png',
                                             'stage3_deformable.png']
    for p in paths:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000
        with Image.open(p) as img:
            assert img.size[0] > 200 and img.size[1] > 200

    # The model's own sampling points on the same input, mapped by the documented rule.
    model = build_model(load_config(CFG, opts=OPTS))
    model.load_state_dict(torch.load(files['ckpt'], weights_only=True)['model'])
    x, _ = load_image(files['image'], (64, 96))
    _, positions, _ = model.eval().sampling_points(x)
    flat = [(stage, p) for stage, ps in enumerate(positions) for p in ps]
    assert [(b.stage, b.block) for b in blocks] == [(0, 0), (2, 1), (3, 0)]
    assert len(flat) == len(blocks)
    for blk, (stage, pos) in zip(blocks, flat):
        assert blk.stage == stage
        assert blk.fmap == (64 // 4 // 2 ** stage, 96 // 4 // 2 ** stage)
        groups = pos.shape[1]
        expected = to_pixels(pos[0], blk.fmap, (64, 96)).reshape(groups, -1, 2).numpy()
        np.testing.assert_allclose(blk.points, expected, rtol=0, atol=1e-4)


def test_drawn_points_are_the_data(files) -> None:
    model, _ = load_model(CFG, files['ckpt'], OPTS)
    x, rgb = load_image(files['image'], (64, 96))
    blocks = deformable_points(model, x, query=(10.0, 20.0), top_k=3)
    stage3 = [b for b in blocks if b.stage == 3]
    fig = draw_stage(rgb, stage3)
    ax = fig.axes[0]
    blk = stage3[0]
    groups = blk.points.shape[0]
    for g in range(groups):                 # collection g: group g's sampled points as (x, y)
        np.testing.assert_array_equal(np.asarray(ax.collections[g].get_offsets()), blk.points[g][:, ::-1])
    star = np.asarray(ax.collections[groups].get_offsets())
    np.testing.assert_array_equal(star, [[blk.query[1], blk.query[0]]])
    for g, (pts, weights) in enumerate(blk.attended):
        circles = ax.collections[groups + 1 + g]
        np.testing.assert_array_equal(np.asarray(circles.get_offsets()), pts[:, ::-1])
        sizes = circles.get_sizes()
        assert np.argmax(sizes) == np.argmax(weights)
    assert len(ax.images) == 1 and ax.images[0].get_array().shape == (64, 96, 3)


def test_attention_capture_and_top_keys(files) -> None:
    model, _ = load_model(CFG, files['ckpt'], OPTS)
    x, _ = load_image(files['image'], (64, 96))
    with torch.no_grad():
        plain = model(x)
        with capture_deformable_attention(model) as captured:
            hooked = model(x)
        after = model(x)
    assert torch.equal(plain, hooked) and torch.equal(plain, after)      # outputs unchanged, hooks removed
    assert {m.attn_impl for m in model.modules() if hasattr(m, 'attn_impl') and hasattr(m, 'proj_q')} == {'reference'}
    assert sorted(captured) == [(0, 0), (2, 1), (3, 0)]
    for (stage, block), got in captured.items():
        attn = got['attn']
        module = model.stages[stage].attns[block]
        h, w = got['fmap']
        assert attn.shape[:2] == (module.heads, h * w)
        assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)   # softmax rows

    query = (40.0, 10.0)
    blocks = deformable_points(model, x, query=query, top_k=4)
    for blk in blocks:
        attn = captured[(blk.stage, blk.block)]['attn']
        module = model.stages[blk.stage].attns[blk.block]
        row = min(int((query[0] + 0.5) * blk.fmap[0] / 64), blk.fmap[0] - 1)
        col = min(int((query[1] + 0.5) * blk.fmap[1] / 96), blk.fmap[1] - 1)
        per_group = attn[:, row * blk.fmap[1] + col].reshape(module.groups, module.group_heads, -1).mean(1)
        for g, (pts, weights) in enumerate(blk.attended):
            k = min(4, per_group.shape[1])
            assert len(weights) == k and np.all(np.diff(weights) <= 0)
            np.testing.assert_allclose(weights, per_group[g].topk(k).values.numpy(), rtol=1e-6)
            for p in pts:                    # every attended key is one of the group's sampled points
                assert np.any(np.all(np.isclose(blk.points[g], p), axis=1))
    with pytest.raises(ValueError, match='eval'):
        deformable_points(model.train(), x)


def test_ema_weights_are_used_on_request(files) -> None:
    plain, _ = load_model(CFG, files['ckpt'], OPTS)
    ema, _ = load_model(CFG, files['ckpt'], OPTS, ema=True)
    saved = torch.load(files['ckpt'], weights_only=True)
    assert torch.equal(ema.patch_proj[0].weight, saved['ema']['patch_proj.0.weight'])
    assert torch.equal(plain.patch_proj[0].weight, saved['model']['patch_proj.0.weight'])
    assert not torch.equal(plain.patch_proj[0].weight, ema.patch_proj[0].weight)


@pytest.mark.slow
def test_command_line(files, tmp_path) -> None:
    out = tmp_path / 'cli'
    cmd = [sys.executable, str(ROOT / 'tools' / 'visualize.py'), '--cfg', CFG, '--ckpt', files['ckpt'],
           '--image', files['image'], '--out', str(out), '--query', '20', '30', '--opts', *OPTS]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ['stage0_deformable.png', 'stage2_deformable.png', 'stage3_deformable.png']
    assert all((out / n).read_bytes()[:8] == PNG_SIGNATURE for n in written)
    assert run.stdout.count('wrote ') == 3


def test_command_line_errors(files, tmp_path, capsys) -> None:
    from tools.visualize import main
    assert main(['--cfg', CFG, '--ckpt', files['ckpt'], '--image', str(tmp_path / 'missing.jpg'),
                 '--out', str(tmp_path), '--opts', *OPTS]) == 1
    err = capsys.readouterr().err
    assert 'image not found' in err and len(err.strip().splitlines()) == 1
    # A checkpoint of another architecture: one line naming the mismatch.
    assert main(['--cfg', CFG, '--ckpt', files['ckpt'], '--image', files['image'], '--out', str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert 'does not fit the model' in err and len(err.strip().splitlines()) == 1


def test_fused_model_is_refused_by_the_capture(files) -> None:
    """Fused kernels never form the weights: the capture says how to build the model instead."""
    only_deformable = ['MODEL.DAT.stage_spec', "[['D'], ['D'], ['D', 'D'], ['D']]"]
    model, _ = load_model(CFG, None, [*OPTS, *only_deformable, 'MODEL.ATTN_IMPL', 'fused'])
    x, _ = load_image(files['image'], (64, 96))
    with pytest.raises(RuntimeError, match='ATTN_IMPL reference'):
        deformable_points(model, x)

"""Dense-prediction features: ``features_only`` / ``out_indices`` through timm and ``forward_intermediates``.

The maps are the raw stage outputs (before the next down-projection, no norm): NCHW,
``dims[i]`` channels, stride ``4 * 2**i``; any input size the blocks allow.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401  (registers the timm names)
from config import load_config  # noqa: E402
from conftest import SHARED_FIXTURES, needs_fixtures  # noqa: E402
from models import build_model, create_from_yaml  # noqa: E402

# A small DAT++ layout (N and D blocks, conv stem, LPU, DWC-MLP), dims 16..128, from configs/demo.yaml.
SMALL_CFG = str(ROOT / 'configs' / 'demo.yaml')
SMALL_OPTS = ['MODEL.DAT.dim_stem', '16', 'MODEL.DAT.dims', '[16,32,64,128]', 'MODEL.DAT.heads', '[1,2,4,8]']
DIMS = [16, 32, 64, 128]
STRIDES = [4, 8, 16, 32]
# A window (L/S) layout: maps that are not multiples of the window are padded (as in Swin).
WINDOW_CFG = SHARED_FIXTURES / 'dat_official' / 'mini_window.yaml'


def small_features(**kwargs):
    """The small layout through timm as a features_only backbone."""
    return create_from_yaml(SMALL_CFG, features_only=True, dim_stem=16, dims=DIMS,
                             heads=[1, 2, 4, 8], **kwargs)


@pytest.fixture(scope='module')
def small_pair():
    """The same weights twice: a timm features_only model and the full classifier."""
    torch.manual_seed(0)
    full = build_model(load_config(SMALL_CFG, opts=SMALL_OPTS)).eval()
    features = small_features()
    missing, unexpected = features.model.load_state_dict(full.state_dict(), strict=False)
    assert not missing and set(k.split('.')[0] for k in unexpected) <= {'cls_head', 'cls_norm'}
    return features.eval(), full


@pytest.mark.parametrize('size', [(224, 224), (256, 320), (100, 60)])
def test_four_stage_maps_any_size(small_pair, size) -> None:
    features, full = small_pair
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        maps = features(x)
        stage_outputs = full.forward_stages(x)[0]
    assert len(maps) == 4
    for i, (m, ref) in enumerate(zip(maps, stage_outputs)):
        assert m.shape == (1, DIMS[i], -(-size[0] // STRIDES[i]), -(-size[1] // STRIDES[i])), i
        assert torch.equal(m, ref), f'stage {i} map is not the stage output'


def test_feature_info(small_pair) -> None:
    features, _ = small_pair
    assert features.feature_info.channels() == DIMS
    assert features.feature_info.reduction() == STRIDES
    assert features.feature_info.module_name() == [f'stages.{i}' for i in range(4)]


def test_out_indices_prunes_later_stages() -> None:
    torch.manual_seed(0)
    full = build_model(load_config(SMALL_CFG, opts=SMALL_OPTS)).eval()
    two = small_features(out_indices=(0, 2)).eval()
    # Stages after the last wanted one, the norm and the head are gone.
    assert len(two.model.stages) == 3 and len(two.model.down_projs) == 2
    assert isinstance(two.model.cls_head, torch.nn.Identity) and isinstance(two.model.cls_norm, torch.nn.Identity)
    two.model.load_state_dict(full.state_dict(), strict=False)
    assert two.feature_info.channels() == [16, 64] and two.feature_info.reduction() == [4, 16]
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        maps = two(x)
        outs = full.forward_stages(x)[0]
    assert len(maps) == 2
    assert torch.equal(maps[0], outs[0]) and torch.equal(maps[1], outs[2])
    negative = small_features(out_indices=(-1,))
    assert negative.feature_info.channels() == [128] and negative.feature_info.reduction() == [32]


def test_forward_intermediates_protocol(small_pair) -> None:
    _, full = small_pair
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, inter = full.forward_intermediates(x)
        assert torch.equal(final, full.forward_features(x))
        assert [t.shape[1] for t in inter] == DIMS
        normed = full.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
        assert len(normed) == 2 and torch.equal(normed[0], inter[2])
        assert torch.equal(normed[1], full.cls_norm(inter[3]))     # norm only on the last stage
        early = full.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert len(early) == 1 and torch.equal(early[0], inter[1])
    with pytest.raises(ValueError, match='NCHW'):
        full.forward_intermediates(x, output_fmt='NHWC')


def test_dat_pp_tiny_features() -> None:
    """The registered DAT++ tiny as a backbone: feature_info, and maps at a small non-square size."""
    backbone = timm.create_model('dat_pp_tiny', features_only=True).eval()
    assert backbone.feature_info.channels() == [64, 128, 256, 512]
    assert backbone.feature_info.reduction() == STRIDES
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = backbone(x)
    assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    assert all(torch.isfinite(m).all() for m in maps)


@needs_fixtures
def test_window_layout_takes_any_size() -> None:
    """Window blocks pad maps to a multiple of the window and crop back: multiples of 224 run
    unpadded (the official arithmetic, see the fixtures), other sizes give maps of the usual strides."""
    torch.manual_seed(0)
    backbone = create_from_yaml(str(WINDOW_CFG), features_only=True).eval()
    dims = list(load_config(str(WINDOW_CFG)).MODEL.DAT.dims)
    with torch.no_grad():
        for size in ((224, 448), (100, 92), (256, 320)):
            maps = backbone(torch.randn(1, 3, *size))
            # patch and down-projection convs without padding: every stride floors
            assert [tuple(m.shape) for m in maps] == [
                (1, dims[i], size[0] // 4 // 2 ** i, size[1] // 4 // 2 ** i) for i in range(4)]
            assert all(torch.isfinite(m).all() for m in maps)


def test_window_padding_is_zero_padding_after_the_norm() -> None:
    """Window attention on a 5x9 map equals attention on the map zero-padded to 7x14, cropped; the
    shifted block builds the mask of a padded size by the rule of its buffer."""
    from models.dat_blocks import LocalAttention, ShiftWindowAttention, shifted_window_mask

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 9, dtype=torch.float64)
    local = LocalAttention(8, heads=2, window_size=7).double().eval()
    shifted = ShiftWindowAttention(8, heads=2, window_size=7, fmap_size=12).double().eval()
    with torch.no_grad():
        assert torch.equal(local(x), local._attend(torch.nn.functional.pad(x, (0, 5, 0, 2)), None)[..., :5, :9])
        assert shifted(x).shape == x.shape and torch.isfinite(shifted(x)).all()
    assert shifted.attn_mask.shape == (4, 49, 49)                          # built for 12 -> padded 14
    assert torch.equal(shifted.attn_mask, shifted_window_mask(14, 14, 7, 4))

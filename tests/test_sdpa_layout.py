"""Deformable attention reaches SDPA in the layout fused kernels accept: q, k, v contiguous with the
head dim last, so the backend SDPA selects is the one the platform offers for these inputs (flash on
the CPU without a bias that needs a gradient; not math on CUDA), never math because of strides."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from models import attention_impl
from models.dat_blocks import POS_ENCODINGS, DAttention

CUDA = torch.cuda.is_available()


def _sdpa_inputs(monkeypatch, block: DAttention, x: torch.Tensor):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, **kw):
        seen.append((q, k, v, attn_mask, dropout_p, scale))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, **kw)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    block(x).sum().backward()
    assert len(seen) == 1
    return seen[0]


def _choice(q, k, v, mask, dropout_p, scale) -> SDPBackend:
    return SDPBackend(torch._fused_sdp_choice(q, k, v, mask, dropout_p, False, scale=scale))


@pytest.mark.parametrize('pos_enc', POS_ENCODINGS)
def test_deformable_sdpa_gets_fused_layout_cpu(monkeypatch, pos_enc: str) -> None:
    torch.manual_seed(0)
    block = DAttention(64, heads=4, groups=2, fmap_size=14, stride=2, offset_range_factor=2.0, ksize=3,
                       pos_enc=pos_enc, attn_impl='fused')
    q, k, v, mask, p, scale = _sdpa_inputs(monkeypatch, block, torch.randn(2, 64, 14, 14))
    assert all(t.dim() == 4 and t.stride(-1) == 1 and t.is_contiguous() for t in (q, k, v))
    choice = _choice(q, k, v, mask, p, scale)
    # The layout is never the reason: contiguous copies of the same inputs select the same backend.
    assert choice == _choice(q.contiguous(), k.contiguous(), v.contiguous(), mask, p, scale)
    # The CPU's flash kernel takes these inputs unless the bias needs a gradient (it has no bias gradient).
    if mask is None or not mask.requires_grad:
        assert choice == SDPBackend.FLASH_ATTENTION, (pos_enc, choice)
    assert attention_impl.sdpa_backend(q, k, v, mask, p, scale) == choice.name.lower()


@pytest.mark.skipif(not CUDA, reason='which fused SDPA backend CUDA offers needs a GPU')
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('pos_enc', POS_ENCODINGS)
def test_deformable_sdpa_is_not_math_cuda(monkeypatch, pos_enc: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    # DAT-T++'s stage-3 D block: 14 x 14 queries, 7 x 7 keys, head dim 32.
    block = DAttention(256, heads=8, groups=4, fmap_size=14, stride=2, offset_range_factor=-1, ksize=5,
                       pos_enc=pos_enc, attn_impl='auto').cuda()
    with torch.autocast('cuda', dtype=dtype):
        q, k, v, mask, p, scale = _sdpa_inputs(monkeypatch, block, torch.randn(4, 256, 14, 14, device='cuda'))
        name = attention_impl.sdpa_backend(q, k, v, mask, p, scale)
    assert name != 'math', (pos_enc, dtype)

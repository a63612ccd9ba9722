"""Rewrites inside the DAT++ blocks that must equal the plain formulas they replace."""
import pytest
import torch
import torch.nn as nn

from models.dat_blocks import residual_depthwise_conv


@pytest.mark.parametrize('kernel, channels_last', [(3, False), (3, True), (5, False), ((3, 5), False)])
def test_residual_depthwise_conv_is_x_plus_conv(kernel, channels_last):
    torch.manual_seed(0)
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    conv = nn.Conv2d(6, 6, k, padding=(k[0] // 2, k[1] // 2), groups=6).double()
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    results = []
    for fn in (lambda t: t + conv(t), lambda t: residual_depthwise_conv(conv, t)):
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.backward(grad)
        results.append((out, xi.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    for plain, folded in zip(*results):
        assert torch.allclose(plain, folded, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('conv', [nn.Conv2d(4, 4, 3, padding=1),                        # not depthwise
                                  nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),  # dilated
                                  nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode='reflect')])
def test_other_convs_keep_the_plain_sum(conv):
    x = torch.randn(1, 4, 6, 6)
    assert torch.allclose(residual_depthwise_conv(conv, x), x + conv(x), rtol=0, atol=0)


def test_dwc_mlp_traces_with_fx():
    """timm's FX feature extraction traces the blocks: the folded conv must be traceable."""
    from models.dat_blocks import TransformerMLPWithConv
    mlp = TransformerMLPWithConv(4, expansion=2).eval()
    x = torch.randn(1, 4, 5, 5)
    traced = torch.fx.symbolic_trace(mlp)
    assert torch.allclose(traced(x), mlp(x), rtol=0, atol=0)

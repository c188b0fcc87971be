"""Tests for training/networks.py: reference names/shapes/parameter counts, the primitives against closed forms,
attention against a brute-force float64 softmax, the preconditioners' coefficients, and config round trips."""

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from training import networks
from training.networks import (Conv2d, DhariwalUNet, EDMPrecond, FourierEmbedding, GroupNorm, Linear,
                               PositionalEmbedding, SongUNet, UNetBlock, VEPrecond, VPPrecond, build_network,
                               iDDPMPrecond, weight_init)

# The train.py --arch presets (reference-facts §1.1 / §3.3 / §3.4).
DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
NCSNPP = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
ADM = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])


def full_size(resolution, label_dim, augment_dim, arch, **overrides):
    """A full-size EDMPrecond on the meta device: shapes and counts without allocating or initialising weights."""
    with torch.device('meta'):
        return EDMPrecond(resolution, 3, label_dim, augment_dim=augment_dim, dropout=0.13, **{**arch, **overrides})


def shapes(module):
    return {name: list(t.shape) for name, t in module.state_dict().items()}


def num_params(module):
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------------------
# Full-size configurations: parameter counts and reference state-dict names.

@pytest.mark.parametrize('resolution, label_dim, augment_dim, arch, overrides, expected', [
    (32, 0, 9, DDPMPP, {}, 55_733_891),
    (32, 10, 9, DDPMPP, {}, 55_735_299),
    (32, 0, 9, NCSNPP, {}, 56_397_827),
    (64, 0, 9, DDPMPP, dict(channel_mult=[1, 2, 2, 2]), 61_805_571),
    (64, 0, 9, NCSNPP, dict(channel_mult=[1, 2, 2, 2]), 62_761_091),
    (64, 1000, 0, ADM, {}, 295_899_267),
], ids=['ddpmpp-cifar', 'ddpmpp-cifar-cond', 'ncsnpp-cifar', 'ddpmpp-64', 'ncsnpp-64', 'adm-64-cond'])
def test_full_size_parameter_counts(resolution, label_dim, augment_dim, arch, overrides, expected):
    assert num_params(full_size(resolution, label_dim, augment_dim, arch, **overrides)) == expected


def test_buffer_counts_match_reference():
    assert sum(b.numel() for b in full_size(32, 0, 9, DDPMPP).buffers()) == 32
    assert sum(b.numel() for b in full_size(32, 0, 9, NCSNPP).buffers()) == 288


CIFAR_ENC = (['32x32_conv'] + [f'32x32_block{i}' for i in range(4)]
             + ['16x16_down'] + [f'16x16_block{i}' for i in range(4)]
             + ['8x8_down'] + [f'8x8_block{i}' for i in range(4)])
CIFAR_DEC = (['8x8_in0', '8x8_in1'] + [f'8x8_block{i}' for i in range(5)]
             + ['16x16_up'] + [f'16x16_block{i}' for i in range(5)]
             + ['32x32_up'] + [f'32x32_block{i}' for i in range(5)] + ['32x32_aux_norm', '32x32_aux_conv'])


def test_ddpmpp_cifar_names_and_shapes():
    net = full_size(32, 10, 9, DDPMPP)
    assert list(net.model.enc.keys()) == CIFAR_ENC
    assert list(net.model.dec.keys()) == CIFAR_DEC
    s = shapes(net)
    expected = {
        'model.map_label.weight': [128, 10], 'model.map_label.bias': [128],
        'model.map_augment.weight': [128, 9],
        'model.map_layer0.weight': [512, 128], 'model.map_layer0.bias': [512],
        'model.map_layer1.weight': [512, 512],
        'model.enc.32x32_conv.weight': [128, 3, 3, 3], 'model.enc.32x32_conv.bias': [128],
        'model.enc.32x32_block0.norm0.weight': [128],
        'model.enc.32x32_block0.conv0.weight': [256, 128, 3, 3],
        'model.enc.32x32_block0.affine.weight': [256, 512],  # no adaptive scale: out channels, not 2·out
        'model.enc.32x32_block0.skip.weight': [256, 128, 1, 1],
        'model.enc.16x16_down.conv0.resample_filter': [1, 1, 2, 2],
        'model.enc.16x16_down.skip.resample_filter': [1, 1, 2, 2],
        'model.enc.16x16_down.skip.weight': [256, 256, 1, 1],  # resample_proj: a 1×1 conv even at equal width
        'model.enc.16x16_block0.qkv.weight': [768, 256, 1, 1],
        'model.enc.16x16_block0.proj.weight': [256, 256, 1, 1],
        'model.enc.16x16_block0.norm2.weight': [256],
        'model.dec.8x8_in0.qkv.weight': [768, 256, 1, 1],
        'model.dec.8x8_block0.conv0.weight': [256, 512, 3, 3],
        'model.dec.16x16_block4.qkv.weight': [768, 256, 1, 1],
        'model.dec.16x16_up.conv0.resample_filter': [1, 1, 2, 2],
        'model.dec.32x32_block0.conv0.weight': [256, 512, 3, 3],
        'model.dec.32x32_block4.conv0.weight': [256, 384, 3, 3],
        'model.dec.32x32_block4.skip.weight': [256, 384, 1, 1],
        'model.dec.32x32_aux_norm.weight': [256],
        'model.dec.32x32_aux_conv.weight': [3, 256, 3, 3],
    }
    for key, shape in expected.items():
        assert s.get(key) == shape, key
    assert not any(k.startswith('model.map_noise') for k in s)  # positional embedding has no state
    assert 'model.enc.32x32_conv.resample_filter' not in s  # the filter buffer exists only when resampling
    assert 'model.enc.32x32_block1.skip.weight' not in s  # equal widths, no resampling: identity skip
    assert 'model.enc.8x8_block0.qkv.weight' not in s and 'model.dec.16x16_block3.qkv.weight' not in s
    assert not any('aux_residual' in k for k in s)
    assert 'model.map_augment.bias' not in s


def test_ncsnpp_cifar_names_and_shapes():
    net = full_size(32, 0, 9, NCSNPP)
    enc = list(CIFAR_ENC)
    enc.insert(enc.index('16x16_down') + 1, '16x16_aux_residual')
    enc.insert(enc.index('8x8_down') + 1, '8x8_aux_residual')
    assert list(net.model.enc.keys()) == enc
    assert list(net.model.dec.keys()) == CIFAR_DEC
    s = shapes(net)
    expected = {
        'model.map_noise.freqs': [128], 'model.map_augment.weight': [256, 9], 'model.map_layer0.weight': [512, 256],
        'model.enc.16x16_down.conv0.resample_filter': [1, 1, 4, 4],
        'model.enc.16x16_aux_residual.weight': [256, 3, 3, 3],
        'model.enc.16x16_aux_residual.resample_filter': [1, 1, 4, 4],
        'model.enc.8x8_aux_residual.weight': [256, 256, 3, 3],
        'model.dec.32x32_aux_conv.weight': [3, 256, 3, 3],
    }
    for key, shape in expected.items():
        assert s.get(key) == shape, key
    assert 'model.map_label.weight' not in s


def test_adm_64_names_and_shapes():
    net = full_size(64, 1000, 0, ADM)
    enc = ['64x64_conv'] + [f'64x64_block{i}' for i in range(3)]
    dec = ['8x8_in0', '8x8_in1'] + [f'8x8_block{i}' for i in range(4)]
    for res in (32, 16, 8):
        enc += [f'{res}x{res}_down'] + [f'{res}x{res}_block{i}' for i in range(3)]
    for res in (16, 32, 64):
        dec += [f'{res}x{res}_up'] + [f'{res}x{res}_block{i}' for i in range(4)]
    assert list(net.model.enc.keys()) == enc
    assert list(net.model.dec.keys()) == dec
    s = shapes(net)
    expected = {
        'model.map_layer0.weight': [768, 192], 'model.map_layer1.weight': [768, 768],
        'model.map_label.weight': [768, 1000],
        'model.enc.64x64_conv.weight': [192, 3, 3, 3],
        'model.enc.64x64_block0.affine.weight': [384, 768],  # adaptive scale: (scale, shift)
        'model.enc.32x32_down.skip.resample_filter': [1, 1, 2, 2],
        'model.enc.32x32_block0.qkv.weight': [1152, 384, 1, 1],
        'model.dec.8x8_in0.qkv.weight': [2304, 768, 1, 1],
        'model.out_norm.weight': [192], 'model.out_conv.weight': [3, 192, 3, 3], 'model.out_conv.bias': [3],
    }
    for key, shape in expected.items():
        assert s.get(key) == shape, key
    assert 'model.map_label.bias' not in s and 'model.map_augment.weight' not in s
    assert 'model.enc.32x32_down.skip.weight' not in s  # same-width resampling skip is parameter-free
    heads = {name: block.num_heads for name, block in net.model.enc.items() if isinstance(block, UNetBlock)}
    assert heads['64x64_block0'] == 0 and heads['32x32_block0'] == 6
    assert heads['16x16_block0'] == 9 and heads['8x8_block0'] == 12
    assert net.model.dec['8x8_in0'].num_heads == 12 and net.model.dec['8x8_in1'].num_heads == 0


def test_iddpm_has_u_buffer_and_double_output_channels():
    with torch.device('meta'):
        net = iDDPMPrecond(64, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    assert shapes(net)['u'] == [1001]
    assert shapes(net)['model.out_conv.weight'] == [6, 16, 3, 3]


# ------------------------------------------------------------------------------------------------------------
# Primitives against closed forms.

def test_weight_init_bounds_and_zero_bias():
    torch.manual_seed(0)
    layer = Linear(40, 60, init_mode='xavier_uniform')
    bound = math.sqrt(6 / (40 + 60))
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert torch.equal(layer.bias, torch.zeros(60))
    w = weight_init([2000, 50], 'kaiming_normal', fan_in=50, fan_out=2000)
    assert abs(w.std().item() - math.sqrt(1 / 50)) < 0.01 * math.sqrt(1 / 50) * 5
    with pytest.raises(ValueError, match='bogus'):
        weight_init([2], 'bogus', 1, 1)


def test_linear_matches_matmul():
    torch.manual_seed(0)
    layer = Linear(5, 3, init_bias=1)
    x = torch.randn(4, 5)
    assert torch.allclose(layer(x), x @ layer.weight.T + layer.bias, atol=1e-6)
    assert not torch.equal(layer.bias, torch.zeros(3))


def test_conv2d_resampling_closed_forms():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True)
    assert list(dict(down.named_parameters())) == [] and down.resample_filter.shape == (1, 1, 2, 2)
    assert torch.allclose(down(x), F.avg_pool2d(x, 2), atol=1e-6)
    up = Conv2d(3, 3, kernel=0, up=True)
    assert torch.allclose(up(x), F.interpolate(x, scale_factor=2, mode='nearest'), atol=1e-6)
    assert Conv2d(3, 4, kernel=3).resample_filter is None
    assert 'resample_filter' not in Conv2d(3, 4, kernel=3).state_dict()
    with pytest.raises(ValueError):
        Conv2d(3, 3, kernel=3, up=True, down=True)

    # [1,3,3,1]: 4×4 binomial blur, stride 2, padding 1 — brute force in float64.
    blur = Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    taps = torch.tensor([1., 3., 3., 1.], dtype=torch.float64) / 8
    padded = F.pad(x.double(), (1, 1, 1, 1))
    expected = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            patch = padded[:, :, 2 * i:2 * i + 4, 2 * j:2 * j + 4]
            expected[:, :, i, j] = (patch * torch.outer(taps, taps)).sum((-1, -2))
    assert torch.allclose(blur(x).double(), expected, atol=1e-6)
    # Upsampling by [1,3,3,1] keeps a constant image constant (away from the zero-padded border).
    ones = Conv2d(1, 1, kernel=0, up=True, resample_filter=[1, 3, 3, 1])(torch.ones(1, 1, 6, 6))
    assert ones.shape == (1, 1, 12, 12) and torch.allclose(ones[..., 2:-2, 2:-2], torch.ones(1, 1, 8, 8))


@pytest.mark.parametrize('kernel, direction, fused', [(0, 'up', False), (0, 'down', False), (1, 'up', False),
                                                     (3, 'down', False), (3, 'up', True), (3, 'down', True)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_box_filter_resampling_equals_the_depthwise_convolutions(kernel, direction, fused, channels_last):
    # [1, 1] resampling runs as average pooling / nearest upsampling; the grouped convolutions it replaces
    # compute the same numbers (upsampling copies pixels, so bit for bit; pooling to float64 rounding).
    torch.manual_seed(0)
    conv = Conv2d(3, 4, kernel=kernel, up=direction == 'up', down=direction == 'down', fused_resample=fused,
                  init_bias=1).double()
    assert conv.box_filter and not Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 3, 3, 1]).box_filter
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).to(memory_format=memory_format).requires_grad_(True)

    def output_and_input_grad(box_filter):
        conv.box_filter = box_filter
        out = conv(x)
        (grad,) = torch.autograd.grad(out.mul(torch.arange(out.numel()).reshape(out.shape).sin()).sum(), x)
        return out, grad

    shortcut, shortcut_grad = output_and_input_grad(True)
    general, general_grad = output_and_input_grad(False)
    assert shortcut.shape == general.shape == (2, 4 if kernel else 3, 16 if direction == 'up' else 4, 16 if
                                               direction == 'up' else 4)
    if direction == 'up' and kernel == 0:
        assert torch.equal(shortcut, general)
    torch.testing.assert_close(shortcut, general, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shortcut_grad, general_grad, rtol=1e-12, atol=1e-12)


def test_conv2d_with_weights_and_fused_down():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    conv = Conv2d(3, 5, kernel=3, init_bias=1)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)
    # Fused downsampling: the 3×3 conv runs at full resolution, then the [1,3,3,1] blur strides by 2. Away from
    # the border ring (where the fused form pads once, wider) that is the composition of the two checked parts.
    fused = Conv2d(3, 5, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True, init_bias=1)
    blur = Conv2d(5, 5, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    composed = blur(F.conv2d(x, fused.weight, padding=1)) + fused.bias.reshape(1, -1, 1, 1)
    out = fused(x)
    assert out.shape == (2, 5, 8, 8)
    assert torch.allclose(out[..., 1:-1, 1:-1], composed[..., 1:-1, 1:-1], atol=1e-5)
    assert not torch.allclose(out, composed, atol=1e-5)  # ...and it is not the plain (pad-then-blur) form


def test_group_norm_groups_and_values():
    assert GroupNorm(16).num_groups == 4 and GroupNorm(256).num_groups == 32 and GroupNorm(96).num_groups == 24
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    norm = GroupNorm(16, eps=1e-6).double()
    grouped = x.reshape(2, 4, -1)
    expected = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.var(-1, unbiased=False, keepdim=True)
                                                                + 1e-6).sqrt()).reshape(x.shape)
    assert torch.allclose(norm(x), expected, atol=1e-10)


def test_positional_embedding_closed_form():
    x = torch.tensor([0.0, 0.3, 7.0, 250.0])
    for endpoint in (False, True):
        emb = PositionalEmbedding(8, endpoint=endpoint)(x)
        freqs = [(1 / 10000) ** (i / (4 - endpoint)) for i in range(4)]
        expected = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in x.tolist()]
        assert torch.allclose(emb, torch.tensor(expected), atol=1e-4)


def test_fourier_embedding_buffer_and_closed_form():
    torch.manual_seed(3)
    emb = FourierEmbedding(8)
    assert [name for name, _ in emb.named_buffers()] == ['freqs'] and emb.freqs.shape == (4,)
    assert list(emb.parameters()) == []
    torch.manual_seed(3)
    assert torch.allclose(emb.freqs, torch.randn(4) * 16)  # drawn from the global RNG at construction
    x = torch.tensor([0.1, -1.2])
    angle = 2 * math.pi * x[:, None].double() * emb.freqs[None, :].double()
    assert torch.allclose(emb(x).double(), torch.cat([angle.cos(), angle.sin()], 1), atol=1e-4)


def brute_force_attention(qkv, num_heads):
    """Float64 softmax attention read off the reference's interleaved channel layout, one index at a time."""
    qkv = qkv.double()
    batch, channels3, height, width = qkv.shape
    c = channels3 // (3 * num_heads)
    flat = qkv.reshape(batch, channels3, height * width)
    out = torch.zeros(batch, num_heads * c, height * width, dtype=torch.float64)
    for b in range(batch):
        for h in range(num_heads):
            def part(t):
                return torch.stack([flat[b, h * 3 * c + 3 * j + t] for j in range(c)])  # [c, HW]
            q, k, v = part(0), part(1), part(2)
            weights = torch.softmax(q.T @ k / math.sqrt(c), dim=1)  # [query pixel, key pixel]
            out[b, h * c:(h + 1) * c] = v @ weights.T
    return out.reshape(batch, num_heads * c, height, width)


@pytest.mark.parametrize('num_heads', [1, 2])
def test_attention_matches_brute_force(num_heads):
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 8, 4, 4) * 2
    assert torch.allclose(networks.attention(qkv, num_heads).double(), brute_force_attention(qkv, num_heads),
                          atol=1e-5)


def test_unet_block_attention_uses_interleaved_layout():
    torch.manual_seed(0)
    block = UNetBlock(16, 16, emb_channels=8, attention=True, num_heads=2, skip_scale=math.sqrt(0.5),
                      init_zero=dict(init_weight=1)).double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    emb = torch.randn(2, 8, dtype=torch.float64)
    captured = {}
    block.qkv.register_forward_hook(lambda module, inputs, output: captured.update(qkv=output, h=inputs[0]))
    out = block(x, emb)
    pre_attention = _pre_attention(block, x, emb)
    assert torch.allclose(captured['h'], block.norm2(pre_attention), atol=1e-12)
    expected = (block.proj(brute_force_attention(captured['qkv'], 2)) + pre_attention) * math.sqrt(0.5)
    assert torch.allclose(out, expected, atol=1e-10)


def _pre_attention(block, x, emb):
    """The block's output before attention, written out from the reference formula (adaptive scale)."""
    h = block.conv0(F.silu(block.norm0(x)))
    scale, shift = block.affine(emb)[:, :, None, None].chunk(2, dim=1)
    h = F.silu(shift + block.norm1(h) * (scale + 1))
    h = block.conv1(h)
    return (h + x) * math.sqrt(0.5)


# ------------------------------------------------------------------------------------------------------------
# Preconditioners: coefficients against closed forms, through a stub model that records its inputs.

class StubModel(torch.nn.Module):
    """Returns a constant F (with the model's channel count) and records what the preconditioner passed."""

    def __init__(self, value, out_channels=3):
        super().__init__()
        self.value = value
        self.out_channels = out_channels
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.calls.append(dict(x=x, noise_labels=noise_labels, class_labels=class_labels, kwargs=kwargs))
        return torch.full((x.shape[0], self.out_channels) + x.shape[2:], float(self.value), dtype=x.dtype)


TINY_SONG = dict(model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
TINY_ADM = dict(model_type='DhariwalUNet', model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
SIGMAS = [0.002, 0.05, 0.5, 1.0, 7.3, 80.0]


def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1):
    return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(1 + sigma ** 2)) - beta_min) / beta_d


def closed_form(net, sigma):
    """(c_skip, c_out, c_in, c_noise) written from reference-facts §3.5, in float64."""
    if isinstance(net, EDMPrecond):
        sd = net.sigma_data
        return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / math.sqrt(sigma ** 2 + sd ** 2),
                1 / math.sqrt(sd ** 2 + sigma ** 2), math.log(sigma) / 4)
    if isinstance(net, VEPrecond):
        return 1.0, sigma, 1.0, math.log(sigma / 2)
    if isinstance(net, VPPrecond):
        return 1.0, -sigma, 1 / math.sqrt(sigma ** 2 + 1), 999 * vp_sigma_inv(sigma)
    index = min(range(len(net.u)), key=lambda j: abs(sigma - net.u[j].item()))
    return 1.0, -sigma, 1 / math.sqrt(sigma ** 2 + 1), 999 - index


@pytest.mark.parametrize('cls, tiny', [(EDMPrecond, TINY_SONG), (VEPrecond, TINY_SONG), (VPPrecond, TINY_SONG),
                                       (iDDPMPrecond, TINY_ADM)])
def test_preconditioning_coefficients(cls, tiny):
    net = cls(8, 3, **tiny)
    out_channels = 6 if cls is iDDPMPrecond else 3
    x = torch.randn(len(SIGMAS), 3, 8, 8)
    sigma = torch.tensor(SIGMAS)
    net.model = StubModel(0.0, out_channels)
    zero_out = net(x, sigma)
    net.model = StubModel(1.0, out_channels)
    one_out = net(x, sigma)
    call = net.model.calls[0]
    for b, s in enumerate(SIGMAS):
        c_skip, c_out, c_in, c_noise = closed_form(net, s)
        assert torch.allclose(zero_out[b], c_skip * x[b], rtol=1e-5, atol=1e-6), (s, 'c_skip')
        assert torch.allclose(one_out[b] - zero_out[b], torch.full_like(x[b], c_out), rtol=1e-5, atol=1e-6), s
        assert torch.allclose(call['x'][b], c_in * x[b], rtol=1e-5, atol=1e-7), (s, 'c_in')
        assert call['noise_labels'][b].item() == pytest.approx(c_noise, rel=1e-5, abs=1e-5), (s, 'c_noise')
    assert call['noise_labels'].shape == (len(SIGMAS),) and call['class_labels'] is None
    assert zero_out.dtype == torch.float32


def test_preconditioner_labels_fp16_flag_and_scalar_sigma():
    net = EDMPrecond(8, 3, label_dim=4, use_fp16=True, **TINY_SONG)
    net.model = StubModel(0.0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    net(x, torch.tensor(1.0), augment_labels=torch.ones(2, 9))
    call = net.model.calls[-1]
    assert call['x'].dtype == torch.float32  # fp16 compute only on CUDA
    assert torch.equal(call['class_labels'], torch.zeros(1, 4)) and call['noise_labels'].shape == (1,)
    assert torch.equal(call['kwargs']['augment_labels'], torch.ones(2, 9))
    net(x.float(), 0.5, class_labels=torch.eye(4)[:2].double())
    assert net.model.calls[-1]['class_labels'].dtype == torch.float32


def test_vp_sigma_range():
    net = VPPrecond(8, 3, **TINY_SONG)
    assert net.sigma_min == 0.0009765625  # σ(1e-5) in float32 is exactly 2^-10
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-6)
    assert net.sigma_max == pytest.approx(152.1670, abs=1e-3)
    t = torch.tensor([0.01, 0.1, 0.5, 1.0])  # (σ(1e-5) itself is float32-rounded on purpose, see above)
    assert torch.allclose(net.sigma_inv(net.sigma(t)), t, rtol=1e-4)
    small = torch.tensor([1e-4, 0.002])  # σ⁻¹ stays accurate where 1 + σ² rounds in float32
    assert torch.allclose(net.sigma_inv(small).double(), torch.tensor([vp_sigma_inv(s) for s in small.tolist()],
                                                                       dtype=torch.float64), rtol=1e-5)
    assert torch.equal(net.round_sigma(torch.tensor([0.3])), torch.tensor([0.3]))


def reference_iddpm_u(C_1=0.001, C_2=0.008, M=1000):
    """The reference iDDPMPrecond's table, written out as it computes it: u = torch.zeros(M + 1) (float32), and
    alpha_bar(j) = (0.5 * np.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2 on a 0-d int64 tensor, so every
    operation of the recursion rounds to float32."""
    def alpha_bar(j):
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    u = torch.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def float64_iddpm_u(C_1=0.001, C_2=0.008, M=1000):
    u = [0.0] * (M + 1)  # brute-force float64 recurrence
    for j in range(M, 0, -1):
        ratio = math.sin(math.pi / 2 * (j - 1) / (M * (C_2 + 1))) ** 2 / math.sin(math.pi / 2 * j / (M * (C_2 + 1))) ** 2
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(ratio, C_1) - 1)
    return u


def test_iddpm_levels_are_the_reference_float32_recursion():
    """A new network's u is the reference's float32 table bit for bit (catches the exact float64 table rounded
    to float32, which differs in most levels); σ_min/σ_max are its entries. The ablation sampler's table stays
    the float64 recursion."""
    M = 1000
    net = iDDPMPrecond(8, 3, **TINY_ADM)
    reference = reference_iddpm_u()
    assert net.u.dtype == torch.float32 and torch.equal(net.u, reference)
    exact = torch.tensor(float64_iddpm_u(), dtype=torch.float64)
    assert (reference != exact.float()).sum() > M // 2  # the float32 recursion drifts off the exact values...
    assert torch.allclose(reference.double(), exact, rtol=5e-4, atol=0)  # ... by at most 4.8e-4 relative
    assert net.sigma_min == reference[M - 1].item() == pytest.approx(0.0064223, abs=1e-7)
    assert net.sigma_max == reference[0].item() == pytest.approx(20291.17, abs=0.01)
    assert net.u[M].item() == 0
    assert torch.allclose(torch.tensor(networks.iddpm_noise_levels(), dtype=torch.float64), exact, rtol=1e-12, atol=0)


def test_iddpm_sigma_range_follows_a_loaded_u_buffer():
    """σ_min/σ_max come from the buffer, also after load_state_dict (e.g. a reference file whose u differs)."""
    net = iDDPMPrecond(8, 3, **TINY_ADM)
    state = net.state_dict()
    state['u'] = state['u'] * 1.001
    net.load_state_dict(state)
    assert net.sigma_min == state['u'][999].item() and net.sigma_max == state['u'][0].item()
    from training.sampler import edm_sigma_steps
    steps = edm_sigma_steps(net, 5, 0.001, 1e6)  # clamped to the network's range: the loaded ends
    assert steps[0] == state['u'][0].item() and steps[-1] == state['u'][999].item()


def test_iddpm_round_sigma():
    net = iDDPMPrecond(8, 3, **TINY_ADM)
    M = 1000
    queries = torch.tensor([[0.001, 1.0], [3.7, 25000.0]], dtype=torch.float64)
    nearest = [min(range(M + 1), key=lambda j: abs(q - net.u[j].item())) for q in queries.flatten().tolist()]
    index = net.round_sigma(queries, return_index=True)
    assert index.shape == (2, 2) and index.flatten().tolist() == nearest
    snapped = net.round_sigma(queries)
    assert snapped.dtype == torch.float64 and snapped.shape == (2, 2)
    assert snapped.flatten().tolist() == [net.u[j].item() for j in nearest]


def test_edm_round_sigma_is_identity_and_ranges():
    net = EDMPrecond(8, 3, **TINY_SONG)
    assert net.sigma_min == 0 and net.sigma_max == float('inf') and net.sigma_data == 0.5
    assert torch.equal(net.round_sigma(torch.tensor([0.123])), torch.tensor([0.123]))
    ve = VEPrecond(8, 3, **TINY_SONG)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)


# ------------------------------------------------------------------------------------------------------------
# Tiny real networks: every arch × preconditioner runs forward and backward on the CPU.

TINY_ARCHS = {
    'ddpmpp': dict(DDPMPP, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    'ncsnpp': dict(NCSNPP, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    'skip-skip': dict(DDPMPP, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                      encoder_type='skip', decoder_type='skip'),
    'adm': dict(ADM, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
}
PRECONDS = {'vp': VPPrecond, 've': VEPrecond, 'edm': EDMPrecond, 'iddpm': iDDPMPrecond}


@pytest.mark.parametrize('arch', list(TINY_ARCHS))
@pytest.mark.parametrize('precond', list(PRECONDS))
def test_tiny_forward_backward(arch, precond):
    torch.manual_seed(0)
    label_dim = 4 if precond in ('edm', 'iddpm') else 0
    net = PRECONDS[precond](16, 3, label_dim=label_dim, augment_dim=9, dropout=0.1, **TINY_ARCHS[arch])
    with torch.no_grad():  # ADM zero-initialises conv1/proj/out_conv; perturb them so gradients reach every layer
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.1)
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.01, 0.7, 30.0])
    labels = torch.eye(4)[:3] if label_dim else None
    out = net(x, sigma, labels, augment_labels=torch.randn(3, 9))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.isfinite().all()
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and g.isfinite().all() for g in grads)
    assert net.model.map_layer0.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        plain = net(x, sigma)  # no labels (zeros if conditional) and no augment labels
    assert plain.shape == x.shape and plain.isfinite().all()


def test_songunet_embedding_is_sin_then_cos():
    net = SongUNet(8, 3, 3, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    captured = {}
    net.map_layer0.register_forward_pre_hook(lambda module, inputs: captured.update(emb=inputs[0]))
    noise = torch.tensor([0.3, 5.0])
    net(torch.randn(2, 3, 8, 8), noise)
    cos_sin = PositionalEmbedding(16, endpoint=True)(noise)
    assert torch.allclose(captured['emb'], torch.cat([cos_sin[:, 8:], cos_sin[:, :8]], 1))


def test_songunet_label_and_augment_conditioning():
    torch.manual_seed(0)
    net = SongUNet(8, 3, 3, label_dim=4, augment_dim=9, label_dropout=1.0, model_channels=16, channel_mult=[1],
                   num_blocks=1, attn_resolutions=[])
    seen = {}
    net.map_label.register_forward_pre_hook(lambda module, inputs: seen.update(label=inputs[0]))
    net.map_augment.register_forward_pre_hook(lambda module, inputs: seen.update(aug=True))
    x, noise, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 0.2]), torch.eye(4)[:2]
    net.eval()(x, noise, labels)
    assert torch.allclose(seen['label'], labels * 2) and 'aug' not in seen  # labels·√label_dim; no augment labels
    net.train()(x, noise, labels, augment_labels=torch.zeros(2, 9))
    assert torch.equal(seen['label'], torch.zeros(2, 4)) and seen['aug']  # label_dropout=1 drops every row


# ------------------------------------------------------------------------------------------------------------
# config and build_network.

@pytest.mark.parametrize('precond, arch, D', [('edm', 'ncsnpp', 128.0), ('edm', 'ddpmpp', 1.5), ('edm', 'adm', None),
                                          ('vp', 'ddpmpp', 128.0), ('iddpm', 'adm', 1.5), ('ve', 'skip-skip', None)])
def test_config_round_trip(precond, arch, D):
    torch.manual_seed(1)
    net = PRECONDS[precond](16, 3, label_dim=2, augment_dim=9, D=D, **TINY_ARCHS[arch])
    config = net.config
    assert json.loads(json.dumps(config)) == config  # plain data (EDM's σ_max = inf round-trips via Infinity)
    assert config['class_name'] == net.__class__.__name__ and config['D'] == D and net.D == D
    assert config['augment_dim'] == 9 and config['channel_mult'] == [1, 2] and 'dropout' in config
    rebuilt = build_network(json.loads(json.dumps(config)))
    assert type(rebuilt) is type(net) and rebuilt.D == D and rebuilt.config == config
    assert shapes(rebuilt) == shapes(net)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 3.0])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, sigma), net.eval()(x, sigma))
    for name in ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max'):
        assert getattr(rebuilt, name) == getattr(net, name)


def test_config_is_a_copy_and_uses_plain_types():
    net = EDMPrecond(8, 3, D=2, resample_filter=(1, 1), **TINY_SONG)
    config = net.config
    config['channel_mult'].append(7)
    assert net.config['channel_mult'] == [1] and net.config['resample_filter'] == [1, 1]
    assert net.config['D'] == 2.0 and isinstance(net.config['D'], float)


def test_build_network_rejects_bad_configs():
    good = EDMPrecond(8, 3, **TINY_SONG).config
    with pytest.raises(ValueError, match='Bogus'):
        build_network(dict(good, class_name='Bogus'))
    with pytest.raises(ValueError, match='class_name'):
        build_network({k: v for k, v in good.items() if k != 'class_name'})
    with pytest.raises(ValueError, match='not_an_option'):
        build_network(dict(good, not_an_option=1))
    with pytest.raises(ValueError, match='in_channels'):
        build_network(dict(good, in_channels=3))
    with pytest.raises(ValueError, match='NoNet'):
        build_network(dict(good, model_type='NoNet'))
    with pytest.raises(ValueError, match='-1'):
        build_network(dict(good, D=-1))
    with pytest.raises(ValueError, match='embedding_type'):
        build_network(dict(good, embedding_type='wavelet'))
    with pytest.raises(ValueError, match='channel_mult'):
        EDMPrecond(8, 3, **dict(TINY_SONG, channel_mult=[1, 1, 1, 1, 1]))


def test_dhariwal_embedding_is_cos_then_sin_and_labels_join_after_layer1():
    torch.manual_seed(0)
    net = DhariwalUNet(8, 3, 3, label_dim=4, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    seen = {}
    net.map_layer0.register_forward_pre_hook(lambda module, inputs: seen.update(emb=inputs[0]))
    net.enc['8x8_block0'].affine.register_forward_pre_hook(lambda module, inputs: seen.update(block_emb=inputs[0]))
    noise, labels = torch.tensor([0.3, 5.0]), torch.eye(4)[:2]
    net.eval()(torch.randn(2, 3, 8, 8), noise, labels)
    assert torch.allclose(seen['emb'], PositionalEmbedding(16)(noise))
    expected = F.silu(net.map_layer1(F.silu(net.map_layer0(seen['emb']))) + labels @ net.map_label.weight.T)
    assert torch.allclose(seen['block_emb'], expected, atol=1e-6)

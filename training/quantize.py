"""Post-training weight quantisation for the robustness sweep (PFGM++ paper §4c, generate_quant.py).

Per-tensor asymmetric uniform min/max *fake* quantisation: each selected weight tensor is rounded to one of 2^b
levels between its own min and max and immediately mapped back to float, so the network runs unchanged.

Which tensors: our default filter ('layers') quantises every conv/linear weight of the U-Net (all tensors named
`*.weight` with ≥ 2 dimensions: 3×3 and 1×1 convolutions, attention qkv/proj, skip and aux convolutions, the per-block
`affine` projections) and leaves alone GroupNorm weights, all biases, buffers and the `map_*` noise/label/augment
embedding network. The reference instead used a substring test ('reference' filter here): a tensor is quantised
when its name contains "weight" and none of "norm", "affine", "map", "32". The "32" test was presumably meant for
something else, but it also skips every layer at the 32×32 level (`enc.32x32_*`, `dec.32x32_*`), i.e. on CIFAR-10
the whole first and last level stay full precision while the per-block `affine` layers are never quantised.
"""

import torch

__all__ = ['FILTERS', 'fake_quantize', 'select_weights', 'quantize_weights']

FILTERS = ('layers', 'reference')


def fake_quantize(tensor, bits):
    """Quantise-dequantise one tensor with `bits` bits, the reference's arithmetic (zero point truncated by int()).

    Not torch.fake_quantize_per_tensor_affine: it takes the truncated zero point, but rounds the scale to float32
    and multiplies by its reciprocal instead of dividing, so on 1,200 random weight tensors (2-8 bits) it differs
    from this float64 arithmetic in 767 (ulps, and at rounding ties a whole level), which would change the
    quantised networks' samples."""
    if int(bits) != bits or bits < 1:
        raise ValueError(f'bits must be a positive integer, got {bits!r}')
    qmin, qmax = 0, 2 ** int(bits) - 1
    w = tensor.detach().to(torch.float64)
    w_min, w_max = w.min().item(), w.max().item()
    if w_max == w_min:  # a constant tensor is represented exactly
        return tensor.clone()
    scale = (w_max - w_min) / (qmax - qmin)
    zero_point = int(min(max(qmin - w_min / scale, qmin), qmax))
    q = (zero_point + w / scale).clamp(qmin, qmax).round()
    return (scale * (q - zero_point)).to(tensor.dtype)


def _selected(name, tensor, name_filter):
    if name_filter == 'reference':
        return 'weight' in name and not any(word in name for word in ('norm', 'affine', 'map', '32'))
    in_embedding = any(part.startswith('map_') for part in name.split('.'))
    return name.endswith('weight') and tensor.ndim >= 2 and not in_embedding


def select_weights(net, name_filter='layers'):
    """Names of the parameters `quantize_weights` would touch."""
    if name_filter not in FILTERS:
        raise ValueError(f'quantisation filter must be one of {", ".join(FILTERS)}, got {name_filter!r}')
    return [name for name, p in net.named_parameters() if _selected(name, p, name_filter)]


@torch.no_grad()
def quantize_weights(net, bits, name_filter='layers'):
    """Fake-quantise the selected weights of `net` in place; returns their names."""
    names = select_weights(net, name_filter)
    params = dict(net.named_parameters())
    for name in names:
        params[name].copy_(fake_quantize(params[name], bits))
    return names

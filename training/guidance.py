"""Guided denoisers: classifier-free guidance (CFG) and autoguidance, optionally limited to a σ interval.

    D_guided(x; σ, c) = D_guide(x; σ, ·) + W·(D_main(x; σ, c) − D_guide(x; σ, ·))

The guide is either the main network itself with the null label (CFG: the zero one-hot, which is what the
networks' label dropout feeds them during training) or a second network (autoguidance, Karras et al. 2024: an
earlier or smaller version of the main one, given the same labels). W = 1 is the main network alone: `guided()`
then returns the network unchanged, so unguided sampling keeps its exact bytes. W = 0 is the guide alone.

`GuidedDenoiser` stands where the samplers take a network: training/sampler.py's `denoise()` calls it as it calls
the network, so every solver, precision mode and noise injection works with it unchanged. With an interval
[σ_lo, σ_hi], guidance applies at the evaluations whose σ lies inside it (both ends included) and the main
network alone runs elsewhere (Kynkäänniemi et al. 2024). It counts its evaluations, so callers can report how
many were guided.
"""

import math

import torch

__all__ = ['GuidedDenoiser', 'guided', 'check_guide', 'label_dropout_of', 'parse_interval', 'folder_tag']


def label_dropout_of(net):
    """The label-dropout rate a network was trained with, from its configuration (0 for reference networks,
    which were all trained without it)."""
    network = getattr(net, 'network', net)  # a torch_utils.precision.NetworkCall holds the network
    config = getattr(network, 'config', None)
    return float(config.get('label_dropout', 0) or 0) if isinstance(config, dict) else 0.0


def check_guide(net, guide, guide_source):
    """ValueError when `guide` cannot guide `net`: resolution, channels, label space and D must all agree."""
    def describe(n):
        return dict(resolution=n.img_resolution, channels=n.img_channels, label_dim=n.label_dim,
                    D=getattr(n, 'D', None))
    main, other = describe(net), describe(guide)
    wrong = [f'{key} {other[key]} (main network: {main[key]})' for key in main if main[key] != other[key]]
    if wrong:
        raise ValueError(f'{guide_source} does not fit the main network: {", ".join(wrong)}; '
                         f'use a checkpoint of the same kind of model')


def parse_interval(text):
    """'σ_lo,σ_hi' → (σ_lo, σ_hi) with 0 ≤ σ_lo < σ_hi (σ_hi may be inf); ValueError otherwise."""
    if isinstance(text, str):
        parts = text.split(',')
    else:
        parts = list(text)
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise ValueError(f'guidance interval {text!r} is not two numbers "sigma_lo,sigma_hi"') from None
    if len(values) != 2 or not 0 <= values[0] < values[1] or math.isnan(values[1]):
        raise ValueError(f'guidance interval {text!r} must be "sigma_lo,sigma_hi" with 0 <= sigma_lo < sigma_hi')
    return values[0], values[1]


def folder_tag(weight, autoguidance, interval=None):
    """The part of an image folder's name that says what was guided: '' for W = 1, else `cfg{W}` or `ag{W}`, then
    `_gi{σ_lo}-{σ_hi}` with an interval (e.g. `cfg2_gi0.3-5`)."""
    if weight == 1:
        return ''
    tag = f'{"ag" if autoguidance else "cfg"}{weight:g}'
    if interval is not None:
        tag = f'{tag}_gi{interval[0]:g}-{interval[1]:g}'
    return tag


class GuidedDenoiser:
    """The guided denoiser, called as the network is: (x, σ [B], class_labels) → D_guided in float64.

    guide None: CFG with the null (zero) label, as one batched forward of [x; x] with labels [c; 0]. Other
    attributes (sigma_min, round_sigma, D, img_resolution, ...) are the main network's, so a sampler takes this
    wherever it takes the network.
    """

    def __init__(self, net, weight, guide=None, interval=None):
        if guide is None and not net.label_dim:
            raise ValueError('classifier-free guidance needs a class-conditional network (the guide is its null '
                             'label); guide an unconditional network with a guide network instead')
        self.net, self.weight, self.guide = net, float(weight), guide
        self.interval = None if interval is None else parse_interval(interval)
        self.evaluations = 0  # calls (one per network evaluation of the sampler)
        self.guided_evaluations = 0  # calls at which the guide ran

    def __getattr__(self, name):
        if name.startswith('__') or name in ('net', 'guide'):
            raise AttributeError(name)
        return getattr(self.net, name)

    def in_interval(self, sigma):
        if self.interval is None:
            return True
        return self.interval[0] <= float(sigma) <= self.interval[1]

    def __call__(self, x, sigma, class_labels=None):
        self.evaluations += 1
        if not self.in_interval(sigma.reshape(-1)[0]):
            return self.net(x, sigma, class_labels).to(torch.float64)
        self.guided_evaluations += 1
        if self.guide is None:
            null_labels = torch.zeros_like(class_labels)
            both = self.net(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([class_labels, null_labels]))
            main, guide = both.to(torch.float64).chunk(2)
        else:
            main = self.net(x, sigma, class_labels).to(torch.float64)
            guide = self.guide(x, sigma, class_labels).to(torch.float64)
        return guide + self.weight * (main - guide)


def guided(net, weight=1, guide=None, interval=None, guide_source='the guide network'):
    """`net` itself for W = 1 (the guide is skipped), else a GuidedDenoiser. ValueError for a guide that does not
    fit (check_guide) or CFG on an unconditional network."""
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f'guidance weight must be a finite number >= 0, got {weight:g}')
    if guide is not None:
        check_guide(net, guide, guide_source)
    if weight == 1:
        return net
    return GuidedDenoiser(net, weight, guide, interval)

"""The denoiser networks: SongUNet (ddpmpp, ncsnpp), DhariwalUNet (adm) and the VP / VE / iDDPM / EDM
preconditioners of Karras et al. (2022), with the augmentation dimension D of PFGM++.

Module, parameter and buffer names, shapes and constructor arguments follow the reference implementation, so a
reference state dict loads here with strict=True. A network is described by plain data: `net.config` is a
JSON-able dict and `build_network(config)` rebuilds the same module (checkpoints store only these two things).

PFGM++ conditions the network on σ = r/√D, so the preconditioning on σ does not depend on D; D is carried along
for the loss and the sampler prior (training/pfgmpp.py).
"""

import copy
import inspect
import math

import torch
from torch.nn import functional as F

from dnnlib.util import check_choice, plain_data
from training.pfgmpp import check_aug_dim
from training.schedules import vp_sigma, vp_sigma_inv

__all__ = [
    'weight_init', 'Linear', 'Conv2d', 'GroupNorm', 'attention', 'PositionalEmbedding', 'FourierEmbedding',
    'UNetBlock', 'SongUNet', 'DhariwalUNet', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond',
    'iddpm_noise_levels', 'iddpm_u_table',
    'build_network',
]

# ----------------------------------------------------------------------------------------------------------------
# Primitives. Weights stay float32; each layer casts them to the input's dtype, so fp16 runs need no weight copies.


def weight_init(shape, mode, fan_in, fan_out):
    """Random tensor for a layer's weight (or bias), drawn from the global torch RNG like any weight init."""
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'unknown init_mode {mode!r}; expected xavier_uniform, xavier_normal, kaiming_uniform '
                     f'or kaiming_normal')


class Linear(torch.nn.Module):
    """Fully connected layer; the bias is drawn like the weight and scaled by init_bias (0 gives zeros)."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(torch.nn.Module):
    """k×k convolution with optional 2× up- or downsampling by a separable FIR filter.

    kernel=0 makes a pure resampler without weights. The filter buffer exists only when resampling (the
    reference's state dicts have it exactly there). fused_resample convolves at full resolution first when
    downsampling, and upsamples before the convolution when upsampling.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        if up and down:
            raise ValueError('Conv2d cannot both upsample and downsample')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans)
                                          * init_weight) if kernel else None)
        self.bias = (torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        kernel_2d = torch.outer(taps, taps).unsqueeze(0).unsqueeze(1) / taps.sum().square()
        self.register_buffer('resample_filter', kernel_2d if up or down else None)
        # A two-tap box filter ([1, 1]: ddpmpp, adm) makes the depthwise resampling convolutions exactly 2×2
        # average pooling and nearest-neighbour upsampling, which are cheaper and fuse under torch.compile.
        self.box_filter = len(resample_filter) == 2 and float(resample_filter[0]) == float(resample_filter[1])

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = self._upsample(x, f, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = self._downsample(x, f, padding=0)
        else:
            if self.up:
                x = self._upsample(x, f, padding=f_pad)
            if self.down:
                x = self._downsample(x, f, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x

    def _upsample(self, x, f, padding):
        if self.box_filter:  # padding is 0 for two taps
            return F.interpolate(x, scale_factor=2, mode='nearest')
        # 4·filter keeps the mean: each output pixel receives a quarter of the taps.
        channels = x.shape[1]
        return F.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)

    def _downsample(self, x, f, padding):
        if self.box_filter:
            return F.avg_pool2d(x, 2)
        channels = x.shape[1]
        return F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)


class GroupNorm(torch.nn.Module):
    """Group normalisation with at most 32 groups and at least min_channels_per_group channels per group."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


def attention(qkv, num_heads):
    """Multi-head self-attention over the pixels of a [B, 3C, H, W] qkv map; returns [B, C, H, W].

    The channels are interleaved as in the reference: channel head·3c + 3j + t holds component j of q (t=0),
    k (t=1) or v (t=2) of that head, c = C / num_heads. Weights softmax(q·k / √c) over the keys, computed by
    the fused scaled_dot_product_attention kernels (flash / memory-efficient on CUDA).
    """
    batch, channels3, height, width = qkv.shape
    per_head = channels3 // (3 * num_heads)
    # One copy to [3, B, heads, HW, c]: the fused kernels need each head's c values contiguous (stride 1).
    q, k, v = (qkv.reshape(batch, num_heads, per_head, 3, height * width).permute(3, 0, 1, 4, 2).contiguous()
               .unbind(0))
    out = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(per_head))  # [B, heads, HW, c]
    if not qkv.is_contiguous() and qkv.is_contiguous(memory_format=torch.channels_last):
        # A channels-last network: return NHWC memory (B, HW, heads·c), a view for one head, so the next
        # convolution needs no layout change.
        return out.transpose(1, 2).reshape(batch, height, width, num_heads * per_head).permute(0, 3, 1, 2)
    return out.transpose(-1, -2).reshape(batch, num_heads * per_head, height, width)


class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding of a noise level: [cos(x·f_i), sin(x·f_i)], f_i geometric."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2π x f_i), sin(2π x f_i)], f_i ~ N(0, scale²) fixed at construction."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The U-Net building block shared by both architectures.


class UNetBlock(torch.nn.Module):
    """Residual block conditioned on an embedding, with optional resampling and self-attention.

    adaptive_scale=True modulates the normalised features by (1 + scale, shift) from the embedding (ADM);
    False adds the embedding before the second normalisation (DDPM++/NCSN++).
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init) if init is not None else {}
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None
                                                   else out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            a = attention(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x


def _drop_labels(labels, label_dropout, training):
    """Zero whole label rows with probability label_dropout during training (classifier-free guidance)."""
    if training and label_dropout:
        keep = torch.rand([labels.shape[0], 1], device=labels.device) >= label_dropout
        labels = labels * keep.to(labels.dtype)
    return labels


# ----------------------------------------------------------------------------------------------------------------
# Architectures.


def _add_decoder_level(dec, res, innermost, cin, skips, cout, num_blocks, block_kwargs, attention):
    """One decoder resolution of both U-Nets, under the reference's module names: the two middle blocks (innermost
    level) or an upsampling block, then num_blocks + 1 blocks that each take an encoder output from `skips`.
    attention(idx) says whether block idx attends. Returns the level's output channels."""
    if innermost:
        dec[f'{res}x{res}_in0'] = UNetBlock(cin, cin, attention=True, **block_kwargs)
        dec[f'{res}x{res}_in1'] = UNetBlock(cin, cin, **block_kwargs)
    else:
        dec[f'{res}x{res}_up'] = UNetBlock(cin, cin, up=True, **block_kwargs)
    for idx in range(num_blocks + 1):
        dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin + skips.pop(), cout, attention=attention(idx), **block_kwargs)
        cin = cout
    return cout


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. (2021), as configured by EDM.

    ddpmpp: embedding_type='positional', channel_mult_noise=1, encoder_type='standard', resample_filter=[1,1].
    ncsnpp: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1,3,3,1].
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                 decoder_type='standard', resample_filter=(1, 1)):
        check_choice('embedding_type', embedding_type, ('positional', 'fourier'))
        check_choice('encoder_type', encoder_type, ('standard', 'skip', 'residual'))
        check_choice('decoder_type', decoder_type, ('standard', 'skip'))
        _check_levels(img_resolution, channel_mult)
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)  # tiny, not zero: as the reference
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping from noise level, labels and augmentation labels to the block embedding.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == 'positional'
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. Keys ending in aux_* act on the auxiliary (downsampled input) path of the skip/residual encoders.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder: each block takes the current features concatenated with the matching encoder output.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            cout = _add_decoder_level(self.dec, res, level == len(channel_mult) - 1, cout, skips,
                                      model_channels * mult, num_blocks, block_kwargs,
                                      attention=lambda idx: idx == num_blocks and res in attn_resolutions)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        head = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                head = block(x)
            elif 'aux_conv' in name:
                head = block(F.silu(head))
                aux = head if aux is None else head + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(torch.nn.Module):
    """ADM U-Net of Dhariwal & Nichol (2021), as configured by EDM."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10, label_dropout=0):
        _check_levels(img_resolution, channel_mult)
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            cout = _add_decoder_level(self.dec, res, level == len(channel_mult) - 1, cout, skips,
                                      model_channels * mult, num_blocks, block_kwargs,
                                      attention=lambda idx: res in attn_resolutions)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)  # ADM keeps [cos, sin]
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


MODEL_TYPES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}
_MODEL_FIXED_ARGS = ('img_resolution', 'in_channels', 'out_channels', 'label_dim')  # set by the preconditioner


def _check_levels(img_resolution, channel_mult):
    if len(channel_mult) < 1 or img_resolution >> (len(channel_mult) - 1) < 1:
        raise ValueError(f'channel_mult {list(channel_mult)} has too many levels for {img_resolution}x'
                         f'{img_resolution} images (each level halves the resolution)')


def _model_parameters(model_type):
    """The constructor parameters of the model class `model_type`; ValueError for an unknown one."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f'unknown model_type {model_type!r}; expected one of {", ".join(MODEL_TYPES)}')
    return inspect.signature(MODEL_TYPES[model_type]).parameters


def _model_config(model_type, model_kwargs):
    """All constructor kwargs of the model (defaults filled in); ValueError for unknown types or kwargs."""
    params = _model_parameters(model_type)
    config = {name: p.default for name, p in params.items() if name not in _MODEL_FIXED_ARGS}
    for key, value in model_kwargs.items():
        if key not in config:
            raise ValueError(f'{model_type} has no constructor argument {key!r}')
        config[key] = value
    return plain_data(config)


# ----------------------------------------------------------------------------------------------------------------
# Preconditioners: D(x; σ) = c_skip(σ)·x + c_out(σ)·F((c_in(σ)·x), c_noise(σ)).


class _Preconditioner(torch.nn.Module):
    """Shared plumbing: builds the model, records the config, and applies the preconditioning in forward."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, D, model_type, model_kwargs, own_kwargs,
                 model_out_channels=None):
        super().__init__()
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.use_fp16 = bool(use_fp16)
        self.D = check_aug_dim(D)
        full_model_kwargs = _model_config(model_type, model_kwargs)
        self.model = MODEL_TYPES[model_type](
            img_resolution=self.img_resolution, in_channels=self.img_channels,
            out_channels=model_out_channels or self.img_channels, label_dim=self.label_dim, **full_model_kwargs)
        self._config = dict(class_name=type(self).__name__, img_resolution=self.img_resolution,
                            img_channels=self.img_channels, label_dim=self.label_dim, use_fp16=self.use_fp16,
                            D=self.D, **plain_data(own_kwargs), model_type=model_type, **full_model_kwargs)

    @property
    def config(self):
        """Plain-data constructor kwargs plus 'class_name'; build_network(config) rebuilds this network."""
        return copy.deepcopy(self._config)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def precondition(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for a float32 σ tensor; each has σ's shape."""
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, force_fp32=False, activation_dtype=None, **model_kwargs):
        """D(x; σ) in float32. The U-Net's activations are float16 when use_fp16 is set (CUDA only, as the
        reference), `activation_dtype` when given (e.g. bfloat16: torch_utils.precision's 'bf16-native'), and
        float32 under force_fp32 or otherwise. Weights stay float32 and are cast per layer."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        if force_fp32:
            dtype = torch.float32
        elif activation_dtype is not None:
            dtype = activation_dtype
        elif self.use_fp16 and x.device.type == 'cuda':  # fp16 only where it pays off
            dtype = torch.float16
        else:
            dtype = torch.float32
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)


class VPPrecond(_Preconditioner):
    """Variance-preserving (DDPM++) preconditioning; the network sees t = σ⁻¹(σ) scaled to [0, M−1]."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type='SongUNet', D=None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, D, model_type, model_kwargs,
                         dict(beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t))
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # float32 like the reference: σ(1e-5) rounds to exactly 2^-10.
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        return vp_sigma(torch.as_tensor(t, dtype=torch.float32), self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(torch.as_tensor(sigma), self.beta_d, self.beta_min)

    def precondition(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(_Preconditioner):
    """Variance-exploding (NCSN++) preconditioning."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type='SongUNet', D=None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, D, model_type, model_kwargs,
                         dict(sigma_min=sigma_min, sigma_max=sigma_max))
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def precondition(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


def iddpm_noise_levels(C_1=0.001, C_2=0.008, M=1000):
    """List of M + 1 float64 levels: u[M] = 0, u[j−1] = sqrt((u[j]² + 1) / max(ᾱ(j−1)/ᾱ(j), C_1) − 1), with
    ᾱ(j) = sin²(π/2 · j / (M(1 + C_2))): improved DDPM's cosine schedule, for the ablation sampler's iddpm
    discretisation. iDDPMPrecond's buffer is the same recursion in float32: iddpm_u_table."""
    def alpha_bar(j):
        return math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return u


def iddpm_u_table(C_1=0.001, C_2=0.008, M=1000):
    """iDDPMPrecond's buffer `u`: iddpm_noise_levels' recursion evaluated as the reference does, one float32
    operation at a time on 0-d tensors, so that a new network has the levels of the reference's files bit for bit
    (the float32 rounding accumulates along the recursion: up to 4.8e-4 relative to the exact values, σ_min
    0.0064223 rather than 0.0064254). Float32 [M + 1] tensor on the CPU."""
    def alpha_bar(j):
        return (0.5 * math.pi * torch.tensor(j, dtype=torch.float32) / M / (C_2 + 1)).sin() ** 2
    u = torch.zeros(M + 1, dtype=torch.float32)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clamp(min=C_1) - 1).sqrt()
    return u


class iDDPMPrecond(_Preconditioner):
    """Improved-DDPM preconditioning: a cosine schedule of M discrete noise levels u_M = 0 < ... < u_0.

    The model predicts 2·img_channels channels (the reference's learned variance); only the first half is used.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type='DhariwalUNet', D=None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, D, model_type, model_kwargs,
                         dict(C_1=C_1, C_2=C_2, M=M), model_out_channels=img_channels * 2)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.register_buffer('u', iddpm_u_table(C_1, C_2, M))

    # Read off the buffer, so that they follow a loaded state dict (e.g. a reference file's u).
    @property
    def sigma_min(self):
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self):
        return float(self.u[0])

    def precondition(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise

    def round_sigma(self, sigma, return_index=False):
        """Snap σ to the nearest u_j (or return j), keeping σ's shape and device."""
        sigma = torch.as_tensor(sigma)
        distance = (sigma.to(self.u.device, torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs()
        index = distance.argmin(dim=1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


class EDMPrecond(_Preconditioner):
    """EDM preconditioning (Karras et al. 2022, Table 1): unit-variance network inputs and targets."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', D=None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, D, model_type, model_kwargs,
                         dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data))
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def precondition(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


PRECONDITIONERS = {cls.__name__: cls for cls in (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond)}


def build_network(config):
    """Rebuild a preconditioned network from `net.config` (fresh weights; load a state dict to fill them in)."""
    if not isinstance(config, dict):
        raise ValueError(f'network config must be a dict, got {type(config).__name__}')
    kwargs = dict(config)
    class_name = kwargs.pop('class_name', None)
    if class_name not in PRECONDITIONERS:
        raise ValueError(f'unknown network class_name {class_name!r}; expected one of {", ".join(PRECONDITIONERS)}')
    cls = PRECONDITIONERS[class_name]
    own = [name for name, p in inspect.signature(cls).parameters.items() if p.kind != p.VAR_KEYWORD]
    model_type = kwargs.get('model_type', inspect.signature(cls).parameters['model_type'].default)
    model_params = _model_parameters(model_type)
    for key in kwargs:
        if key not in own and (key not in model_params or key in _MODEL_FIXED_ARGS):
            raise ValueError(f'network config key {key!r} is not an argument of {class_name} or {model_type}')
    return cls(**kwargs)

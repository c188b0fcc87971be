"""EDM's non-leaking augmentation pipe: random flips, geometric and colour transforms plus a label vector.

The network is told which augmentation happened (the labels feed `map_augment`), so augmented images do not
leak into the generated distribution: at sampling time the labels are absent and the network generates clean
images. Every enabled op draws its parameters for all N images from the global torch RNG (on the images'
device) and keeps them only where U(0,1) < multiplier·p; a non-applied op contributes zeros to its label slots.

Label layout, in this order, one block per enabled op:
    xflip bit | yflip bit | rotate_int: 2 bits (x flipped, y flipped) | translate_int: t_x, t_y (normalised) |
    scale w | rotate_frac: cos θ − 1, sin θ | aniso: w·cos r, w·sin r | translate_frac: t_x, t_y |
    brightness w | contrast w | lumaflip bit | hue: cos θ − 1, sin θ | saturation w
train.py's configuration (xflip=1e8, yflip=scale=rotate_frac=aniso=translate_frac=1) gives 9 labels.

Geometric coordinates are pixels measured from the image centre (x right, y down); the pipe composes the
inverse maps (output pixel -> input pixel) in the order scale, rotate, aniso, translate.

Nothing here reads tensor values back to the host, so the pipe can run inside a compiled/asynchronous step.
Two consequences of that and of accuracy (see resample_geometric): the reflect padding is always the largest
allowed (H−1, W−1) instead of a margin measured from the drawn parameters (same pixels where it matters), and
the half-pixel alignment of the 2× grid uses sym6's exact low-frequency delay, so quarter turns and whole-pixel
shifts of smooth images match torch.rot90 / shifts closely. Both integer and fractional translations move the
content by +t (right/down).
"""

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ['AugmentPipe', 'SYM6_LOWPASS', 'resample_geometric']

# Daubechies' least-asymmetric wavelet with 6 vanishing moments, decomposition low-pass (pywt.Wavelet('sym6').dec_lo).
# Orthonormal (Σh = √2, Σh² = 1), so 2× upsampling followed by 2× downsampling with it is the identity.
SYM6_LOWPASS = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
# Output border (in pixels) kept while resampling, so the downsampling filter sees real samples at the crop edge.
_FILTER_MARGIN = len(SYM6_LOWPASS) // 4
_FILTER_TAPS = tuple(h / sum(SYM6_LOWPASS) for h in SYM6_LOWPASS)  # unit DC gain
# Offset of the filter's centroid (its group delay at frequency 0) from the centre tap, in 2× pixels (≈ −0.40).
_FILTER_DELAY = sum(k * h for k, h in enumerate(SYM6_LOWPASS)) / sum(SYM6_LOWPASS) - (len(SYM6_LOWPASS) - 1) / 2

_GEOMETRIC_OPS = ('scale', 'rotate_frac', 'aniso', 'translate_frac')
_COLOUR_OPS = ('brightness', 'contrast', 'lumaflip', 'hue', 'saturation')
# Number of label slots of each op, in label order.
_LABEL_WIDTHS = {
    'xflip': 1, 'yflip': 1, 'rotate_int': 2, 'translate_int': 2,
    'scale': 1, 'rotate_frac': 2, 'aniso': 2, 'translate_frac': 2,
    'brightness': 1, 'contrast': 1, 'lumaflip': 1, 'hue': 2, 'saturation': 1,
}

# ---------------------------------------------------------------------------------------------------------------
# Batched homogeneous matrices. Arguments are tensors of shape [N] (or Python floats, broadcast to N).


def _identity(n, size, like):
    return torch.eye(size, dtype=like.dtype, device=like.device).expand(n, size, size).clone()


def _translate2d(tx, ty, like):
    m = _identity(like.shape[0], 3, like)
    m[:, 0, 2] = tx
    m[:, 1, 2] = ty
    return m


def _scale2d(sx, sy, like):
    m = _identity(like.shape[0], 3, like)
    m[:, 0, 0] = sx
    m[:, 1, 1] = sy
    return m


def _rotate2d(theta):
    """Rotation by θ (x towards y) in the image plane."""
    m = _identity(theta.shape[0], 3, theta)
    c, s = theta.cos(), theta.sin()
    m[:, 0, 0], m[:, 0, 1] = c, -s
    m[:, 1, 0], m[:, 1, 1] = s, c
    return m


def _translate3d(t, like):
    m = _identity(like.shape[0], 4, like)
    m[:, :3, 3] = t[:, None]
    return m


def _scale3d(s, like):
    m = _identity(like.shape[0], 4, like)
    for axis in range(3):
        m[:, axis, axis] = s
    return m


def _rotate3d(axis, theta):
    """Rotation by θ about the unit 3-vector `axis` (floats): cosθ·δ_ij + sinθ·[a]×_ij + (1 − cosθ)·a_i·a_j."""
    m = _identity(theta.shape[0], 4, theta)
    cross = [[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]]
    c, s = theta.cos(), theta.sin()
    for i in range(3):
        for j in range(3):
            m[:, i, j] = c * float(i == j) + s * cross[i][j] + (1 - c) * axis[i] * axis[j]
    return m


# ---------------------------------------------------------------------------------------------------------------
# Geometric resampling: reflect-pad, 2× upsample, bilinear sample, 2× downsample, crop.


@functools.lru_cache(maxsize=64)
def _filter_matrix(rows, cols, gain, row_step, col_step, offset, device, dtype):
    """Banded matrix M[j, i] = gain·taps[row_step·j − col_step·i + offset] (zero outside the sym6 filter).

    Built once per shape/device on the CPU and cached, so a training step copies nothing to the device.
    """
    taps = torch.tensor(_FILTER_TAPS, dtype=torch.float64) * gain
    index = torch.arange(rows)[:, None] * row_step - torch.arange(cols)[None, :] * col_step + offset
    inside = (index >= 0) & (index < len(taps))
    matrix = torch.where(inside, taps[index.clamp(0, len(taps) - 1)], torch.zeros((), dtype=torch.float64))
    return matrix.to(device=device, dtype=dtype)


def _upsample2x(images):
    """Zero-insert after every pixel, then convolve with 2·taps per axis (gain 4 keeps the mean).

    Written as banded matrix products, out[j] = Σ_i 2·taps[j − 2i + L/2 − 1]·x[i]: far faster than a
    one-channel convolution on the CPU, and exact.
    """
    h, w = images.shape[2], images.shape[3]
    offset = len(_FILTER_TAPS) // 2 - 1
    along_w = _filter_matrix(2 * w, w, 2.0, 1, 2, offset, images.device, images.dtype)
    along_h = _filter_matrix(2 * h, h, 2.0, 1, 2, offset, images.device, images.dtype)
    return along_h @ (images @ along_w.T)


def _downsample2x(images, crop):
    """Correlate with taps per axis (the adjoint of _upsample2x), keep every 2nd pixel, drop `crop` output pixels.

    out[i] = Σ_q taps[q − 2i − lo]·x[q] with lo = 2·crop − (L−1)//2, so the output is (size − 4·crop) / 2 wide.
    """
    h, w = images.shape[2], images.shape[3]
    lo = 2 * crop - (len(_FILTER_TAPS) - 1) // 2
    along_w = _filter_matrix((w - 4 * crop) // 2, w, 1.0, -2, -1, -lo, images.device, images.dtype)
    along_h = _filter_matrix((h - 4 * crop) // 2, h, 1.0, -2, -1, -lo, images.device, images.dtype)
    return along_h @ (images @ along_w.T)


def resample_geometric(images, inverse_matrices):
    """Warp images[N,C,H,W] by per-image inverse maps [N,3,3] (output pixel -> input pixel, centred coordinates).

    The images are reflect-padded by the largest margin reflection allows (H−1, W−1), which covers every
    sampled point the reference's data-dependent margin covers, without reading that margin back to the host;
    samples beyond it read zeros. Bilinear sampling happens at 2× resolution between sym6 low-pass up- and
    downsampling, which keeps aliasing low. Identity maps reproduce the input to ~1e-5.
    """
    n, c, h, w = images.shape
    m = inverse_matrices.to(images.dtype)

    images = F.pad(images, [w - 1, w - 1, h - 1, h - 1], mode='reflect')
    images = _upsample2x(images)
    # Centred input coordinate u lands at 2·u + δ (δ ≈ −0.40) in the upsampled image, and the downsampler reads
    # the 2× output grid with the same δ: sym6 is not symmetric, its low-frequency delay is ≈5.10 taps, not 5½.
    ones = m[:, 0, 0]
    delay = _FILTER_DELAY
    m = _translate2d(delay, delay, ones) @ _scale2d(2, 2, ones) @ m @ _scale2d(0.5, 0.5, ones) @ \
        _translate2d(-delay, -delay, ones)
    out_shape = [n, c, (h + 2 * _FILTER_MARGIN) * 2, (w + 2 * _FILTER_MARGIN) * 2]
    # grid_sample speaks normalised coordinates: centred pixels × 2/size (align_corners=False).
    m = _scale2d(2 / images.shape[3], 2 / images.shape[2], ones) @ m @ \
        _scale2d(out_shape[3] / 2, out_shape[2] / 2, ones)
    grid = F.affine_grid(m[:, :2, :], out_shape, align_corners=False)
    images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return _downsample2x(images, crop=_FILTER_MARGIN)


# ---------------------------------------------------------------------------------------------------------------


class AugmentPipe:
    """Reference-compatible augmentation pipe; a plain picklable object. `pipe(images) -> (images, labels)`.

    Multipliers (xflip ... saturation) scale the probability p of each op; 0 disables it (and its labels).
    """

    def __init__(self, p=1,
                 xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
                 scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2,
                 aniso_rotate_prob=0.5, translate_frac_std=0.125,
                 brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5,
                 hue_max=1, saturation_std=1):
        kwargs = {name: value for name, value in locals().items() if name != 'self'}
        self._kwargs = {}
        for name, value in kwargs.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f'AugmentPipe: {name} must be a number, got {value!r}') from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(f'AugmentPipe: {name} must be a finite number >= 0, got {value!r}')
            self._kwargs[name] = value
            setattr(self, name, value)

    @property
    def config(self):
        """Plain-data constructor kwargs plus 'class_name' (JSON-able; rebuilds an equal pipe)."""
        return {'class_name': 'training.augment.AugmentPipe', **self._kwargs}

    @property
    def enabled_ops(self):
        """Names of the ops with a nonzero multiplier, in label order."""
        return [name for name in _LABEL_WIDTHS if self._kwargs[name] > 0]

    @property
    def label_dim(self):
        """Length of the label vector (9 for train.py's configuration)."""
        return sum(_LABEL_WIDTHS[name] for name in self.enabled_ops)

    def __repr__(self):
        changed = ', '.join(f'{k}={v:g}' for k, v in self._kwargs.items() if v != _DEFAULTS[k])
        return f'AugmentPipe({changed})'

    def __call__(self, images):
        return self.apply(images, self.draw_parameters(images.shape[0], images.device))

    # -----------------------------------------------------------------------------------------------------------

    def draw_parameters(self, batch_size, device):
        """Random parameters of every enabled op, float32 tensors of shape [N] on `device` (global torch RNG).

        Values are already zeroed where the op is not applied. Keys: xflip, yflip (0/1), rotate_int (0..3 quarter
        turns), translate_int_x/_y (U(−1,1)), scale (w), rotate_frac (θ), aniso (w), aniso_angle (r),
        translate_frac_x/_y (w), brightness, contrast (w), lumaflip (0/1), hue (θ), saturation (w).
        """
        n = batch_size

        def gated(name, value, shape=(n,)):
            keep = torch.rand(shape, device=device) < self._kwargs[name] * self.p
            return torch.where(keep, value, torch.zeros_like(value))

        params = {}
        for name in self.enabled_ops:  # label order
            if name in ('xflip', 'yflip', 'lumaflip'):
                params[name] = gated(name, torch.randint(2, (n,), device=device).float())
            elif name == 'rotate_int':
                params[name] = gated(name, torch.randint(4, (n,), device=device).float())
            elif name == 'translate_int':
                shifts = gated(name, torch.rand((2, n), device=device) * 2 - 1, shape=(1, n))
                params['translate_int_x'], params['translate_int_y'] = shifts[0], shifts[1]
            elif name in ('scale', 'brightness', 'contrast', 'saturation'):
                params[name] = gated(name, torch.randn((n,), device=device))
            elif name == 'rotate_frac':
                angle = (torch.rand((n,), device=device) * 2 - 1) * (math.pi * self.rotate_frac_max)
                params[name] = gated(name, angle)
            elif name == 'aniso':
                params[name] = gated(name, torch.randn((n,), device=device))
                angle = (torch.rand((n,), device=device) * 2 - 1) * math.pi
                keep = torch.rand((n,), device=device) < self.aniso_rotate_prob
                params['aniso_angle'] = torch.where(keep, angle, torch.zeros_like(angle))
            elif name == 'translate_frac':
                shifts = gated(name, torch.randn((2, n), device=device), shape=(1, n))
                params['translate_frac_x'], params['translate_frac_y'] = shifts[0], shifts[1]
            elif name == 'hue':
                params[name] = gated(name, (torch.rand((n,), device=device) * 2 - 1) * (math.pi * self.hue_max))
        return params

    def apply(self, images, params):
        """Augment images[N,C,H,W] with given parameters (see draw_parameters). Returns (images, labels[N, K])."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f'AugmentPipe expects a float tensor [N,C,H,W], got '
                             f'{getattr(images, "shape", type(images).__name__)} {getattr(images, "dtype", "")}')
        missing = [key for key in self._required_keys() if key not in params]
        if missing:
            raise ValueError(f'AugmentPipe.apply: parameters lack {missing}')
        params = {key: value.to(images.device) for key, value in params.items()}
        out_dtype = images.dtype
        if images.dtype in (torch.float16, torch.bfloat16):
            images = images.float()  # resampling and colour matrices want full precision
        labels = []
        images = self._pixel_blit(images, params, labels)
        images = self._geometric(images, params, labels)
        images = self._colour(images, params, labels)
        n = images.shape[0]
        labels = torch.cat([x.to(torch.float32).reshape(n, -1) for x in labels], dim=1) if labels else \
            torch.zeros((n, 0), dtype=torch.float32, device=images.device)
        return images.to(out_dtype), labels

    def _required_keys(self):
        keys = []
        for name in self.enabled_ops:
            if name in ('translate_int', 'translate_frac'):
                keys += [name + '_x', name + '_y']
            else:
                keys += [name] + (['aniso_angle'] if name == 'aniso' else [])
        return keys

    def _pixel_blit(self, images, params, labels):
        n, c, h, w = images.shape
        as_mask = lambda value: value.view(n, 1, 1, 1)
        if self.xflip > 0:
            bit = params['xflip']
            images = torch.where(as_mask(bit) == 1, images.flip(3), images)
            labels.append(bit)
        if self.yflip > 0:
            bit = params['yflip']
            images = torch.where(as_mask(bit) == 1, images.flip(2), images)
            labels.append(bit)
        if self.rotate_int > 0:
            if h != w:
                raise ValueError(f'AugmentPipe: rotate_int needs square images, got {h}x{w}')
            quarter = as_mask(params['rotate_int'])
            flip_x = (quarter == 1) | (quarter == 2)
            flip_y = (quarter == 2) | (quarter == 3)
            # k quarter turns counter-clockwise (torch.rot90 convention) as flips and a transpose.
            images = torch.where(flip_x, images.flip(3), images)
            images = torch.where(flip_y, images.flip(2), images)
            images = torch.where((quarter == 1) | (quarter == 3), images.transpose(2, 3), images)
            labels += [flip_x, flip_y]
        if self.translate_int > 0:
            # Whole-pixel shift by (t_x, t_y) with mirrored borders; the labels are the shifts / max shift.
            tx = (params['translate_int_x'] * (w * self.translate_int_max)).round()
            ty = (params['translate_int_y'] * (h * self.translate_int_max)).round()
            source_x = _reflect_index(torch.arange(w, device=images.device)[None, :] - tx[:, None].long(), w)
            source_y = _reflect_index(torch.arange(h, device=images.device)[None, :] - ty[:, None].long(), h)
            images = images.gather(3, source_x[:, None, None, :].expand(n, c, h, w))
            images = images.gather(2, source_y[:, None, :, None].expand(n, c, h, w))
            labels += [tx / (w * self.translate_int_max), ty / (h * self.translate_int_max)]
        return images

    def _geometric(self, images, params, labels):
        if not any(self._kwargs[name] > 0 for name in _GEOMETRIC_OPS):
            return images
        n = images.shape[0]
        like = torch.zeros(n, dtype=torch.float32, device=images.device)
        inverse = _identity(n, 3, like)
        if self.scale > 0:
            amount = params['scale'].to(like)
            s = torch.exp2(amount * self.scale_std)
            inverse = inverse @ _scale2d(1 / s, 1 / s, like)
            labels.append(amount)
        if self.rotate_frac > 0:
            theta = params['rotate_frac'].to(like)
            inverse = inverse @ _rotate2d(theta)  # inverse of a rotation by −θ
            labels += [theta.cos() - 1, theta.sin()]
        if self.aniso > 0:
            amount, r = params['aniso'].to(like), params['aniso_angle'].to(like)
            s = torch.exp2(amount * self.aniso_std)
            # Stretch x by s and y by 1/s in a frame rotated by r.
            inverse = inverse @ _rotate2d(r) @ _scale2d(1 / s, s, like) @ _rotate2d(-r)
            labels += [amount * r.cos(), amount * r.sin()]
        if self.translate_frac > 0:
            wx, wy = params['translate_frac_x'].to(like), params['translate_frac_y'].to(like)
            height, width = images.shape[2], images.shape[3]
            # Content moves by (t_x, t_y) pixels: output pixel v reads input pixel v − t.
            inverse = inverse @ _translate2d(-wx * (width * self.translate_frac_std),
                                             -wy * (height * self.translate_frac_std), like)
            labels += [wx, wy]
        return resample_geometric(images, inverse)

    def _colour(self, images, params, labels):
        if not any(self._kwargs[name] > 0 for name in _COLOUR_OPS):
            return images
        n, c, h, w = images.shape
        if c not in (1, 3):
            raise ValueError(f'AugmentPipe: colour ops need 1 or 3 channels, got {c}')
        like = torch.zeros(n, dtype=torch.float32, device=images.device)
        luma = (1 / math.sqrt(3),) * 3  # the grey axis
        luma_projector = torch.zeros((n, 4, 4), dtype=like.dtype, device=like.device)
        luma_projector[:, :3, :3] = 1 / 3  # a·aᵀ
        matrix = _identity(n, 4, like)
        if self.brightness > 0:
            b = params['brightness'].to(like)
            matrix = _translate3d(b * self.brightness_std, like) @ matrix
            labels.append(b)
        if self.contrast > 0:
            amount = params['contrast'].to(like)
            matrix = _scale3d(torch.exp2(amount * self.contrast_std), like) @ matrix
            labels.append(amount)
        if self.lumaflip > 0:
            bit = params['lumaflip'].to(like)
            # Householder reflection of the luma component: x − 2·(a·x)·a.
            matrix = (_identity(n, 4, like) - 2 * luma_projector * bit[:, None, None]) @ matrix
            labels.append(bit)
        if self.hue > 0:
            theta = params['hue'].to(like)
            matrix = _rotate3d(luma, theta) @ matrix
            labels += [theta.cos() - 1, theta.sin()]
        if self.saturation > 0:
            amount = params['saturation'].to(like)
            s = torch.exp2(amount * self.saturation_std)[:, None, None]
            # Keep the luma component, scale the chroma plane by s (homogeneous row untouched).
            chroma = _identity(n, 4, like) - luma_projector
            chroma[:, 3, 3] = 0
            matrix = (luma_projector + chroma * s + _homogeneous_unit(n, like)) @ matrix
            labels.append(amount)
        matrix = matrix.to(images.dtype)
        pixels = images.reshape(n, c, h * w)
        if c == 3:
            pixels = matrix[:, :3, :3] @ pixels + matrix[:, :3, 3:]
        else:
            # A grey image is r = g = b; the result is the mean of the three transformed channels.
            rows = matrix[:, :3, :].mean(dim=1, keepdim=True)
            pixels = pixels * rows[:, :, :3].sum(dim=2, keepdim=True) + rows[:, :, 3:]
        return pixels.reshape(n, c, h, w)


_DEFAULTS = {name: float(value) for name, value in AugmentPipe().config.items() if name != 'class_name'}


def _homogeneous_unit(n, like):
    m = torch.zeros((n, 4, 4), dtype=like.dtype, device=like.device)
    m[:, 3, 3] = 1
    return m


def _reflect_index(index, size):
    """Fold indices into [0, size) by mirroring about the edge pixels (… 2 1 0 1 2 …)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * size - 2
    return size - 1 - (size - 1 - index % period).abs()

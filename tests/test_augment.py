"""AugmentPipe: exact pixel ops, geometric resampling against closed forms, colour matrices, label layout, rates."""

import math
import pickle

import numpy as np
import pytest
import torch

from training.augment import SYM6_LOWPASS, AugmentPipe, resample_geometric
from training import augment as augment_module

TRAIN_CONFIG = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
ALL_OPS = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
               brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def smooth_function(x, y):
    """A band-limited test pattern in centred pixel coordinates (periods of ≥ 12 pixels)."""
    return torch.sin(0.35 * x + 0.4) + 0.6 * torch.cos(0.25 * y - 0.3 * x) + 0.3 * torch.sin(0.2 * y)


def centred_grid(size, dtype=torch.float64):
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    y, x = torch.meshgrid(coords, coords, indexing='ij')
    return x, y


def smooth_image(size=24, channels=1, dtype=torch.float64):
    x, y = centred_grid(size, dtype)
    return smooth_function(x, y)[None, None].repeat(1, channels, 1, 1)


def interior(images, border=7):
    return images[..., border:-border, border:-border]


# --- configuration ---------------------------------------------------------------------------------------------

def test_config_has_reference_defaults_as_floats_and_rebuilds():
    pipe = AugmentPipe(**TRAIN_CONFIG)
    config = pipe.config
    assert config['class_name'] == 'training.augment.AugmentPipe'
    assert config['xflip'] == 1e8 and config['p'] == 0.12 and config['rotate_int'] == 0.0
    assert config['translate_int_max'] == 0.125 and config['scale_std'] == 0.2 and config['aniso_rotate_prob'] == 0.5
    assert config['contrast_std'] == 0.5 and config['hue_max'] == 1.0 and config['saturation_std'] == 1.0
    assert all(type(value) is float for key, value in config.items() if key != 'class_name')
    assert len(config) == 1 + 24
    rebuilt = AugmentPipe(**{k: v for k, v in config.items() if k != 'class_name'})
    assert rebuilt.config == config
    assert pickle.loads(pickle.dumps(pipe)).config == config
    assert pipe.label_dim == 9 and AugmentPipe(**ALL_OPS).label_dim == 19 and AugmentPipe().label_dim == 0


@pytest.mark.parametrize('kwargs', [dict(p=-0.1), dict(scale=float('nan')), dict(xflip='often')])
def test_bad_constructor_values_raise_value_error(kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
        AugmentPipe(**kwargs)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match='float tensor'):
        AugmentPipe(xflip=1)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match='square'):
        AugmentPipe(rotate_int=1)(torch.zeros(2, 1, 8, 6))
    with pytest.raises(ValueError, match='1 or 3 channels'):
        AugmentPipe(brightness=1)(torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match='lack'):
        AugmentPipe(scale=1).apply(torch.zeros(2, 1, 8, 8), {})


# --- identities ----------------------------------------------------------------------------------------------

def test_sym6_filter_is_orthonormal_lowpass():
    h = np.asarray(SYM6_LOWPASS, dtype=np.float64)
    assert h.sum() == pytest.approx(math.sqrt(2), abs=1e-12)
    for shift in range(0, 6):
        assert np.dot(h[2 * shift:], h[:len(h) - 2 * shift]) == pytest.approx(float(shift == 0), abs=1e-12)
    # Six vanishing moments of the matching high-pass g_k = (−1)^k h_{L−1−k}.
    g = h[::-1] * (-1.0) ** np.arange(len(h))
    for moment in range(6):
        assert abs(np.sum(g * np.arange(len(h), dtype=np.float64) ** moment)) < 1e-6 * 11 ** moment


def brute_force_up(vector, taps):
    """Zero-insert, pad by (L/2, L/2 − 1), true convolution with 2·taps (numpy's 'valid' convolve flips)."""
    inserted = np.zeros(2 * len(vector))
    inserted[0::2] = vector
    half = len(taps) // 2
    return np.convolve(np.pad(inserted, (half, half - 1)), 2 * taps, mode='valid')


def brute_force_down(vector, taps, crop):
    """Drop 2·crop − (L−1)//2 samples each side, correlate with taps, keep every 2nd sample."""
    lo, hi = 2 * crop - (len(taps) - 1) // 2, 2 * crop - (len(taps) - 2) // 2
    return np.correlate(vector[lo:len(vector) - hi], taps, mode='valid')[0::2]


def test_upsample_and_downsample_match_brute_force_filtering():
    rng = np.random.default_rng(0)
    taps = np.asarray(SYM6_LOWPASS) / np.sum(SYM6_LOWPASS)
    image = rng.standard_normal((7, 6))
    expected = np.apply_along_axis(brute_force_up, 1, image, taps)
    expected = np.apply_along_axis(brute_force_up, 0, expected, taps)
    up = augment_module._upsample2x(torch.tensor(image)[None, None])[0, 0].numpy()
    assert up.shape == (14, 12) and np.allclose(up, expected, atol=1e-12)
    big = rng.standard_normal((2 * 7 + 12, 2 * 6 + 12))
    expected = np.apply_along_axis(brute_force_down, 1, big, taps, 3)
    expected = np.apply_along_axis(brute_force_down, 0, expected, taps, 3)
    down = augment_module._downsample2x(torch.tensor(big)[None, None], crop=3)[0, 0].numpy()
    assert down.shape == (7, 6) and np.allclose(down, expected, atol=1e-12)
    # Downsampling with the same filter undoes upsampling away from the borders (perfect reconstruction).
    y = torch.tensor(rng.standard_normal((2, 3, 20, 20)))
    roundtrip = augment_module._downsample2x(augment_module._upsample2x(y), crop=0)
    assert torch.allclose(interior(roundtrip, 4), interior(y, 4), atol=1e-10)


def test_identity_resampling_changes_images_by_only_1e5():
    torch.manual_seed(1)
    for shape in [(3, 3, 16, 16), (2, 1, 8, 12)]:
        images = torch.rand(shape) * 2 - 1
        out = resample_geometric(images, torch.eye(3).expand(shape[0], 3, 3))
        assert out.shape == images.shape and out.dtype == images.dtype
        assert (out - images).abs().max() < 5e-5


def test_p_zero_returns_input_and_zero_labels():
    torch.manual_seed(2)
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    pixel_and_colour = AugmentPipe(p=0, **{k: v for k, v in ALL_OPS.items()
                                           if k not in ('scale', 'rotate_frac', 'aniso', 'translate_frac')})
    out, labels = pixel_and_colour(images)
    assert torch.equal(out, images)
    assert labels.shape == (6, pixel_and_colour.label_dim) and labels.dtype == torch.float32
    assert torch.count_nonzero(labels) == 0
    out, labels = AugmentPipe(**{**TRAIN_CONFIG, 'p': 0})(images)
    assert (out - images).abs().max() < 5e-5
    assert labels.shape == (6, 9) and torch.count_nonzero(labels) == 0


# --- pixel blitting --------------------------------------------------------------------------------------------

def test_xflip_and_yflip_are_exact_and_labelled():
    torch.manual_seed(3)
    images = torch.randn(64, 2, 5, 7)
    out, labels = AugmentPipe(xflip=1, yflip=1)(images)
    assert labels.shape == (64, 2)
    for image, result, (fx, fy) in zip(images, out, labels.tolist()):
        expected = image.flip(2) if fx else image
        expected = expected.flip(1) if fy else expected
        assert torch.equal(result, expected)
    assert 0 < labels[:, 0].sum() < 64 and 0 < labels[:, 1].sum() < 64


def test_rotate_int_is_exact_rot90_with_flip_bits():
    torch.manual_seed(4)
    images = torch.randn(64, 1, 6, 6)
    pipe = AugmentPipe(rotate_int=1)
    params = pipe.draw_parameters(64, images.device)
    out, labels = pipe.apply(images, params)
    # Bits (x flipped, y flipped) of k quarter turns: k=1 (1,0), k=2 (1,1), k=3 (0,1).
    bits_of_turns = {0: [0, 0], 1: [1, 0], 2: [1, 1], 3: [0, 1]}
    seen = set()
    for image, result, turns, bits in zip(images, out, params['rotate_int'].long().tolist(), labels.tolist()):
        assert torch.equal(result, torch.rot90(image, turns, dims=(1, 2)))
        assert bits == bits_of_turns[turns]
        seen.add(turns)
    assert seen == {0, 1, 2, 3}


def test_translate_int_is_exact_mirrored_shift():
    torch.manual_seed(5)
    n, height, width = 32, 6, 8
    images = torch.randn(n, 2, height, width, dtype=torch.float64)
    pipe = AugmentPipe(translate_int=1, translate_int_max=0.5)
    out, labels = pipe(images)

    def mirror(index, size):  # brute force: walk back and forth over 0..size−1
        path = list(range(size)) + list(range(size - 2, 0, -1))
        return path[index % len(path)]

    for image, result, (lx, ly) in zip(images, out, labels.tolist()):
        tx, ty = round(lx * width * 0.5), round(ly * height * 0.5)
        assert lx * width * 0.5 == pytest.approx(tx) and abs(tx) <= width // 2
        expected = torch.empty_like(image)
        for y in range(height):
            for x in range(width):
                expected[:, y, x] = image[:, mirror(y - ty, height), mirror(x - tx, width)]
        assert torch.equal(result, expected)
    assert torch.count_nonzero(labels) > n  # shifts actually happened


# --- geometric ops against closed forms ---------------------------------------------------------------------------

def geometric_pipe(**ops):
    return AugmentPipe(p=1, **{name: 1 for name in ops})


def forced(pipe, images, **values):
    params = {key: torch.tensor([float(value)]) for key, value in values.items()}
    return pipe.apply(images, params)


@pytest.mark.parametrize('turns', [1, -1, 2])
def test_rotation_by_quarter_turns_matches_rot90(turns):
    image = smooth_image()
    out, labels = forced(geometric_pipe(rotate_frac=1), image, rotate_frac=turns * math.pi / 2)
    # Output pixel v reads the input at R(θ)·v; for θ = π/2 that is torch.rot90's (counter-clockwise) turn.
    assert (interior(out) - interior(torch.rot90(image, turns, dims=(2, 3)))).abs().max() < 1e-2
    assert labels[0].tolist() == pytest.approx([math.cos(turns * math.pi / 2) - 1, math.sin(turns * math.pi / 2)],
                                               abs=1e-6)


def test_fractional_rotation_matches_rotated_function():
    x, y = centred_grid(24)
    theta = 0.7
    out, _ = forced(geometric_pipe(rotate_frac=1), smooth_function(x, y)[None, None], rotate_frac=theta)
    # Output pixel v reads the input at R(θ)·v.
    source_x = math.cos(theta) * x - math.sin(theta) * y
    source_y = math.sin(theta) * x + math.cos(theta) * y
    assert (interior(out[0, 0]) - interior(smooth_function(source_x, source_y))).abs().max() < 1e-2


def test_translation_by_whole_pixels_matches_shift():
    image = smooth_image()
    w_x, w_y = 3 / (24 * 0.125), -2 / (24 * 0.125)  # 3 pixels right, 2 up
    out, labels = forced(geometric_pipe(translate_frac=1), image, translate_frac_x=w_x, translate_frac_y=w_y)
    expected = torch.roll(image, shifts=(-2, 3), dims=(2, 3))
    # Whole-pixel shifts land on the 2× grid, so bilinear sampling is exact and up/down cancel.
    assert (interior(out) - interior(expected)).abs().max() < 1e-6
    assert labels[0].tolist() == pytest.approx([w_x, w_y])


def test_scale_by_two_and_order_scale_then_translate():
    x, y = centred_grid(24)
    image = smooth_function(x, y)[None, None]
    out, labels = forced(geometric_pipe(scale=1), image, scale=5)  # 2^(0.2·5) = 2
    assert (interior(out[0, 0]) - interior(smooth_function(x / 2, y / 2))).abs().max() < 1e-2
    assert labels[0].tolist() == [5.0]
    # Scale first, then translate by t pixels: output(v) = f((v − t) / 2).
    pipe = geometric_pipe(scale=1, translate_frac=1)
    out, _ = forced(pipe, image, scale=5, translate_frac_x=1.5 / 3, translate_frac_y=0)
    assert (interior(out[0, 0]) - interior(smooth_function((x - 1.5) / 2, y / 2))).abs().max() < 1e-2


@pytest.mark.parametrize('angle', [0.0, math.pi / 2, 0.6])
def test_anisotropic_scale_in_rotated_frame(angle):
    x, y = centred_grid(24)
    image = smooth_function(x, y)[None, None]
    w = 2.5  # s = 2^(0.2·2.5) = √2: stretch by √2 along the frame's x axis, squeeze by 1/√2 along its y axis
    out, labels = forced(geometric_pipe(aniso=1), image, aniso=w, aniso_angle=angle)
    s, c, sn = math.sqrt(2), math.cos(angle), math.sin(angle)
    # Output pixel v: rotate into the frame (by −r), undo the stretch, rotate back.
    frame_x, frame_y = c * x + sn * y, -sn * x + c * y
    frame_x, frame_y = frame_x / s, frame_y * s
    source_x, source_y = c * frame_x - sn * frame_y, sn * frame_x + c * frame_y
    assert (interior(out[0, 0]) - interior(smooth_function(source_x, source_y))).abs().max() < 2e-2
    assert labels[0].tolist() == pytest.approx([w * c, w * sn], abs=1e-6)


# --- label layout and frequencies -------------------------------------------------------------------------------

def test_train_config_label_layout():
    pipe = AugmentPipe(**TRAIN_CONFIG)
    values = dict(xflip=1, yflip=0, scale=0.5, rotate_frac=0.3, aniso=-1.2, aniso_angle=0.8,
                  translate_frac_x=0.25, translate_frac_y=-0.5)
    images = smooth_image(16, channels=3, dtype=torch.float32)
    _, labels = forced(pipe, images, **values)
    expected = [1, 0, 0.5, math.cos(0.3) - 1, math.sin(0.3), -1.2 * math.cos(0.8), -1.2 * math.sin(0.8), 0.25, -0.5]
    assert labels.shape == (1, 9)
    assert labels[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_train_config_frequencies_on_2000_samples():
    torch.manual_seed(6)
    n = 2000
    images = torch.rand(n, 1, 8, 8) * 2 - 1
    out, labels = AugmentPipe(**TRAIN_CONFIG)(images)
    assert labels.shape == (n, 9) and out.shape == images.shape
    rate = lambda columns: (labels[:, columns] != 0).any(dim=1).float().mean().item()
    assert rate([0]) == pytest.approx(0.5, abs=0.04)  # always armed (1e8·p ≥ 1), flips half the time
    assert rate([1]) == pytest.approx(0.06, abs=0.02)  # armed w.p. p, then a coin
    for name, columns in [('scale', [2]), ('rotate', [3, 4]), ('aniso', [5, 6]), ('translate', [7, 8])]:
        assert rate(columns) == pytest.approx(0.12, abs=0.025), name
    # About half of the anisotropic scalings happen in a rotated frame (w·sin r ≠ 0).
    aniso = labels[:, 5] != 0
    assert (labels[aniso, 6] != 0).float().mean().item() == pytest.approx(0.5, abs=0.15)


# --- colour ops -------------------------------------------------------------------------------------------------

def colour_pipe(name):
    return AugmentPipe(p=1, **{name: 1})


def test_brightness_and_contrast_closed_forms():
    torch.manual_seed(7)
    images = torch.rand(1, 3, 4, 4, dtype=torch.float64) * 2 - 1
    out, labels = forced(colour_pipe('brightness'), images, brightness=1.5)
    assert torch.allclose(out, images + 0.2 * 1.5, atol=1e-6) and labels.tolist() == [[1.5]]
    out, _ = forced(colour_pipe('contrast'), images, contrast=-2)
    assert torch.allclose(out, images * 2 ** (0.5 * -2), atol=1e-6)
    grey = images[:, :1]
    out, _ = forced(colour_pipe('brightness'), grey, brightness=-1)
    assert torch.allclose(out, grey - 0.2, atol=1e-6)


def test_lumaflip_hue_saturation_closed_forms():
    torch.manual_seed(8)
    images = torch.rand(1, 3, 4, 4, dtype=torch.float64) * 2 - 1
    luma = images.mean(dim=1, keepdim=True)
    out, labels = forced(colour_pipe('lumaflip'), images, lumaflip=1)
    assert torch.allclose(out, images - 2 * luma, atol=1e-6) and labels.tolist() == [[1.0]]
    # A third of a turn about the grey axis cycles R -> G -> B.
    out, labels = forced(colour_pipe('hue'), images, hue=2 * math.pi / 3)
    assert torch.allclose(out, images.roll(1, dims=1), atol=1e-6)
    assert labels[0].tolist() == pytest.approx([-1.5, math.sqrt(3) / 2], abs=1e-6)
    out, _ = forced(colour_pipe('saturation'), images, saturation=-1)  # chroma × 1/2, luma kept
    assert torch.allclose(out, luma + (images - luma) / 2, atol=1e-6)
    grey = images[:, :1]
    for name, value, expected in [('lumaflip', 1, -grey), ('hue', 1.0, grey), ('saturation', 2.0, grey)]:
        out, _ = forced(colour_pipe(name), grey, **{name: value})
        assert torch.allclose(out, expected, atol=1e-6), name


# --- determinism, dtype, device ----------------------------------------------------------------------------------

def test_deterministic_under_manual_seed_and_keeps_dtype():
    pipe = AugmentPipe(**{**ALL_OPS, 'p': 0.5})
    images = torch.rand(8, 3, 8, 8) * 2 - 1
    torch.manual_seed(9)
    first = pipe(images)
    torch.manual_seed(9)
    second = pipe(images)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for dtype in (torch.float64, torch.float16):
        out, labels = pipe(images.to(dtype))
        assert out.dtype == dtype and out.shape == images.shape and labels.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.filterwarnings('ignore:Synchronization debug mode is a prototype')
def test_runs_on_cuda_like_on_cpu_without_host_syncs():
    pipe = AugmentPipe(**{**ALL_OPS, 'rotate_int': 0, 'p': 0.5})
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    params = pipe.draw_parameters(16, 'cpu')
    cpu_out, cpu_labels = pipe.apply(images, params)
    cuda_out, cuda_labels = pipe.apply(images.cuda(), {k: v.cuda() for k, v in params.items()})
    assert cuda_out.device.type == 'cuda' and cuda_labels.device.type == 'cuda'
    assert torch.allclose(cuda_out.cpu(), cpu_out, atol=1e-4) and torch.allclose(cuda_labels.cpu(), cpu_labels)
    images = images.cuda()
    pipe(images)  # the first call builds and caches the filter matrices on the device
    torch.cuda.set_sync_debug_mode('error')  # any synchronising operation now raises
    try:
        out, labels = pipe(images)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert out.device.type == 'cuda' and labels.shape == (16, pipe.label_dim)

"""training.loss: σ schedules and weights against closed forms, the loss formula on stub networks, the STF target
against a brute-force posterior, and finite losses/gradients with the real preconditioners."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from training.augment import AugmentPipe
from training.loss import EDMLoss, VELoss, VPLoss, build_loss
from training.networks import EDMPrecond, VEPrecond, VPPrecond

from test_pfgmpp import brute_force_posterior_mean

P_MIN = 1e-3


class RecordingNet:
    """Stub denoiser: remembers its inputs and returns `output(x)`."""

    def __init__(self, output):
        self.output = output

    def __call__(self, x, sigma, class_labels=None, augment_labels=None):
        self.x, self.sigma, self.class_labels, self.augment_labels = x, sigma, class_labels, augment_labels
        return self.output(x)


def flip_pipe(images):
    """Deterministic stand-in for AugmentPipe: mirror left-right, labels [B, 9] of ones."""
    return images.flip(3), torch.ones(images.shape[0], 9, dtype=images.dtype, device=images.device)


# ---- σ schedules and weights ----

def test_edm_sigma_is_log_normal():
    torch.manual_seed(0)
    loss = EDMLoss()
    log_sigma = loss.sample_sigma(50000, torch.device('cpu')).double().log().numpy()
    assert stats.kstest(log_sigma, stats.norm(-1.2, 1.2).cdf).pvalue > P_MIN
    assert abs(log_sigma.mean() + 1.2) < 5 * 1.2 / math.sqrt(50000)
    assert abs(log_sigma.std() - 1.2) < 0.02
    lsun_log_sigma = EDMLoss(P_mean=0.3, P_std=0.5, lsun=True).sample_sigma(50000, torch.device('cpu')).double().log()
    assert stats.kstest(lsun_log_sigma.numpy(), stats.norm(0.3 + math.log(380 / 80), 0.5).cdf).pvalue > P_MIN


def test_vp_sigma_schedule():
    loss = VPLoss()
    beta_d, beta_min, eps = 19.9, 0.1, 1e-5
    for t in (eps, 0.1, 0.5, 1.0):
        assert loss.sigma_of_t(torch.tensor(t, dtype=torch.float64)).item() == pytest.approx(
            math.sqrt(math.exp(0.5 * beta_d * t * t + beta_min * t) - 1), rel=1e-12)
    torch.manual_seed(1)
    sigma = loss.sample_sigma(50000, torch.device('cpu')).double().numpy()
    # Invert σ_VP: ½β_d t² + β_min t = ln(1 + σ²); t must be uniform on [ε_t, 1].
    t = (-beta_min + np.sqrt(beta_min ** 2 + 2 * beta_d * np.log1p(sigma ** 2))) / beta_d
    assert stats.kstest(t, stats.uniform(eps, 1 - eps).cdf).pvalue > P_MIN


def test_ve_sigma_schedule():
    torch.manual_seed(2)
    sigma = VELoss(sigma_min=0.02, sigma_max=100).sample_sigma(50000, torch.device('cpu')).double().numpy()
    low, high = math.log(0.02), math.log(100)
    assert sigma.min() >= 0.02 * (1 - 1e-6) and sigma.max() <= 100 * (1 + 1e-6)
    assert stats.kstest(np.log(sigma), stats.uniform(low, high - low).cdf).pvalue > P_MIN


def test_weights_closed_forms():
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    for s, w in zip(sigma.tolist(), EDMLoss(sigma_data=0.5).weight(sigma).tolist()):
        assert w == pytest.approx((s * s + 0.25) / (s * 0.5) ** 2, rel=1e-12)
    for loss in (VPLoss(), VELoss()):
        torch.testing.assert_close(loss.weight(sigma), 1 / sigma ** 2, rtol=1e-12, atol=0)


# ---- the loss formula on stub networks ----

@pytest.mark.parametrize('make_loss', [EDMLoss, VPLoss, VELoss])
@pytest.mark.parametrize('D', [None, 1.5, 128])
def test_loss_is_weighted_squared_error_of_the_net_output(make_loss, D):
    torch.manual_seed(3)
    loss = make_loss(D=D)
    images = torch.rand(6, 3, 4, 4) * 2 - 1
    labels = torch.eye(6)[:, :2]
    net = RecordingNet(lambda x: torch.full_like(x, 0.25))
    result = loss(net, images, labels)
    assert result.shape == images.shape and result.dtype == torch.float32
    expected = loss.weight(net.sigma).reshape(-1, 1, 1, 1) * (0.25 - images) ** 2
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=0)
    assert net.sigma.shape == (6,) and net.class_labels is labels and net.augment_labels is None


@pytest.mark.parametrize('D', [None, 1.5, 128.0])
def test_noise_in_the_loss_follows_the_kernel(D):
    """With a net returning its input, loss/weight = n², so each row's ‖n‖² must follow the kernel's radius law."""
    torch.manual_seed(4)
    loss = EDMLoss(D=D)
    images = torch.zeros(4000, 3, 4, 4, dtype=torch.float64)
    net = RecordingNet(lambda x: x)
    squared_radius = (loss(net, images) / loss.weight(net.sigma).reshape(-1, 1, 1, 1)).flatten(1).sum(1)
    sigma_squared = net.sigma.double() ** 2
    N = 48
    if D is None:
        pvalue = stats.kstest((squared_radius / sigma_squared).numpy(), stats.chi2(N).cdf).pvalue
    else:
        pvalue = stats.kstest((squared_radius / (sigma_squared * D)).numpy(), stats.betaprime(N / 2, D / 2).cdf).pvalue
    assert pvalue > P_MIN


def test_augmentation_runs_after_sigma_and_feeds_the_net():
    torch.manual_seed(5)
    images = torch.rand(4, 3, 4, 4) * 2 - 1
    net = RecordingNet(lambda x: torch.zeros_like(x))
    loss = EDMLoss(D=128)
    result = loss(net, images, augment_pipe=flip_pipe)
    torch.testing.assert_close(result, loss.weight(net.sigma).reshape(-1, 1, 1, 1) * images.flip(3) ** 2)
    assert torch.equal(net.augment_labels, torch.ones(4, 9))
    # σ is drawn first: the same seed gives the same σ with and without a pipe.
    torch.manual_seed(5)
    loss(net, images)
    torch.manual_seed(5)
    sigma_plain = net.sigma.clone()
    loss(net, images, augment_pipe=flip_pipe)
    assert torch.equal(net.sigma, sigma_plain)


# ---- STF ----

@pytest.mark.parametrize('D', [None, 1.5, 128.0])
@pytest.mark.parametrize('pipe', [None, flip_pipe])
def test_stf_target_is_the_brute_force_posterior_mean(D, pipe):
    torch.manual_seed(6)
    batch, refs = 3, 7
    images = (torch.rand(batch, 1, 2, 2, dtype=torch.float64) * 2 - 1)
    ref_images = torch.rand(refs, 1, 2, 2, dtype=torch.float64) * 2 - 1
    ref_images[:batch] = 100.0  # the first B rows are replaced by the training batch: must not matter
    ref_before = ref_images.clone()
    net = RecordingNet(lambda x: torch.full_like(x, -10.0))
    loss = EDMLoss(D=D, stf=True)
    result = loss(net, images, augment_pipe=pipe, ref_images=ref_images)
    assert torch.equal(ref_images, ref_before)  # the caller's batch is not modified in place
    augment = pipe or (lambda x: (x, None))
    references = torch.cat([augment(images)[0], augment(ref_images[batch:])[0]]).flatten(1)
    target = brute_force_posterior_mean(net.x.flatten(1).numpy(), references.numpy(), net.sigma.double().numpy(), D)
    expected = loss.weight(net.sigma).double().reshape(-1, 1, 1, 1).numpy() * (-10.0 - target.reshape(images.shape)) ** 2
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10, atol=0)


def test_stf_without_reference_batch_uses_the_training_batch():
    torch.manual_seed(7)
    images = torch.rand(5, 1, 2, 2, dtype=torch.float64) * 2 - 1
    net = RecordingNet(lambda x: torch.zeros_like(x))
    loss = VELoss(D=4.0, stf=True)
    result = loss(net, images)
    target = brute_force_posterior_mean(net.x.flatten(1).numpy(), images.flatten(1).numpy(), net.sigma.double().numpy(), 4.0)
    expected = loss.weight(net.sigma).double().reshape(-1, 1, 1, 1).numpy() * target.reshape(images.shape) ** 2
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10, atol=0)


def test_stf_at_tiny_sigma_targets_the_clean_image():
    """σ → 0: the posterior concentrates on the image itself, so the STF loss equals the plain loss."""
    images = torch.rand(4, 3, 4, 4) * 2 - 1
    net = RecordingNet(lambda x: torch.zeros_like(x))
    for D in (None, 128.0):
        loss = EDMLoss(P_mean=math.log(1e-4), P_std=0.0, D=D, stf=True)
        torch.manual_seed(8)
        result = loss(net, images, ref_images=torch.rand(16, 3, 4, 4) * 2 - 1)
        torch.testing.assert_close(result, loss.weight(net.sigma).reshape(-1, 1, 1, 1) * images ** 2)


@pytest.mark.parametrize('bad_shape', [(2, 3, 4, 4), (8, 1, 4, 4), (8, 3, 4)])
def test_bad_reference_batch_is_rejected(bad_shape):
    loss = EDMLoss(stf=True)
    net = RecordingNet(lambda x: x)
    with pytest.raises(ValueError, match='ref_images must be'):
        loss(net, torch.zeros(4, 3, 4, 4), ref_images=torch.zeros(bad_shape))


def test_network_with_another_D_is_rejected():
    net = EDMPrecond(img_resolution=8, img_channels=3, D=128.0, **TINY_UNET)
    with pytest.raises(ValueError, match='D=None but the network was built with D=128.0'):
        EDMLoss()(net, torch.zeros(2, 3, 8, 8))
    wrapped = torch.nn.Module()
    wrapped.module = net  # like DistributedDataParallel
    with pytest.raises(ValueError, match='D=1.5 but the network was built with D=128.0'):
        EDMLoss(D=1.5)(wrapped, torch.zeros(2, 3, 8, 8))


# ---- configuration ----

def test_config_round_trip_and_validation():
    for loss in (VPLoss(beta_d=19.1, D=1.5), VELoss(sigma_max=50, stf=True), EDMLoss(D=128, stf=True, lsun=True)):
        config = json.loads(json.dumps(loss.config))
        assert config['class_name'] == type(loss).__name__
        rebuilt = build_loss(config)
        assert type(rebuilt) is type(loss) and rebuilt.config == loss.config
    assert EDMLoss().config == {'class_name': 'EDMLoss', 'P_mean': -1.2, 'P_std': 1.2, 'sigma_data': 0.5,
                                'lsun': False, 'D': None, 'stf': False}
    with pytest.raises(ValueError, match='unknown loss'):
        build_loss({'class_name': 'FooLoss'})
    with pytest.raises(ValueError, match='bad arguments for EDMLoss'):
        build_loss({'class_name': 'EDMLoss', 'beta_d': 1})
    for bad in (0, -3, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='augmentation dimension D'):
            EDMLoss(D=bad)


# ---- real preconditioners ----

def make_augment_pipe():
    return AugmentPipe(p=1, xflip=1, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


TINY_UNET = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4],
                 augment_dim=9, dropout=0)
PAIRS = [(VPPrecond, VPLoss), (VEPrecond, VELoss), (EDMPrecond, EDMLoss)]


@pytest.mark.parametrize('precond, make_loss', PAIRS, ids=[p.__name__ for p, _ in PAIRS])
@pytest.mark.parametrize('D', [None, 1.5, 128.0])
def test_every_precond_D_stf_augment_gives_finite_loss_and_gradients(precond, make_loss, D):
    torch.manual_seed(9)
    net = precond(img_resolution=8, img_channels=3, label_dim=2, D=D, **TINY_UNET).train()
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    labels = torch.eye(2)[torch.tensor([0, 1, 1, 0])]
    ref_images = torch.rand(10, 3, 8, 8) * 2 - 1
    pipe = make_augment_pipe()
    for stf in (False, True):
        for augment_pipe in (None, pipe):
            net.zero_grad(set_to_none=True)
            loss = make_loss(D=D, stf=stf)
            result = loss(net, images, labels, augment_pipe=augment_pipe, ref_images=ref_images if stf else None)
            assert result.shape == images.shape and torch.isfinite(result).all(), (stf, augment_pipe)
            result.sum().backward()
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads), (stf, augment_pipe)
            assert any(g.abs().sum() > 0 for g in grads)

"""Denoising losses of EDM (VP, VE, EDM) with the PFGM++ kernel and the stable target field (STF).

Each loss is a plain object: `loss(net, images, labels=None, augment_pipe=None, ref_images=None)` returns the
per-element loss [B,C,H,W] = weight(σ) · (D_θ(y + n, σ) − target)². Per step:
  1. σ [B] from the loss's schedule (EDM: log-normal; VP: σ_VP(t), t uniform; VE: log-uniform),
  2. y, augment_labels = augment_pipe(images) (when a pipe is given),
  3. n ~ PFGM++ kernel with r = σ√D (training.pfgmpp.sample_noise; D=None gives σ·N(0, I)),
  4. target = y, or with `stf=True` the posterior mean of the reference batch given y + n.
σ's law, the weights and the network's preconditioning stay EDM's for every D (the alignment r = σ√D).
Randomness comes from the global torch RNG on the images' device, whose state the training loop checkpoints.
"""

import torch

from training import pfgmpp
from training.schedules import vp_sigma

__all__ = ['VPLoss', 'VELoss', 'EDMLoss', 'build_loss']


class _DenoisingLoss:
    """Shared call path; subclasses provide sample_sigma(batch_size, device) and weight(sigma)."""

    def __init__(self, D=None, stf=False):
        self.D = pfgmpp.check_aug_dim(D)
        self.stf = bool(stf)

    @property
    def config(self):
        """Plain-data constructor kwargs plus class_name, for checkpoints (see build_loss)."""
        return {'class_name': type(self).__name__, **self._kwargs(), 'D': self.D, 'stf': self.stf}

    def _kwargs(self):
        raise NotImplementedError

    def __call__(self, net, images, labels=None, augment_pipe=None, ref_images=None):
        self._check_network_D(net)
        batch_size = images.shape[0]
        sigma = self.sample_sigma(batch_size, images.device)
        weight = self.weight(sigma).reshape(-1, 1, 1, 1)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        references = self._reference_batch(y, augment_pipe, ref_images) if self.stf else None
        noise = pfgmpp.sample_noise(y.shape, sigma, self.D, device=y.device, dtype=y.dtype)
        noisy = y + noise
        denoised = net(noisy, sigma, labels, augment_labels=augment_labels)
        target = y if references is None else self._stf_target(noisy, references, sigma)
        return weight * (denoised - target).square()

    def _check_network_D(self, net):
        """A network records the D its prior will use; training it with another kernel would go unnoticed."""
        network_D = getattr(getattr(net, 'module', net), 'D', self.D)  # DDP wraps the network in .module
        if network_D != self.D:
            raise ValueError(f'the loss perturbs with D={self.D} but the network was built with D={network_D}; '
                             f'use the same D for both')

    @staticmethod
    def _reference_batch(y, augment_pipe, ref_images):
        """The STF reference set: the (augmented) training batch y, then ref_images[B:] augmented on their own.

        Without ref_images the training batch alone is the reference set (R = B).
        """
        if ref_images is None:
            return y
        batch_size = y.shape[0]
        if ref_images.ndim != y.ndim or ref_images.shape[1:] != y.shape[1:] or ref_images.shape[0] < batch_size:
            raise ValueError(f'ref_images must be [R, {", ".join(map(str, y.shape[1:]))}] with R >= {batch_size} '
                             f'(the batch size), got {list(ref_images.shape)}')
        extra = ref_images[batch_size:].to(device=y.device, dtype=y.dtype)
        if augment_pipe is not None and extra.shape[0] > 0:
            extra, _ = augment_pipe(extra)  # augmentation labels of the references are not needed
        return torch.cat([y, extra])

    def _stf_target(self, noisy, references, sigma):
        with torch.no_grad():
            mean = pfgmpp.posterior_mean(noisy.flatten(1), references.flatten(1), sigma, self.D)
        return mean.to(noisy.dtype).reshape(noisy.shape)


class VPLoss(_DenoisingLoss):
    """Variance preserving (DDPM++): t = 1 + u(ε_t − 1), u ~ U[0,1), σ = σ_VP(t), weight 1/σ²."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5, D=None, stf=False):
        super().__init__(D=D, stf=stf)
        self.beta_d = float(beta_d)
        self.beta_min = float(beta_min)
        self.epsilon_t = float(epsilon_t)

    def _kwargs(self):
        return {'beta_d': self.beta_d, 'beta_min': self.beta_min, 'epsilon_t': self.epsilon_t}

    def sigma_of_t(self, t):
        """σ_VP(t) = √(exp(½β_d t² + β_min t) − 1) (training.schedules)."""
        return vp_sigma(torch.as_tensor(t), self.beta_d, self.beta_min)

    def sample_sigma(self, batch_size, device):
        u = torch.rand(batch_size, device=device)
        return self.sigma_of_t(1 + u * (self.epsilon_t - 1))

    def weight(self, sigma):
        return 1 / sigma ** 2


class VELoss(_DenoisingLoss):
    """Variance exploding (NCSN++): σ = σ_min (σ_max/σ_min)^u, u ~ U[0,1), weight 1/σ²."""

    def __init__(self, sigma_min=0.02, sigma_max=100, D=None, stf=False):
        super().__init__(D=D, stf=stf)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def _kwargs(self):
        return {'sigma_min': self.sigma_min, 'sigma_max': self.sigma_max}

    def sample_sigma(self, batch_size, device):
        u = torch.rand(batch_size, device=device)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def weight(self, sigma):
        return 1 / sigma ** 2


class EDMLoss(_DenoisingLoss):
    """EDM: ln σ ~ N(P_mean, P_std²) (× 380/80 with lsun), weight (σ² + σ_d²)/(σ σ_d)²."""

    LSUN_SIGMA_SCALE = 380 / 80  # the PFGM++ --lsun option: σ_max 80 → 380 for 256×256 images

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, D=None, stf=False, lsun=False):
        super().__init__(D=D, stf=stf)
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)
        self.lsun = bool(lsun)

    def _kwargs(self):
        return {'P_mean': self.P_mean, 'P_std': self.P_std, 'sigma_data': self.sigma_data, 'lsun': self.lsun}

    def sample_sigma(self, batch_size, device):
        sigma = (torch.randn(batch_size, device=device) * self.P_std + self.P_mean).exp()
        return sigma * self.LSUN_SIGMA_SCALE if self.lsun else sigma

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


_LOSS_CLASSES = {cls.__name__: cls for cls in (VPLoss, VELoss, EDMLoss)}


def build_loss(config):
    """Inverse of `.config`: build a loss from {'class_name': ..., **kwargs}; ValueError on anything unknown."""
    config = dict(config)
    class_name = config.pop('class_name', None)
    if class_name not in _LOSS_CLASSES:
        raise ValueError(f'unknown loss class_name {class_name!r}; expected one of {sorted(_LOSS_CLASSES)}')
    try:
        return _LOSS_CLASSES[class_name](**config)
    except TypeError as error:
        raise ValueError(f'bad arguments for {class_name}: {error}') from None

"""The PFGM++ perturbation kernel, shared by training (noise) and sampling (prior).

PFGM++ perturbs a data point y in N dimensions with p_r(x | y) ∝ (‖x − y‖² + r²)^(−(N+D)/2), r = σ√D.
The radius obeys R²/r² ~ BetaPrime(N/2, D/2) = χ²_N / χ²_D and the direction is uniform, which makes the
kernel exactly a multivariate Student-t with D degrees of freedom and scale σ:

    x − y = σ · g · √(D / χ²_D),   g ~ N(0, I_N),   χ²_D = 2·Gamma(D/2).

Drawing it this way needs one Gamma variate per row, works for any real D > 0 (the paper's D ∈ ℝ⁺), clips
nothing, and D → ∞ recovers EDM's Gaussian σ·g because χ²_D / D → 1.
"""

import math

import torch

__all__ = ['check_aug_dim', 'sample_noise', 'radius_scale', 'posterior_logits']


def check_aug_dim(D):
    """Return D as a float (or None for diffusion, D → ∞); raise ValueError for anything else."""
    if D is None:
        return None
    try:
        D = float(D)
    except (TypeError, ValueError):
        raise ValueError(f'augmentation dimension D must be a positive number or None, got {D!r}') from None
    if not (D > 0) or math.isinf(D) or math.isnan(D):
        raise ValueError(f'augmentation dimension D must be a finite number > 0 (or None for D→∞), got {D!r}')
    return D


def radius_scale(batch_size, D, device=None, generator=None):
    """Per-row factor √(D / χ²_D) in float64 (all ones for D=None). Shape [batch_size]."""
    D = check_aug_dim(D)
    if D is None:
        return torch.ones(batch_size, dtype=torch.float64, device=device)
    concentration = torch.full((batch_size,), D / 2, dtype=torch.float64, device=device)
    chi2 = 2 * torch._standard_gamma(concentration, generator=generator)  # generator-aware Gamma(D/2)
    return torch.sqrt(D / chi2)


def sample_noise(shape, sigma, D, generator=None, device=None, dtype=torch.float32):
    """Draw noise of `shape` from the PFGM++ kernel p_r(· | 0) with r = σ√D, one independent draw per row.

    sigma: tensor of shape [B] (or broadcastable to it) or a float. D: real number > 0, or None (Gaussian).
    The row norm R satisfies R²/(σ²D) ~ BetaPrime(N/2, D/2) with N = prod(shape[1:]). Called at σ_max it is the
    sampler's prior. Everything happens on `device` (default: sigma's device) without host synchronisation.
    """
    shape = tuple(shape)
    batch_size = shape[0]
    if device is None:
        device = sigma.device if torch.is_tensor(sigma) else torch.device('cpu')
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
    sigma = sigma.expand(batch_size) if sigma.numel() == 1 else sigma
    if sigma.shape != (batch_size,):
        raise ValueError(f'sigma must hold 1 or {batch_size} values, got shape {tuple(sigma.shape)}')
    gauss = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    scale = sigma * radius_scale(batch_size, D, device=device, generator=generator)
    return (gauss * scale.reshape((-1,) + (1,) * (len(shape) - 1))).to(dtype)


def posterior_logits(noisy, references, sigma, D):
    """Log of the kernel density log p_r(noisy_b | ref_j) up to a per-row constant, in float64.

    noisy: [B, N], references: [R, N], sigma: [B]. Returns [B, R]. Used for the stable target field (STF):
    softmax over j gives the posterior weights of the references given a noisy sample.
    Gaussian (D=None): −‖x − y‖² / (2σ²). PFGM++: −(N+D)/2 · log(‖x − y‖² + σ²D).
    """
    D = check_aug_dim(D)
    noisy = noisy.to(torch.float64)
    references = references.to(torch.float64)
    sigma = sigma.to(torch.float64).reshape(-1, 1)
    sq_dist = torch.cdist(noisy, references).square()
    if D is None:
        return -sq_dist / (2 * sigma.square())
    N = noisy.shape[1]
    return -(N + D) / 2 * torch.log(sq_dist + sigma.square() * D)

"""The PFGM++ perturbation kernel, shared by training (noise, STF targets) and sampling (prior).

PFGM++ perturbs a data point y in N dimensions with p_r(x | y) ∝ (‖x − y‖² + r²)^(−(N+D)/2), r = σ√D
(the alignment that lets EDM's σ schedule, preconditioning and sampler carry over unchanged). The radius
R = ‖x − y‖ has density ∝ R^(N−1) / (R² + r²)^((N+D)/2), i.e. R²/r² ~ BetaPrime(N/2, D/2), and the direction
is uniform and independent of R. Since χ²_N / χ²_D ~ BetaPrime(N/2, D/2) for independent chi-squares, the
kernel is exactly a multivariate Student-t with D degrees of freedom and scale σ:

    x − y = σ · g · √(D / χ²_D),   g ~ N(0, I_N),   χ²_D = 2·Gamma(D/2),

because ‖g‖² = χ²_N and g/‖g‖ is uniform and independent of ‖g‖. This is the same law as the paper's recipe
"t ~ Beta(N/2, D/2), R = r·√(t/(1−t)), uniform direction" but needs one Gamma variate per row, works for any
real D > 0 (the paper's D ∈ ℝ⁺), clips nothing, and D → ∞ recovers EDM's Gaussian σ·g since χ²_D / D → 1.
"""

import math

import torch

__all__ = ['check_aug_dim', 'sample_noise', 'radius_scale', 'norm_spread', 'kernel_log_density', 'posterior_logits',
           'posterior_mean']

# Bound on the float64 elements of one reference chunk in posterior_mean (≈128 MiB).
_CHUNK_ELEMENTS = 1 << 24


def check_aug_dim(D):
    """Return D as a float (or None for diffusion, D → ∞); raise ValueError for anything else."""
    if D is None:
        return None
    if isinstance(D, bool):
        raise ValueError(f'augmentation dimension D must be a positive number or None, got {D!r}')
    try:
        value = float(D)
    except (TypeError, ValueError):
        raise ValueError(f'augmentation dimension D must be a positive number or None, got {D!r}') from None
    if not (value > 0) or math.isinf(value):
        raise ValueError(f'augmentation dimension D must be a finite number > 0 (or None for D→∞), got {D!r}')
    return value


def radius_scale(batch_size, D, device=None, generator=None):
    """Per-row factor √(D / χ²_D) in float64 (all ones for D=None). Shape [batch_size].

    float64 because χ²_D spans many decades for small D. (For D ≪ 1, χ²_D can underflow; torch clamps the Gamma
    draw to the smallest normal float64, so such rows get a huge but finite scale.)
    """
    D = check_aug_dim(D)
    if D is None:
        return torch.ones(batch_size, dtype=torch.float64, device=device)
    concentration = torch.full((batch_size,), D / 2, dtype=torch.float64, device=device)
    chi2 = 2 * torch._standard_gamma(concentration, generator=generator)  # the generator-aware Gamma(D/2) draw
    return torch.sqrt(D / chi2)


def sample_noise(shape, sigma, D, generator=None, device=None, dtype=torch.float32):
    """Draw noise of `shape` from the PFGM++ kernel p_r(· | 0) with r = σ√D, one independent draw per row.

    sigma: tensor with 1 or B = shape[0] elements (e.g. [B] or [B,1,1,1]) or a float. D: real number > 0, or None
    (Gaussian σ·N(0, I)). The row norm R satisfies R²/(σ²D) ~ BetaPrime(N/2, D/2) with N = prod(shape[1:]).
    Called at σ_max it is the sampler's prior. Everything happens on `device` (default: sigma's device) without
    host synchronisation; `generator` (on that device) makes the draw reproducible, else the global RNG is used.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f'shape must be [B, ...] with at least one data dimension, got {shape}')
    batch_size = shape[0]
    if device is None:
        device = sigma.device if torch.is_tensor(sigma) else torch.device('cpu')
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(batch_size)
    if sigma.shape != (batch_size,):
        raise ValueError(f'sigma must hold 1 or {batch_size} values, got {sigma.numel()}')
    # The Gaussian is always drawn in float32 (the same seed gives the same noise in every output dtype); only the
    # per-row scale needs float64, which radius_scale provides.
    compute_dtype = torch.promote_types(dtype, torch.float32)
    gauss = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(compute_dtype)
    scale = sigma * radius_scale(batch_size, D, device=device, generator=generator)
    return (gauss * scale.to(compute_dtype).reshape((-1,) + (1,) * (len(shape) - 1))).to(dtype)


def norm_spread(N, D):
    """Relative standard deviation of ‖x − y‖² under the kernel, √(2(N + D − 2) / (N(D − 4))): how widely the noisy
    samples' norms spread around σ√N (the "robustness" knob; √(2/N) for D → ∞, infinite for D ≤ 4). It follows
    from ‖x − y‖² = σ²·χ²_N·D/χ²_D with E[(D/χ²_D)ᵏ] for k = 1, 2."""
    D = check_aug_dim(D)
    if D is None:
        return math.sqrt(2 / N)
    return math.sqrt(2 * (N + D - 2) / (N * (D - 4))) if D > 4 else math.inf


def kernel_log_density(offset, sigma, D):
    """Normalised log-density (nats) of the kernel p_r(x | y) at offset = x − y, per row, in float64. Shape [B].

    offset: [B, ...] with N = prod(shape[1:]); sigma: a float or a tensor with 1 or B elements. At σ_max with y = 0
    this is the prior of the likelihood computation (the data's spread ≪ σ_max, docs/likelihood.md). PFGM++: the
    multivariate Student-t with D degrees of freedom and scale σ, r = σ√D,
        log p = lnΓ((N+D)/2) − lnΓ(D/2) − (N/2)·ln π + D·ln r − ((N+D)/2)·ln(‖offset‖² + r²);
    D=None: the Gaussian N(0, σ²I), log p = −‖offset‖²/(2σ²) − (N/2)·ln(2πσ²).
    """
    D = check_aug_dim(D)
    offset = offset.to(torch.float64).flatten(1)
    N = offset.shape[1]
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=offset.device).reshape(-1)
    sq_norm = offset.square().sum(1)
    if D is None:
        return -sq_norm / (2 * sigma.square()) - N / 2 * torch.log(2 * math.pi * sigma.square())
    log_r = torch.log(sigma) + 0.5 * math.log(D)
    const = math.lgamma((N + D) / 2) - math.lgamma(D / 2) - N / 2 * math.log(math.pi)
    # ln(‖offset‖² + r²) = 2·ln r + log1p(‖offset‖²/r²): no overflow of r² for huge D.
    return const + D * log_r - (N + D) / 2 * (2 * log_r + torch.log1p(sq_norm / torch.exp(2 * log_r)))


def _squared_distances(noisy, references):
    """‖x_b − y_j‖² as [B, R] in float64 via norms and one matrix product (no [B, R, N] temporary)."""
    cross = noisy @ references.T
    sq = noisy.square().sum(1, keepdim=True) + references.square().sum(1)[None, :] - 2 * cross
    return sq.clamp_min_(0)


def posterior_logits(noisy, references, sigma, D):
    """Log of the kernel density log p_r(noisy_b | ref_j) up to a per-row constant, in float64.

    noisy: [B, N], references: [R, N], sigma: [B]. Returns [B, R]. Used for the stable target field (STF):
    softmax over j gives the posterior weights of the references given a noisy sample.
    Gaussian (D=None): −‖x − y‖² / (2σ²). PFGM++: −(N+D)/2 · log(‖x − y‖² + σ²D).
    """
    D = check_aug_dim(D)
    noisy = noisy.to(torch.float64)
    references = references.to(device=noisy.device, dtype=torch.float64)
    sigma = sigma.to(device=noisy.device, dtype=torch.float64).reshape(-1, 1)
    sq_dist = _squared_distances(noisy, references)
    if D is None:
        return -sq_dist / (2 * sigma.square())
    N = noisy.shape[1]
    return -(N + D) / 2 * torch.log(sq_dist + sigma.square() * D)


def posterior_mean(noisy, references, sigma, D, chunk_elements=_CHUNK_ELEMENTS):
    """Stable-target-field target: E[y | x] with y uniform over `references` and x ~ p_r(· | y), in float64.

    noisy: [B, N], references: [R, N] (any float dtype; converted chunk by chunk), sigma: [B]. Returns [B, N]
    float64 = softmax_j(posterior_logits) @ references. The softmax is a log-sum-exp, so far-away references
    cannot underflow every weight. References are processed in chunks of at most `chunk_elements` float64
    values, so memory stays O(B·R + B·N + chunk).
    """
    noisy = noisy.to(torch.float64)
    num_refs, N = references.shape
    if noisy.shape[1] != N:
        raise ValueError(f'noisy rows have {noisy.shape[1]} values but references have {N}')
    step = max(1, chunk_elements // max(N, 1))
    logits = torch.cat([posterior_logits(noisy, references[i:i + step], sigma, D)
                        for i in range(0, num_refs, step)], dim=1)
    weights = torch.softmax(logits, dim=1)
    mean = torch.zeros_like(noisy)
    for i in range(0, num_refs, step):
        chunk = references[i:i + step].to(device=noisy.device, dtype=torch.float64)
        mean.addmm_(weights[:, i:i + step], chunk)
    return mean

"""Log-likelihood through the probability-flow ODE, for EDM (D → ∞) and PFGM++ (any D).

Every D shares the ODE dx/dσ = (x − D(x; σ))/σ = f(x, σ) (training/sampler.py); only the prior differs. Along a
solution the instantaneous change of variables gives d log p_σ(x(σ))/dσ = −div f, so for a data point x₀

    log p_σmin(x₀) = log p_σmax(x(σ_max)) + ∫_σmin^σmax div f(x(σ), σ) dσ,   div f = (N − tr ∂D/∂x)/σ,

integrated upwards from σ_min to σ_max by an adaptive Runge–Kutta solver (scipy.integrate.solve_ivp). The prior
p_σmax is the kernel at σ_max around 0 (`training.pfgmpp.kernel_log_density`: Student-t with D degrees of freedom,
Gaussian for EDM), i.e. the data's spread is neglected next to σ_max, as the samplers do.

The ε near 0: the ODE stops at σ_min > 0. What is returned is the density at σ_min of the flow: the prior pushed
down the ODE to σ_min, a proper density, evaluated at x₀ (not the limit σ → 0, where the ODE is stiff and the
network untrained). With uniform dequantization, E[−log p_σmin(x₀ + u)] is then an upper bound on the discrete
model's negative log-likelihood, up to solver error.

`variable='log_sigma'` integrates in t = ln σ instead: dx/dt = x − D(x; e^t) and d(Δ)/dt = N − tr ∂D/∂x, without
the explicit 1/σ of the σ form (docs/likelihood.md measures whether that helps). The trace is exact (the network
runs on N copies of the batch: small images) or Hutchinson's estimate εᵀ(∂D/∂x)ε with one Rademacher probe per
image, held fixed along the whole path, so the estimate of the log-likelihood is unbiased.

One solve_ivp call integrates a whole batch as one state vector, so the step sizes (and the NFE) are shared by the
batch; a batch of one gives results that depend on the image and its seed only.
"""

import json
import math
import os
import time

import numpy as np
import scipy.integrate
import torch
import tqdm

from dnnlib.util import atomic_write, check_choice
from torch_utils import distributed as dist
from training.checkpoint import load_network
from training.dataset import ImageFolderDataset
from training.generation import find_networks, prepare_network
from training.pfgmpp import kernel_log_density
from training.sampler import denoise

__all__ = ['VARIABLES', 'rademacher', 'dequantize', 'divergence', 'ode_log_likelihood', 'bits_per_dim',
           'mean_and_standard_error', 'image_randomness', 'evaluate_images', 'summarize', 'result_file',
           'open_images', 'check_sigma_range', 'evaluate_network', 'run']

VARIABLES = ('sigma', 'log_sigma')


def rademacher(shape, generator=None, device=None):
    """±1 with probability ½ each, float64."""
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return bits.to(torch.float64) * 2 - 1


def dequantize(images_uint8, noise, bits=8):
    """(u + noise) / 2^(bits−1) − 1 in float64: `bits`-bit data (any shape) plus uniform noise U[0, 1) of its shape,
    on the [−1, 1] scale the networks use (one bin = 2/2^bits wide): the uniform dequantization."""
    return (torch.as_tensor(images_uint8).to(torch.float64) + noise) / 2 ** (bits - 1) - 1


def divergence(net, x, sigma, class_labels=None, probes=None, max_rows=512):
    """(D(x; σ), tr ∂D/∂x per row) in float64; the trace is Hutchinson's εᵀJε when `probes` (shape of x) are given,
    else exact: the batch is repeated once per basis vector e_i (in chunks of at most `max_rows` rows per network
    call) and one backward pass gives every e_iᵀJe_i, which batches far better than one backward pass per i."""
    with torch.enable_grad():
        if probes is not None:
            x = x.detach().requires_grad_(True)
            denoised = denoise(net, x, sigma, class_labels)
            (vjp,) = torch.autograd.grad(denoised, x, probes)
            return denoised.detach(), (vjp * probes).flatten(1).sum(1)
        batch, N = x.shape[0], x[0].numel()
        per_call = max(1, min(N, max_rows // batch))
        trace = torch.zeros(batch, dtype=torch.float64, device=x.device)
        denoised = None
        for start in range(0, N, per_call):
            count = min(per_call, N - start)  # copy k of the batch probes dimension start + k
            copies = x.detach().repeat(count, *[1] * (x.ndim - 1)).requires_grad_(True)
            labels = None if class_labels is None else class_labels.repeat(count, 1)
            output = denoise(net, copies, sigma, labels)
            basis = torch.zeros(count, batch, N, dtype=torch.float64, device=x.device)
            basis[torch.arange(count), :, start + torch.arange(count)] = 1
            basis = basis.reshape(copies.shape)
            (vjp,) = torch.autograd.grad(output, copies, basis)
            trace += (vjp * basis).flatten(1).sum(1).reshape(count, batch).sum(0)
            denoised = output[:batch].detach() if denoised is None else denoised
        return denoised, trace


def ode_log_likelihood(net, x, sigma_min, sigma_max, D, class_labels=None, probes=None, rtol=1e-5, atol=1e-5,
                       variable='sigma', prior_log_density=None, method='RK45'):
    """log p_σmin(x) in nats per row, through the probability-flow ODE from σ_min up to σ_max.

    net: anything `training.sampler.denoise` can call (a network, or an exact denoiser in the tests). x: [B, ...]
    data points (e.g. dequantized images in [−1, 1]). D: the kernel's D (None: Gaussian prior). probes: None for
    the exact trace, else Hutchinson probes of x's shape (`rademacher`). rtol/atol: solve_ivp's tolerances on the
    state (x and the accumulated divergence). prior_log_density: x_T → [B] log p_σmax, default the kernel at
    σ_max around 0. Returns a dict of float64 [B] tensors log_p, prior_log_p, delta_log_p (the divergence integral),
    the final state x_T, and nfe (network evaluations, an int). method: solve_ivp's (RK45 by default).
    """
    if variable not in VARIABLES:
        raise ValueError(f'variable must be one of {", ".join(VARIABLES)}, got {variable!r}')
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f'need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}')
    x = x.to(torch.float64)
    batch, shape, device = x.shape[0], x.shape, x.device
    N = x[0].numel()
    log_sigma = variable == 'log_sigma'
    nfe = 0

    def rhs(t, state):
        nonlocal nfe
        nfe += 1
        sigma = math.exp(t) if log_sigma else t
        x_t = torch.from_numpy(state[:-batch]).to(device).reshape(shape)
        denoised, trace = divergence(net, x_t, sigma, class_labels, probes)
        # d/dt of (x, Δ): (x − D, N − tr) in ln σ, the same divided by σ in σ.
        scale = 1.0 if log_sigma else 1 / sigma
        dx = (x_t - denoised) * scale
        ddelta = (N - trace) * scale
        return torch.cat([dx.flatten(), ddelta]).cpu().numpy()

    span = (math.log(sigma_min), math.log(sigma_max)) if log_sigma else (sigma_min, sigma_max)
    state0 = torch.cat([x.flatten(), torch.zeros(batch, dtype=torch.float64, device=device)]).cpu().numpy()
    solution = scipy.integrate.solve_ivp(rhs, span, state0, method=method, rtol=rtol, atol=atol,
                                         t_eval=[span[1]])  # keep only the end state, not every step's
    if not solution.success:
        raise ValueError(f'the ODE solver failed: {solution.message}')
    final = torch.from_numpy(solution.y[:, -1]).to(device)
    x_T, delta = final[:-batch].reshape(shape), final[-batch:]
    prior = prior_log_density(x_T) if prior_log_density is not None else kernel_log_density(x_T, sigma_max, D)
    prior = prior.to(torch.float64)
    return dict(log_p=prior + delta, prior_log_p=prior, delta_log_p=delta, x_T=x_T, nfe=nfe)


def bits_per_dim(log_p, num_dims, bits=8):
    """Bits per dimension of `bits`-bit data from log p (nats) of its dequantized version on the [−1, 1] scale:
    −log₂ p / N + (bits − 1), the +bits−1 converting the density from the [−1, 1] scale (bin width 2/2^bits) to
    one bin per integer level."""
    return -log_p / (num_dims * math.log(2)) + (bits - 1)


def mean_and_standard_error(values):
    """(mean, standard error of the mean) of a 1-D array; the error is nan for fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


# ----------------------------------------------------------------------------------------------------------------
# Images of a dataset → per-image results, and the driver behind likelihood.py.

def image_randomness(image_shape, seed):
    """(dequantization noise U[0, 1), Rademacher probe) of one image, float64 on the CPU, from its seed alone (the
    same on every device, batch and rank). The noise is drawn first, so --exact-trace keeps the same noise."""
    generator = torch.Generator().manual_seed(int(seed) % (1 << 63))
    noise = torch.rand(image_shape, generator=generator, dtype=torch.float64)
    return noise, rademacher(image_shape, generator=generator)


def evaluate_images(net, images_uint8, seeds, class_labels=None, exact_trace=False, bits=8, **ode_kwargs):
    """Per-image results for a batch of uint8 images [B, C, H, W] with one seed each: a list of dicts with
    bits_per_dim, log_p (nats, dequantized data on the [−1, 1] scale), prior_log_p, delta_log_p, nfe (shared by the
    batch). ode_kwargs: sigma_min, sigma_max, rtol, atol, variable (ode_log_likelihood's)."""
    device = next(net.parameters()).device
    images = torch.as_tensor(images_uint8)
    draws = [image_randomness(images.shape[1:], seed) for seed in seeds]
    x = dequantize(images, torch.stack([noise for noise, _ in draws]), bits)
    probes = None if exact_trace else torch.stack([probe for _, probe in draws]).to(device)
    result = ode_log_likelihood(net, x.to(device), D=getattr(net, 'D', None), class_labels=class_labels,
                                probes=probes, **ode_kwargs)
    bpd = bits_per_dim(result['log_p'], x[0].numel(), bits)
    return [dict(bits_per_dim=float(bpd[i]), log_p=float(result['log_p'][i]),
                 prior_log_p=float(result['prior_log_p'][i]), delta_log_p=float(result['delta_log_p'][i]),
                 nfe=result['nfe']) for i in range(len(seeds))]


def summarize(rows):
    """Mean bits/dim with its standard error over images, and the mean NFE per image."""
    mean, error = mean_and_standard_error([row['bits_per_dim'] for row in rows])
    return dict(bits_per_dim=mean, standard_error=error, num_images=len(rows),
                mean_nfe=float(np.mean([row['nfe'] for row in rows])))


def result_file(outdir, kimg):
    return os.path.join(outdir, f'likelihood-{kimg:06d}.json')


def open_images(data, indices, net, source):
    """The dataset and the image indices to evaluate, checked against the network (ValueError when they differ)."""
    dataset = ImageFolderDataset(data, use_labels=net.label_dim > 0)
    if indices is None:
        indices = list(range(len(dataset)))
    if max(indices) >= len(dataset):
        raise ValueError(f'--images: index {max(indices)} is past the end of {data} ({len(dataset)} images, '
                         f'indices 0-{len(dataset) - 1})')
    expected = [net.img_channels, net.img_resolution, net.img_resolution]
    if dataset.image_shape != expected:
        raise ValueError(f'{data} holds images of shape {dataset.image_shape} (CHW) but {source} was trained on '
                         f'{expected}')
    if net.label_dim and (not dataset.has_labels or dataset.label_dim != net.label_dim):
        raise ValueError(f'{source} is conditional on {net.label_dim} classes; {data} needs matching labels in '
                         f'dataset.json')
    return dataset, indices


def check_sigma_range(net, sigma_min, sigma_max, source):
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f'need 0 < --sigma_min < --sigma_max, got {sigma_min:g} and {sigma_max:g}')
    if sigma_min < float(net.sigma_min) or sigma_max > float(net.sigma_max):
        raise ValueError(f'--sigma_min/--sigma_max [{sigma_min:g}, {sigma_max:g}] leave {source}\'s noise range '
                         f'[{float(net.sigma_min):g}, {float(net.sigma_max):g}]')


def evaluate_network(net, dataset, indices, settings, device, desc=None):
    """Per-image rows (index, seed, results) of this rank's share of `indices`, gathered on every rank."""
    ode_kwargs = {key: settings[key] for key in ('sigma_min', 'sigma_max', 'rtol', 'atol', 'variable')}
    rows = []
    batches = dist.rank_batches(indices, settings['batch'])
    with tqdm.tqdm(total=sum(map(len, batches)), unit='img', desc=desc, disable=dist.get_rank() != 0) as bar:
        for batch in batches:
            items = [dataset[i] for i in batch]
            images = torch.as_tensor(np.stack([image for image, _ in items]))
            labels = torch.as_tensor(np.stack([label for _, label in items])).to(device) if net.label_dim else None
            seeds = [settings['seed'] + i for i in batch]
            results = evaluate_images(net, images, seeds, labels, settings['exact_trace'], **ode_kwargs)
            rows += [dict(index=i, seed=seed, **result) for i, seed, result in zip(batch, seeds, results)]
            bar.update(len(batch))
    if dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    return sorted(rows, key=lambda row: row['index'])


def run(opts, device):
    """Drive likelihood.py: one JSON file per network in opts['outdir'] (likelihood-{kimg:06d}.json) with the
    settings, per-image rows and the summary; a file with the same settings is kept (reruns resume). Raises
    ValueError or FileNotFoundError (bad input) before anything is written for that network."""
    check_choice('variable', opts['variable'], VARIABLES)
    settings = {key: opts[key] for key in ('data', 'images', 'seed', 'batch', 'sigma_min', 'sigma_max', 'rtol',
                                           'atol', 'variable', 'exact_trace')}
    run_dir = dict(edm=False, use_pickle=False)  # run-directory mode lists our own checkpoint files only
    for kimg, path in find_networks({**opts, **run_dir}):
        target = result_file(opts['outdir'], kimg)
        previous = _read_json(target)
        if previous is not None and previous.get('settings') == settings and previous.get('network') == path:
            dist.print0(f'{target}: done with these settings, skipped')
            continue
        net = load_network(path)
        check_sigma_range(net, opts['sigma_min'], opts['sigma_max'], path)
        dataset, indices = open_images(opts['data'], opts['images'], net, path)
        net_call = prepare_network(net.to(device), precision='fp32')
        dist.print0(f'{path}: {len(indices)} images, D={_d_text(net)}, {opts["variable"]}, rtol={opts["rtol"]:g}, '
                    f'atol={opts["atol"]:g}, {"exact trace" if opts["exact_trace"] else "Hutchinson"}')
        start = time.time()
        rows = evaluate_network(net_call, dataset, indices, settings, device, desc=f'kimg {kimg}')
        summary = dict(summarize(rows), seconds=time.time() - start)
        if dist.get_rank() == 0:
            os.makedirs(opts['outdir'], exist_ok=True)
            record = dict(network=path, kimg=kimg, D=getattr(net, 'D', None), settings=settings, summary=summary,
                          images=rows)
            with atomic_write(target, 'w') as f:
                json.dump(record, f, indent=1)
            print(f'kimg {kimg}: {summary["bits_per_dim"]:.4f} ± {summary["standard_error"]:.4f} bits/dim over '
                  f'{len(rows)} images, mean NFE {summary["mean_nfe"]:.0f}, {summary["seconds"]:.0f} s -> {target}')
        dist.barrier()


def _d_text(net):
    D = getattr(net, 'D', None)
    return '∞ (EDM)' if D is None else f'{D:g}'


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

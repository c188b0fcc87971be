"""Samplers for the probability-flow ODE dx/dσ = (x − D(x; σ))/σ, shared by EDM (D → ∞) and PFGM++ (finite D).

PFGM++ with the alignment r = σ√D has exactly EDM's ODE in σ (paper §1.5); only the prior differs. So the
samplers here take `latents` that are x already drawn from the prior at the first noise level of their grid
(σ·N(0, I) for EDM, `training.pfgmpp.sample_noise(shape, σ, D)` for PFGM++); `prior_sigma()` says which level
that is. The ODE state is kept in float64 whatever the network's precision; the network is called in one place,
`denoise()`. Solvers: EDM's Heun (`edm_sampler`, the default), the one-evaluation-per-step solvers of
`multistep_sampler` (Euler, the published DPM-Solver++(2M)/(3M), iPNDM and iPNDM_v, and the exact-integration
forms dpm2m_taylor, dpm3m_exact, lms; with a choice of ending, grid, lower-order final steps and AFS;
docs/samplers.md), and EDM's ablation sampler.

Randomness (churn and α noise injection) is drawn through `randn_like`, normally the per-seed
`SeedRandom.randn_like`, so every image depends on its own seed only. Draw order per step, fixed: the α noise
(when α ≠ 0), then the churn noise, drawn on every step whether or not the step is inside [S_min, S_max]
(multiplied by zero outside it), as EDM's generate.py does, so stochastic images match EDM's for the same seed.
Exception: edm_sampler at S_churn = 0 uses no churn noise at all, so it draws none (EDM draws it and multiplies
it by zero: the same images); ablation_sampler always draws it.
"""

import functools
import inspect
import math

import torch

from dnnlib.util import check_choice
from training.networks import iddpm_noise_levels
from training.pfgmpp import sample_noise
from training.schedules import vp_sigma, vp_sigma_deriv, vp_sigma_inv

__all__ = ['denoise', 'edm_sigma_steps', 'sigma_steps', 'edm_sampler', 'multistep_sampler', 'ablation_sampler',
           'SOLVERS', 'MULTISTEP_SOLVERS', 'MULTISTEP_OPTIONS', 'MULTISTEP_DEFAULTS', 'multistep_settings', 'ENDINGS',
           'SIGMA_GRIDS', 'DEFAULT_ENDING', 'analytic_first_denoised',
           'ABLATION_OPTIONS', 'uses_ablation', 'nfe_for_steps', 'steps_for_nfe', 'prior_sigma', 'sample',
           'SeedRandom']

# The ablation sampler runs when any of these is set; --solver alone picks among SOLVERS on EDM's ρ-grid.
ABLATION_OPTIONS = ('discretization', 'schedule', 'scaling')


def denoise(net, x, sigma, class_labels=None):
    """D(x; σ) in float64: the single place where samplers call the network. sigma: a Python float.

    `net` may be a torch_utils.precision.NetworkCall (training/generation.py's prepare_network): the call then
    runs under its precision mode (e.g. bf16 autocast) and possibly compiled, while x and the result stay float64.
    σ goes in as a [B] tensor, so a compiled network sees the same input shapes at every step (no recompiles).
    """
    sigma = torch.full((x.shape[0],), float(sigma), dtype=torch.float64, device=x.device)
    return net(x, sigma, class_labels).to(torch.float64)


def _round_sigma(net, sigma):
    """net.round_sigma on a Python float, returned as a Python float (keeps the loops free of device syncs)."""
    return float(net.round_sigma(torch.tensor(float(sigma), dtype=torch.float64)))


def _check_steps(num_steps):
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f'num_steps must be an integer >= 2, got {num_steps!r}')
    return int(num_steps)


def _sigma_range(net, sigma_min, sigma_max):
    """Clamp the requested range to what the network supports (reference rule) and validate it."""
    sigma_min = max(float(sigma_min), float(net.sigma_min))
    sigma_max = min(float(sigma_max), float(net.sigma_max))
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f'need 0 < sigma_min < sigma_max < inf after clamping to the network\'s range '
                         f'[{net.sigma_min}, {net.sigma_max}], got sigma_min={sigma_min}, sigma_max={sigma_max}')
    return sigma_min, sigma_max


def edm_sigma_steps(net, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    """EDM's grid t_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, rounded by the net; Python floats."""
    num_steps = _check_steps(num_steps)
    sigma_min, sigma_max = _sigma_range(net, sigma_min, sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [float(v) for v in torch.as_tensor(net.round_sigma(t)).to(torch.float64)]


def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, alpha=0):
    """EDM's Heun sampler (Karras et al. 2022, Alg. 2); NFE = 2·num_steps − 1. Returns x at σ = 0 (float64).

    latents: x at σ = t_0 = edm_sigma_steps(...)[0], already drawn from the prior (not scaled here).
    alpha: PFGM++'s robustness probe: α·t_i·N(0, I) is added to x before step i (paper §4a).
    """
    t_steps = edm_sigma_steps(net, num_steps, sigma_min, sigma_max, rho) + [0.0]
    num_steps = len(t_steps) - 1
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        if alpha:
            x_cur = x_cur + alpha * t_cur * randn_like(x_cur)
        # Churn: raise the noise level to t_hat by adding fresh noise.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = _round_sigma(net, t_cur + gamma * t_cur)
        # Once churn is on, drawn on every step, in the window or not (EDM's draw order: seeds give EDM's images).
        churn_noise = randn_like(x_cur) if S_churn else None
        x_hat = x_cur
        if t_hat > t_cur:
            x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * churn_noise
        # Euler step, then Heun's second-order correction except on the last step (t_next = 0).
        d_cur = (x_hat - denoise(net, x_hat, t_hat, class_labels)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(net, x_next, t_next, class_labels)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ----------------------------------------------------------------------------------------------------------------
# Multistep solvers: one network evaluation per step, reusing the last few denoiser outputs. A step function maps
# the history [(σ_i, x_i, D_i), (σ_{i−1}, x_{i−1}, D_{i−1}), ...] (current point first; its length is the order
# the step runs at, which the loop lowers for the warm start and, on request, for the final steps) to x_{i+1}.

ENDINGS = ('stop', 'denoise')     # stop at σ_min (NFE = steps from σ_max to σ_min), or D(x; σ_min) at the end
SIGMA_GRIDS = ('rho', 'logsnr')   # EDM's ρ-polynomial grid, or uniform in log σ (= uniform in log-SNR)
# The multistep solvers' own options and their defaults (chosen by measurement, docs/samplers.md), in the order
# folder names state them.
MULTISTEP_DEFAULTS = dict(ending='stop', sigma_grid='rho', lower_order_final=True, afs=False)
MULTISTEP_OPTIONS = tuple(MULTISTEP_DEFAULTS)
DEFAULT_ENDING = MULTISTEP_DEFAULTS['ending']


def multistep_settings(**options):
    """The multistep options with None (or absent) replaced by their defaults, validated; a dict in
    MULTISTEP_OPTIONS order."""
    settings = {key: MULTISTEP_DEFAULTS[key] if options.get(key) is None else options[key]
                for key in MULTISTEP_OPTIONS}
    check_choice('ending', settings['ending'], ENDINGS)
    check_choice('sigma_grid', settings['sigma_grid'], SIGMA_GRIDS)
    settings['lower_order_final'], settings['afs'] = bool(settings['lower_order_final']), bool(settings['afs'])
    return settings


def sigma_steps(net, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, sigma_grid='rho'):
    """The noise levels σ_max = t_0 > … > t_{n−1} = σ_min of a multistep solver, rounded by the net; Python floats.
    'rho': edm_sigma_steps; 'logsnr': log t_i = log σ_max + i/(n−1)·(log σ_min − log σ_max)."""
    check_choice('sigma_grid', sigma_grid, SIGMA_GRIDS)
    if sigma_grid == 'rho':
        return edm_sigma_steps(net, num_steps, sigma_min, sigma_max, rho)
    num_steps = _check_steps(num_steps)
    sigma_min, sigma_max = _sigma_range(net, sigma_min, sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = torch.exp(math.log(sigma_max) + i / (num_steps - 1) * (math.log(sigma_min) - math.log(sigma_max)))
    return [float(v) for v in torch.as_tensor(net.round_sigma(t)).to(torch.float64)]


def _euler_step(history, sigma_next):
    sigma, x, denoised = history[0]
    return x + (sigma_next - sigma) * ((x - denoised) / sigma)


def _lagrange_basis(nodes):
    """basis[k][j] = the coefficient of u^j in the Lagrange polynomial ℓ_k (1 at nodes[k], 0 at the other nodes)."""
    basis = []
    for k, node_k in enumerate(nodes):
        poly = [1.0]
        for m, node_m in enumerate(nodes):
            if m != k:  # poly · (u − node_m) / (node_k − node_m)
                scale = 1 / (node_k - node_m)
                poly = [((poly[j - 1] if j else 0.0) - node_m * (poly[j] if j < len(poly) else 0.0)) * scale
                        for j in range(len(poly) + 1)]
        basis.append(poly)
    return basis


def _dpm_exact_step(history, sigma_next):
    """DPM-Solver++ multistep (data prediction) in λ = −log σ with exact polynomial integration. In λ the ODE is
    dx/dλ = D − x, so exactly x_next = (σ_next/σ_i)·x_i + ∫_0^h e^(u−h) D(λ_i + u) du with h = log(σ_i/σ_next). D
    is replaced by the polynomial through the history's denoiser outputs (in u = λ − λ_i) and integrated exactly:
    ∫_0^h e^(u−h) u^j du = I_j with I_0 = 1 − e^(−h), I_j = h^j − j·I_{j−1}. Order = len(history). With 2 entries
    this is Lu et al.'s "taylor" form of 2M; with 3, a 3M whose second difference gets twice the published weight."""
    sigma, x, _ = history[0]
    h = math.log(sigma / sigma_next)
    integrals = [-math.expm1(-h)]
    for j in range(1, len(history)):
        integrals.append(h ** j - j * integrals[-1])
    nodes = [math.log(sigma / s) for s, _, _ in history]  # λ_{i−k} − λ_i ≤ 0
    x_next = (sigma_next / sigma) * x
    for poly, (_, _, denoised) in zip(_lagrange_basis(nodes), history):
        x_next = x_next + sum(c * integral for c, integral in zip(poly, integrals)) * denoised
    return x_next


def _dpm_published_step(history, sigma_next):
    """DPM-Solver++(2M)/(3M) as the DPM-Solver++ paper (Alg. 2) and its official code compute them, order
    len(history) ≤ 3. With h = log(σ_i/σ_next), φ1 = 1 − e^(−h), r0 = h0/h, r1 = h1/h (h0, h1 the previous steps in λ):
    order 1: (σ_next/σ_i)·x_i + φ1·D_i (= Euler); order 2: + φ1/2·D1_0 with D1_0 = (D_i − D_{i−1})/r0 (midpoint
    form); order 3: + φ2·D1 − φ3·D2 with D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0 + r1),
    φ2 = 1 − φ1/h, φ3 = φ2/h − 1/2. (Exact integration of the quadratic would weight D2 by −2φ3.)"""
    sigma, x, d0 = history[0]
    h = math.log(sigma / sigma_next)
    phi1 = -math.expm1(-h)
    x_next = (sigma_next / sigma) * x + phi1 * d0
    if len(history) == 1:
        return x_next
    (sigma1, _, d1) = history[1]
    r0 = math.log(sigma1 / sigma) / h
    d1_0 = (d0 - d1) / r0
    if len(history) == 2:
        return x_next + 0.5 * phi1 * d1_0
    (sigma2, _, d2) = history[2]
    r1 = math.log(sigma2 / sigma1) / h
    d1_1 = (d1 - d2) / r1
    first = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    second = (d1_0 - d1_1) / (r0 + r1)
    phi2 = 1 - phi1 / h
    phi3 = phi2 / h - 0.5
    return x_next + phi2 * first - phi3 * second


# Adams–Bashforth weights for equal steps, newest slope first.
_ADAMS_BASHFORTH = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _slopes(history):
    return [(x_k - d_k) / s_k for s_k, x_k, d_k in history]


def _ipndm_step(history, sigma_next):
    """iPNDM (Zhang & Chen 2023): Adams–Bashforth of order len(history) ≤ 4 on dx/dσ = (x − D)/σ, with the
    equal-step weights applied to the actual step σ_next − σ_i (as published)."""
    sigma, x, _ = history[0]
    weights = _ADAMS_BASHFORTH[len(history)]
    return x + (sigma_next - sigma) * sum(w * d for w, d in zip(weights, _slopes(history)))


def _ipndm_v_weights(steps):
    """The published iPNDM_v weights (diff-sampler's tables) for steps = [h, h1, h2, h3][:order]: h = σ_next − σ_i,
    h1 = σ_i − σ_{i−1}, h2 = σ_{i−1} − σ_{i−2}, h3 = σ_{i−2} − σ_{i−3}. Approximate variable-step Adams–Bashforth
    weights; on equal steps they are the Adams–Bashforth ones. Newest slope first."""
    h = steps[0]
    if len(steps) == 1:
        return [1.0]
    h1 = steps[1]
    w = [(2 + h / h1) / 2, -(h / h1) / 2]
    if len(steps) == 2:
        return w
    h2 = steps[2]
    c1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if len(steps) == 3:
        return [w[0] + c1, w[1] - (1 + h1 / h2) * c1, c1 * h1 / h2]
    h3 = steps[3]
    c2 = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
          * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [w[0] + c1 + c2,
            w[1] - (1 + h1 / h2) * c1 - (1 + h1 / h2 + q) * c2,
            c1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * c2,
            -c2 * q * h1 / h2]


def _ipndm_v_step(history, sigma_next):
    """iPNDM_v as published: x_i + (σ_next − σ_i)·Σ w_k·slope_k with _ipndm_v_weights."""
    sigma, x, _ = history[0]
    sigmas = [sigma_next] + [s for s, _, _ in history]
    weights = _ipndm_v_weights([a - b for a, b in zip(sigmas[:-1], sigmas[1:])])
    return x + (sigma_next - sigma) * sum(w * d for w, d in zip(weights, _slopes(history)))


def _lms_step(history, sigma_next):
    """Variable-step Adams–Bashforth of order len(history) ≤ 4 on dx/dσ: the polynomial through the history's
    slopes (in u = σ − σ_i) integrated exactly over [0, σ_next − σ_i]."""
    sigma, x, _ = history[0]
    step = sigma_next - sigma
    nodes = [s_k - sigma for s_k, _, _ in history]
    x_next = x
    for poly, slope in zip(_lagrange_basis(nodes), _slopes(history)):
        x_next = x_next + sum(c * step ** (j + 1) / (j + 1) for j, c in enumerate(poly)) * slope
    return x_next


# solver -> (step function, order = the most history entries it uses)
_MULTISTEP = {'euler': (_euler_step, 1), 'dpm2m': (_dpm_published_step, 2), 'dpm3m': (_dpm_published_step, 3),
              'dpm2m_taylor': (_dpm_exact_step, 2), 'dpm3m_exact': (_dpm_exact_step, 3),
              'ipndm': (_ipndm_step, 4), 'ipndm_v': (_ipndm_v_step, 4), 'lms': (_lms_step, 4)}
MULTISTEP_SOLVERS = tuple(_MULTISTEP)
SOLVERS = ('heun',) + MULTISTEP_SOLVERS


def analytic_first_denoised(x, sigma):
    """AFS (Zhou et al., diff-sampler): the first step's direction taken as d = x/√(1 + σ²) instead of evaluating
    the network, i.e. D = x − σ·d; saves one evaluation."""
    return x - sigma * x / math.sqrt(1 + sigma ** 2)


def multistep_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, solver='dpm2m', num_steps=18,
                      sigma_min=0.002, sigma_max=80, rho=7, alpha=0, ending=None, sigma_grid=None,
                      lower_order_final=None, afs=None):
    """A one-evaluation-per-step solver on the grid t_0 > … > t_{n−1} = σ_min of `sigma_steps`.

    Step i evaluates D_i = D(x_i; t_i) once (AFS: step 0 uses analytic_first_denoised) and moves to t_{i+1} with
    `solver` over the last few D's, at the order the history allows (lower_order_final: after the warm start, also at most
    the number of moves left, so the last move is first order, the one before second order, ...). ending 'stop': return x at
    σ_min (NFE = n − 1); 'denoise': return D(x_{n−1}; σ_min) (NFE = n). AFS saves one NFE. latents: x at t_0,
    drawn from the prior. alpha: α·t_i·N(0, I) added to x before each evaluation (not at a 'stop' end). None
    options take MULTISTEP_DEFAULTS. Returns float64.
    """
    check_choice('solver', solver, MULTISTEP_SOLVERS)
    settings = multistep_settings(ending=ending, sigma_grid=sigma_grid, lower_order_final=lower_order_final, afs=afs)
    ending, lower_order_final, afs = settings['ending'], settings['lower_order_final'], settings['afs']
    nfe_for_steps(solver, num_steps, ending=ending, afs=afs)  # validates that at least one evaluation is left
    step, order = _MULTISTEP[solver]
    t_steps = sigma_steps(net, num_steps, sigma_min, sigma_max, rho, settings['sigma_grid'])
    moves = len(t_steps) - 1
    x = latents.to(torch.float64)
    history = []
    for i, t_cur in enumerate(t_steps):
        if i == moves and ending == 'stop':
            return x
        if alpha:
            x = x + alpha * t_cur * randn_like(x)
        denoised = analytic_first_denoised(x, t_cur) if afs and i == 0 else denoise(net, x, t_cur, class_labels)
        if i == moves:
            return denoised
        history = [(t_cur, x, denoised)] + history[:order - 1]
        use = len(history)
        if lower_order_final and use == order:  # as published: the warm start takes precedence
            use = min(order, moves - i)
        x = step(history[:use], t_steps[i + 1])


# ----------------------------------------------------------------------------------------------------------------
# The ablation sampler of EDM §3 (Table 1 / Fig. 2): any solver × discretisation × schedule × scaling.

class _AblationSchedule:
    """σ(t), σ'(t), σ⁻¹, s(t), s'(t) and the time grid t_0 > … > t_{n−1}, t_n = 0 (Python floats). The defaults
    are EDM's (its ablation sampler's); σ_min/σ_max None: the discretisation's own."""

    def __init__(self, net, num_steps=18, sigma_min=None, sigma_max=None, rho=7, discretization='edm',
                 schedule='linear', scaling='none', epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000):
        num_steps = _check_steps(num_steps)
        check_choice('discretization', discretization, ('vp', 've', 'iddpm', 'edm'))
        check_choice('schedule', schedule, ('vp', 've', 'linear'))
        check_choice('scaling', scaling, ('vp', 'none'))
        vp_default = functools.partial(vp_sigma, beta_d=19.9, beta_min=0.1)  # the P fork's 19.1 was a slip
        if sigma_min is None:
            sigma_min = {'vp': vp_default(epsilon_s), 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}[discretization]
        if sigma_max is None:
            sigma_max = {'vp': vp_default(1), 've': 100, 'iddpm': 81, 'edm': 80}[discretization]
        sigma_min, sigma_max = _sigma_range(net, sigma_min, sigma_max)

        # VP parameters that make σ_VP(ε_s) = σ_min and σ_VP(1) = σ_max.
        vp_beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
        vp_beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d

        frac = [i / (num_steps - 1) for i in range(num_steps)]
        if discretization == 'vp':
            sigma_steps = [vp_sigma(1 + f * (epsilon_s - 1), vp_beta_d, vp_beta_min) for f in frac]
        elif discretization == 've':
            sigma_steps = [math.sqrt(sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** f) for f in frac]
        elif discretization == 'iddpm':
            u = [v for v in iddpm_noise_levels(C_1, C_2, M) if sigma_min <= v <= sigma_max]
            sigma_steps = [u[round((len(u) - 1) * f)] for f in frac]
        else:
            sigma_steps = [(sigma_max ** (1 / rho) + f * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
                           for f in frac]

        if schedule == 'vp':
            vp = dict(beta_d=vp_beta_d, beta_min=vp_beta_min)
            self.sigma = functools.partial(vp_sigma, **vp)
            self.sigma_deriv = functools.partial(vp_sigma_deriv, **vp)
            self.sigma_inv = functools.partial(vp_sigma_inv, **vp)
        elif schedule == 've':
            self.sigma, self.sigma_deriv, self.sigma_inv = math.sqrt, lambda t: 0.5 / math.sqrt(t), lambda s: s ** 2
        else:
            self.sigma, self.sigma_deriv, self.sigma_inv = (lambda t: t), (lambda t: 1.0), (lambda s: s)

        if scaling == 'vp':
            self.s = lambda t: 1 / math.sqrt(1 + self.sigma(t) ** 2)
            self.s_deriv = lambda t: -self.sigma(t) * self.sigma_deriv(t) * self.s(t) ** 3
        else:
            self.s, self.s_deriv = (lambda t: 1.0), (lambda t: 0.0)

        self.net = net
        self.num_steps = num_steps
        self.t_steps = [self.sigma_inv(_round_sigma(net, s)) for s in sigma_steps] + [0.0]

    def derivative(self, x, t, class_labels):
        """dx/dt at (x, t) for the scaled ODE (EDM eq. 4)."""
        sigma, s = self.sigma(t), self.s(t)
        denoised = denoise(self.net, x / s, sigma, class_labels)
        return (self.sigma_deriv(t) / sigma + self.s_deriv(t) / s) * x - self.sigma_deriv(t) * s / sigma * denoised


# The options that name the ablation schedule: _AblationSchedule's parameters after `net`.
_ABLATION_SCHEDULE_KEYS = tuple(inspect.signature(_AblationSchedule).parameters)[1:]


def ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, solver='heun', alpha=1,
                     S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, noise_alpha=0, **schedule_kwargs):
    """EDM's generalised sampler. `alpha` is the reference's Heun intermediate-point parameter (α = 1: Heun);
    `noise_alpha` is generate_alpha's noise injection (α·σ(t_i)·s(t_i)·N(0, I) before step i). schedule_kwargs:
    num_steps, sigma_min, sigma_max, rho, discretization, schedule, scaling, epsilon_s, C_1, C_2, M, with the
    defaults of `_AblationSchedule` (EDM's).

    latents: unscaled x at σ = prior_sigma(...), already drawn from the prior; multiplied here by s(t_0).
    """
    check_choice('solver', solver, ('euler', 'heun'))
    sched = _AblationSchedule(net, **schedule_kwargs)
    sigma, s, t_steps = sched.sigma, sched.s, sched.t_steps
    x_next = latents.to(torch.float64) * s(t_steps[0])
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        if noise_alpha:
            x_cur = x_cur + noise_alpha * sigma(t_cur) * s(t_cur) * randn_like(x_cur)
        gamma = min(S_churn / sched.num_steps, math.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sched.sigma_inv(_round_sigma(net, sigma(t_cur) + gamma * sigma(t_cur)))
        # Drawn on every step, as EDM does, even at S_churn = 0: the σ(σ⁻¹(·)) round trip of the vp/ve schedules
        # can raise t_hat above t_cur by a rounding error, and then EDM adds that (tiny) noise too.
        churn_noise = randn_like(x_cur)
        x_hat = s(t_hat) / s(t_cur) * x_cur
        if sigma(t_hat) > sigma(t_cur):
            x_hat = x_hat + math.sqrt(sigma(t_hat) ** 2 - sigma(t_cur) ** 2) * s(t_hat) * S_noise * churn_noise

        h = t_next - t_hat
        d_cur = sched.derivative(x_hat, t_hat, class_labels)
        if solver == 'euler' or i == sched.num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            x_prime, t_prime = x_hat + alpha * h * d_cur, t_hat + alpha * h
            d_prime = sched.derivative(x_prime, t_prime, class_labels)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


# ----------------------------------------------------------------------------------------------------------------
# Choosing the sampler from CLI-style kwargs, and the prior level it starts from.

def uses_ablation(sampler_kwargs):
    """True when any of discretization/schedule/scaling is set: those need EDM's ablation sampler."""
    return any(sampler_kwargs.get(key) is not None for key in ABLATION_OPTIONS)


def _clean(sampler_kwargs):
    return {key: value for key, value in sampler_kwargs.items() if value is not None}


def _sampler_kind(kwargs):
    """'ablation', 'heun' (edm_sampler) or 'multistep' for cleaned kwargs; ValueError for a combination that
    no sampler runs."""
    solver = kwargs.get('solver', 'heun')
    check_choice('solver', solver, SOLVERS)
    if uses_ablation(kwargs):
        if solver not in ('euler', 'heun'):
            raise ValueError(f'solver={solver} runs on EDM\'s sigma grid only; it cannot be combined with '
                             f'discretization/schedule/scaling (the ablation sampler has euler and heun)')
        kind = 'ablation'
    else:
        kind = 'heun' if solver == 'heun' else 'multistep'
    if kind != 'multistep':
        given = [key for key in MULTISTEP_OPTIONS if kwargs.get(key) not in (None, False)
                 and not (key == 'sigma_grid' and kwargs[key] == 'rho')]
        if given:
            where = 'EDM\'s ablation sampler' if kind == 'ablation' else 'heun (EDM\'s grid and ending)'
            raise ValueError(f'{", ".join(given)} applies to the one-evaluation solvers '
                             f'({", ".join(MULTISTEP_SOLVERS)}), not to {where}')
    elif kwargs.get('S_churn', 0):
        raise ValueError(f'S_churn (stochastic sampling) needs solver=heun or the ablation sampler '
                         f'(discretization/schedule/scaling), not solver={solver}')
    return kind


def _evaluations_saved(ending=None, afs=None):
    """How many grid points a multistep solver does not evaluate: the 'stop' ending's σ_min, AFS's first point."""
    settings = multistep_settings(ending=ending, afs=afs)
    return (settings['ending'] == 'stop') + settings['afs']


def nfe_for_steps(solver, num_steps, ending=None, afs=None):
    """Network evaluations per image: heun 2·num_steps − 1 (no correction on the last step); the others
    num_steps − 1 with ending 'stop' (σ_min is not evaluated), num_steps with 'denoise', one fewer with AFS.
    ValueError when that leaves no evaluation."""
    solver = solver or 'heun'
    check_choice('solver', solver, SOLVERS)
    num_steps = _check_steps(num_steps)
    if solver == 'heun':
        return 2 * num_steps - 1
    nfe = num_steps - _evaluations_saved(ending, afs)
    if nfe < 1:
        raise ValueError(f'{num_steps} steps leave no network evaluation for {solver} with ending='
                         f'{multistep_settings(ending=ending)["ending"]}{" and afs" if afs else ""}; use more steps')
    return nfe


def steps_for_nfe(solver, nfe, ending=None, afs=None):
    """The num_steps that makes `nfe` network evaluations with `solver`; ValueError when no step count does."""
    solver = solver or 'heun'
    check_choice('solver', solver, SOLVERS)
    if solver == 'heun':
        if nfe < 3 or nfe % 2 == 0:
            near = ' or '.join(str(n) for n in (nfe - 1, nfe + 1) if n >= 3 and n % 2) or '3'
            raise ValueError(f'NFE {nfe} is impossible for heun: NFE = 2*steps - 1 is odd and >= 3 (try {near})')
        return (nfe + 1) // 2
    saved = _evaluations_saved(ending, afs)
    if nfe < 1 or nfe + saved < 2:
        raise ValueError(f'NFE {nfe} is impossible for {solver}: NFE = steps - {saved} with steps >= 2')
    return nfe + saved


_GRID_KEYS = ('num_steps', 'sigma_min', 'sigma_max', 'rho')


def prior_sigma(net, **sampler_kwargs):
    """The noise level t_0 at which `sample(net, latents, **sampler_kwargs)` expects its latents. Also validates the
    sampler options (ValueError), so callers can check everything before sampling."""
    kwargs = _clean(sampler_kwargs)
    kind = _sampler_kind(kwargs)
    if kind == 'ablation':
        sched = _AblationSchedule(net, **{key: kwargs[key] for key in _ABLATION_SCHEDULE_KEYS if key in kwargs})
        return sched.sigma(sched.t_steps[0])
    grid = {key: kwargs[key] for key in _GRID_KEYS if key in kwargs}
    if kind == 'heun':
        return edm_sigma_steps(net, **grid)[0]
    nfe_for_steps(kwargs['solver'], kwargs.get('num_steps', 18), kwargs.get('ending'), kwargs.get('afs'))
    return sigma_steps(net, sigma_grid=multistep_settings(**kwargs)['sigma_grid'], **grid)[0]


def sample(net, latents, class_labels=None, randn_like=torch.randn_like, noise_alpha=0, **sampler_kwargs):
    """Run the sampler the options name (None values are ignored): the ablation sampler when discretization,
    schedule or scaling is set; else edm_sampler for solver heun (the default), multistep_sampler for the others."""
    kwargs = _clean(sampler_kwargs)
    kind = _sampler_kind(kwargs)
    if kind == 'ablation':
        return ablation_sampler(net, latents, class_labels, randn_like, noise_alpha=noise_alpha, **kwargs)
    kwargs.pop('solver', None)
    if kind == 'heun':
        kwargs.pop('sigma_grid', None)  # 'rho' only (checked above)
        return edm_sampler(net, latents, class_labels, randn_like, alpha=noise_alpha, **kwargs)
    keys = _GRID_KEYS + MULTISTEP_OPTIONS  # S_min/S_max/S_noise matter only with churn
    return multistep_sampler(net, latents, class_labels, randn_like, solver=sampler_kwargs['solver'],
                             alpha=noise_alpha, **{key: kwargs[key] for key in keys if key in kwargs})


class SeedRandom:
    """One torch.Generator per seed, on `device`: every draw is made per image from that image's own stream,
    so the draws for an image depend only on its seed (not on the batch, the rank or the seed's position)."""

    def __init__(self, seeds, device):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def prior(self, image_shape, sigma, D):
        """x_T for each seed: the PFGM++ kernel at σ (Gaussian σ·N(0, I) for D=None), float64 [B, *image_shape]."""
        return torch.cat([sample_noise((1, *image_shape), sigma, D, generator=g, device=self.device,
                                       dtype=torch.float64) for g in self.generators])

    def randint(self, high):
        """One integer in [0, high) per seed, int64 [B]."""
        return torch.stack([torch.randint(high, size=[], generator=g, device=self.device)
                            for g in self.generators])

    def randn_like(self, x):
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device)
                            for g in self.generators])

"""Samplers: grid formulas, exact-denoiser convergence onto the data for every D, per-seed determinism."""

import math

import pytest
import torch

from training import sampler as S
from training.networks import iddpm_noise_levels
from training.pfgmpp import posterior_logits


class ExactDenoiser(torch.nn.Module):
    """The ideal denoiser of a finite dataset: E[y | x, σ] under the PFGM++ kernel (Gaussian for D=None)."""

    def __init__(self, data, D, sigma_min=0.0, sigma_max=float('inf')):
        super().__init__()
        self.data = data.to(torch.float64)  # [R, C, H, W]
        self.D = D
        self.img_channels, self.img_resolution = data.shape[1], data.shape[2]
        self.label_dim = 0
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        flat = x.to(torch.float64).reshape(x.shape[0], -1)
        refs = self.data.reshape(self.data.shape[0], -1)
        weights = torch.softmax(posterior_logits(flat, refs, sigma.reshape(-1), self.D), dim=1)
        return (weights @ refs).reshape(x.shape)


def toy_data(count=6, channels=1, resolution=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand([count, channels, resolution, resolution], generator=g, dtype=torch.float64) * 2 - 1


def test_edm_grid_matches_reference_values():
    net = ExactDenoiser(toy_data(), None)
    t = S.edm_sigma_steps(net, 18, 0.002, 80, 7)
    expected = [80, 57.586, 40.786, 28.375, 19.353, 12.910, 8.401, 5.315, 3.257, 1.923, 1.088, 0.585, 0.296,
                0.140, 0.060, 0.023, 0.0075, 0.002]
    assert len(t) == 18
    for got, want in zip(t, expected):
        assert got == pytest.approx(want, rel=1e-4, abs=5e-4)  # the listed values are rounded
    # Closed form at the ends and ρ-spacing in between.
    assert t[0] == pytest.approx(80, rel=1e-14) and t[-1] == pytest.approx(0.002, rel=1e-12)
    assert t[5] == pytest.approx((80 ** (1 / 7) + 5 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rel=1e-14)


def test_grid_is_clamped_to_the_network_range_and_rejects_bad_steps():
    net = ExactDenoiser(toy_data(), None, sigma_min=0.01, sigma_max=50)
    t = S.edm_sigma_steps(net, 5, 0.002, 80, 7)
    assert t[0] == pytest.approx(50) and t[-1] == pytest.approx(0.01)
    assert S.prior_sigma(net, num_steps=5, sigma_max=None) == pytest.approx(50)
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match='num_steps'):
            S.edm_sigma_steps(net, bad)


@pytest.mark.parametrize('D', [2, 64, 2048, None])
@pytest.mark.parametrize('num_steps', [18, 35])
def test_exact_denoiser_lands_on_the_data(D, num_steps):
    data = toy_data(count=6, channels=1, resolution=4)
    net = ExactDenoiser(data, D)
    seeds = list(range(12))
    rnd = S.SeedRandom(seeds, 'cpu')
    sigma0 = S.prior_sigma(net, num_steps=num_steps)
    latents = rnd.prior(data.shape[1:], sigma0, D)
    x0 = S.edm_sampler(net, latents, randn_like=rnd.randn_like, num_steps=num_steps)
    assert net.calls == 2 * num_steps - 1
    flat = x0.reshape(len(seeds), -1)
    refs = data.reshape(len(data), -1)
    nearest = torch.cdist(flat, refs).min(dim=1).values
    spread = torch.pdist(refs).min()
    assert nearest.max() < 1e-3 * spread, (D, nearest)


def test_prior_radius_follows_the_kernel():
    """Per-seed prior has the right norm law: E‖x‖² = σ²·N·D/(D−2) for the Student-t form."""
    seeds = list(range(4000))
    N, D, sigma = 16, 8.0, 3.0
    x = S.SeedRandom(seeds, 'cpu').prior((1, 4, 4), sigma, D)
    mean_sq = x.reshape(len(seeds), -1).square().sum(1).mean().item()
    assert mean_sq == pytest.approx(sigma ** 2 * N * D / (D - 2), rel=0.1)


def test_alpha_injection_and_churn_are_per_seed_and_batch_independent():
    data = toy_data(count=5, channels=2, resolution=4, seed=1)
    net = ExactDenoiser(data, 64.0)
    seeds = [7, 3, 11, 0, 5]
    kwargs = dict(num_steps=6, S_churn=5, S_min=0.05, S_max=50, S_noise=1.003, noise_alpha=0.1)

    def run(seed_list):
        rnd = S.SeedRandom(seed_list, 'cpu')
        latents = rnd.prior(data.shape[1:], S.prior_sigma(net, **kwargs), net.D)
        return S.sample(net, latents, randn_like=rnd.randn_like, **kwargs)

    full = run(seeds)
    for i, seed in enumerate(seeds):
        assert torch.equal(run([seed])[0], full[i])
    assert torch.equal(run(seeds[::-1]), full.flip(0))
    # α actually perturbs the trajectory.
    kwargs['noise_alpha'] = 0
    assert not torch.allclose(run(seeds), full)


def test_ablation_defaults_equal_edm_sampler():
    data = toy_data(count=4, channels=1, resolution=4, seed=2)
    net = ExactDenoiser(data, None)
    rnd = S.SeedRandom([1, 2, 3], 'cpu')
    latents = rnd.prior(data.shape[1:], 80, None)
    a = S.edm_sampler(net, latents, num_steps=10)
    b = S.ablation_sampler(net, latents, num_steps=10, sigma_min=0.002, sigma_max=80)
    assert torch.allclose(a, b, rtol=0, atol=1e-10)
    # The CLI dispatcher: an ablation option switches samplers; the default ablation range is EDM's.
    assert S.uses_ablation(dict(discretization='edm')) and not S.uses_ablation(dict(solver='heun', num_steps=5))
    c = S.sample(net, latents, num_steps=10, discretization='edm')
    assert torch.allclose(a, c, rtol=0, atol=1e-10)
    # The multistep engine's Euler with the 'denoise' ending is the ablation sampler's Euler (two codings of one
    # formula).
    d = S.sample(net, latents, num_steps=10, solver='euler', ending='denoise')
    e = S.sample(net, latents, num_steps=10, solver='euler', discretization='edm')
    assert torch.allclose(d, e, rtol=0, atol=1e-10)


def test_ablation_vp_grid_and_schedule_closed_forms():
    net = ExactDenoiser(toy_data(), None)
    sched = S._AblationSchedule(net, 18, None, None, 7, 'vp', 'vp', 'vp', 1e-3, 0.001, 0.008, 1000)
    sigma_vp = lambda t, bd=19.9, bm=0.1: math.sqrt(math.exp(0.5 * bd * t * t + bm * t) - 1)
    # Default VP range: σ_VP(ε_s) … σ_VP(1) with β_d = 19.9, β_min = 0.1.
    assert sched.sigma(sched.t_steps[0]) == pytest.approx(sigma_vp(1), rel=1e-9)
    assert sched.sigma(sched.t_steps[-2]) == pytest.approx(sigma_vp(1e-3), rel=1e-9)
    assert sigma_vp(1e-3) == pytest.approx(0.010486, rel=1e-4) and sigma_vp(1) == pytest.approx(152.167, rel=1e-5)
    assert sched.t_steps[0] == pytest.approx(1, rel=1e-9) and sched.t_steps[-1] == 0
    # σ'(t) by finite differences, s'(t) likewise, σ⁻¹(σ(t)) = t.
    t, h = 0.37, 1e-6
    assert sched.sigma_deriv(t) == pytest.approx((sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h), rel=1e-6)
    assert sched.s_deriv(t) == pytest.approx((sched.s(t + h) - sched.s(t - h)) / (2 * h), rel=1e-6)
    assert sched.sigma_inv(sched.sigma(t)) == pytest.approx(t, rel=1e-12)
    ve = S._AblationSchedule(net, 5, None, None, 7, 've', 've', 'none', 1e-3, 0.001, 0.008, 1000)
    assert [ve.sigma(t) for t in ve.t_steps[:-1]] == pytest.approx(
        [100 * (0.02 / 100) ** (i / 4) for i in range(5)], rel=1e-12)
    iddpm = S._AblationSchedule(net, 4, None, None, 7, 'iddpm', 'linear', 'none', 1e-3, 0.001, 0.008, 1000)
    u = [v for v in iddpm_noise_levels(0.001, 0.008, 1000) if 0.002 <= v <= 81]
    assert iddpm.t_steps[:-1] == [u[0], u[round((len(u) - 1) / 3)], u[round(2 * (len(u) - 1) / 3)], u[-1]]


@pytest.mark.parametrize('config, tolerance', [
    (dict(solver='euler', discretization='edm', schedule='linear', scaling='none', num_steps=60), 1e-2),
    # VP and VE schedules have σ ∝ √t near 0, so the last (Euler) step from σ_min to 0 removes only half of the
    # remaining noise: the floor is ≈ σ_min·√N / 2 (0.02 for VP's σ_min 0.0105, 0.04 for VE's 0.02; N = 16).
    # The VP ODE is also stiff (EDM Fig. 2 needs hundreds of NFE), hence 100 steps.
    (dict(solver='heun', discretization='vp', schedule='vp', scaling='vp', num_steps=100), 2e-2),
    (dict(solver='heun', discretization='ve', schedule='ve', scaling='none', num_steps=30), 3e-2),
    (dict(solver='heun', discretization='iddpm', schedule='linear', scaling='none', num_steps=30), 1e-2),
])
@pytest.mark.parametrize('D', [64, None])
def test_ablation_sampler_lands_on_the_data(config, tolerance, D):
    data = toy_data(count=5, channels=1, resolution=4, seed=3)
    net = ExactDenoiser(data, D)
    rnd = S.SeedRandom(range(8), 'cpu')
    latents = rnd.prior(data.shape[1:], S.prior_sigma(net, **config), D)
    x0 = S.sample(net, latents, randn_like=rnd.randn_like, **config)
    nearest = torch.cdist(x0.reshape(8, -1), data.reshape(5, -1)).min(dim=1).values
    assert nearest.max() < tolerance * torch.pdist(data.reshape(5, -1)).min(), nearest


def test_bad_ablation_choice_is_a_value_error():
    net = ExactDenoiser(toy_data(), None)
    with pytest.raises(ValueError, match='solver'):
        S.ablation_sampler(net, torch.zeros(1, 1, 4, 4), solver='rk4')
    with pytest.raises(ValueError, match='discretization'):
        S.prior_sigma(net, discretization='cosine')


# ----------------------------------------------------------------------------------------------------------------
# Seed compatibility with EDM's generate.py: the churn noise is drawn on every step (issue 13).

def reference_edm_sampler(net, latents, randn_like, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max,
                          S_noise):
    """EDM's edm_sampler as reference-facts §6.1 describes it (tensors throughout, ε drawn on every step and
    multiplied by zero outside [S_min, S_max]); here `latents` are x at t_0 already, like S.edm_sampler's."""
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        d_cur = (x_hat - net(x_hat, t_hat.reshape(1)).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next.reshape(1)).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


EDM_IMAGENET_CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)


def test_stochastic_edm_sampler_matches_the_reference_draw_order():
    """EDM's ImageNet churn settings: the first steps (σ > 50) and the last (σ < 0.05) are outside the window.
    Catches drawing the churn noise only inside the window (every later draw of the seed then shifts)."""
    data = toy_data(count=5, channels=2, resolution=4, seed=4)
    net = ExactDenoiser(data, None)
    kwargs = dict(num_steps=12, sigma_min=0.002, sigma_max=80, rho=7, **EDM_IMAGENET_CHURN)
    t_steps = S.edm_sigma_steps(net, 12, 0.002, 80, 7)
    assert any(t > 50 for t in t_steps) and any(t < 0.05 for t in t_steps)  # both sides of the window are used
    seeds = [0, 5, 9]
    rnd, ref_rnd = S.SeedRandom(seeds, 'cpu'), S.SeedRandom(seeds, 'cpu')
    latents = rnd.prior(data.shape[1:], t_steps[0], None)
    assert torch.equal(ref_rnd.prior(data.shape[1:], t_steps[0], None), latents)
    ours = S.edm_sampler(net, latents, randn_like=rnd.randn_like, **kwargs)
    ref = reference_edm_sampler(net, latents, ref_rnd.randn_like, **kwargs)
    assert torch.equal(ours, ref)


def _fresh_state_after(seed, shape, draws):
    """The generator state of `seed` after the Gaussian prior (drawn in float32) and `draws` float64 draws of
    `shape` (CPU)."""
    g = torch.Generator().manual_seed(seed)
    torch.randn((1, *shape), generator=g, dtype=torch.float32)
    for _ in range(draws):
        torch.randn(shape, generator=g, dtype=torch.float64)
    return g.get_state()


@pytest.mark.parametrize('sampler', ['edm', 'ablation'])
def test_churn_outside_its_window_still_advances_each_seed_by_one_draw_per_step(sampler):
    """A churn window that covers no step leaves the image equal to the deterministic one, yet every step still
    draws exactly one [C, H, W] Gaussian from the seed's generator (no more: the Heun correction draws nothing).
    Catches drawing the churn noise only inside the window (EDM draws it on every step)."""
    data = toy_data(count=4, channels=2, resolution=4, seed=5)
    net = ExactDenoiser(data, None)
    extra = dict(discretization='edm') if sampler == 'ablation' else {}
    num_steps, seeds = 7, [3, 8]

    def run(**kwargs):
        rnd = S.SeedRandom(seeds, 'cpu')
        latents = rnd.prior(data.shape[1:], S.prior_sigma(net, num_steps=num_steps, **extra), None)
        x = S.sample(net, latents, randn_like=rnd.randn_like, num_steps=num_steps, **extra, **kwargs)
        return x, [g.get_state() for g in rnd.generators]

    def assert_draws(states, draws):
        for seed, state in zip(seeds, states):
            assert torch.equal(state, _fresh_state_after(seed, data.shape[1:], draws))

    # At S_churn = 0 edm_sampler uses no churn noise, so it draws none; the ablation sampler draws it anyway
    # (its σ(σ⁻¹(σ)) round trip can add a rounding-sized churn, as in EDM).
    churn_draws_at_zero = num_steps if sampler == 'ablation' else 0
    deterministic, states = run()
    assert_draws(states, churn_draws_at_zero)
    outside, outside_states = run(S_churn=40, S_min=100, S_max=200, S_noise=1.003)  # grid tops out at 80
    assert torch.equal(outside, deterministic)
    assert_draws(outside_states, num_steps)
    inside, _ = run(S_churn=40, S_min=0, S_max=200, S_noise=1.003)
    assert not torch.allclose(inside, deterministic)  # the window does matter when it covers steps
    # α noise injection draws once per step, before the churn noise.
    _, alpha_states = run(noise_alpha=0.1)
    assert_draws(alpha_states, num_steps + churn_draws_at_zero)
    _, both_states = run(noise_alpha=0.1, S_churn=40, S_min=100, S_max=200)
    assert_draws(both_states, 2 * num_steps)


# The solvers: convergence order, landing on the data, NFE accounting, Heun's bytes, randomness.

class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of N(mean, std²·I) data for D → ∞: mean + std²/(std² + σ²)·(x − mean)."""

    def __init__(self, mean, std, D=None, shape=(1, 4, 4)):
        super().__init__()
        self.mean, self.std, self.D = mean, std, D
        self.img_channels, self.img_resolution, self.label_dim = shape[0], shape[1], 0
        self.sigma_min, self.sigma_max = 0.0, float('inf')
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        s2 = sigma.to(torch.float64).reshape(-1, 1, 1, 1) ** 2
        return self.mean + self.std ** 2 / (self.std ** 2 + s2) * (x.to(torch.float64) - self.mean)


# Measured slopes of log2(error(n) / error(2n)) (docs/samplers.md). The published dpm3m is second order; the
# published ipndm_v approaches 2 slowly on the ρ-grid (1.36, 1.72, 1.87 from n = 128) and 3 on the log-SNR grid.
_ORDERS = [('euler', 'rho', 128, 0.95, 1.05), ('dpm2m', 'rho', 128, 1.9, 2.15), ('dpm3m', 'rho', 128, 1.8, 2.0),
           ('dpm2m_taylor', 'rho', 128, 1.9, 2.15), ('dpm3m_exact', 'rho', 128, 2.9, 3.15),
           ('ipndm', 'rho', 128, 1.9, 2.1), ('ipndm_v', 'rho', 256, 1.6, 1.85), ('lms', 'rho', 128, 3.7, 4.1),
           ('dpm2m', 'logsnr', 128, 1.9, 2.1), ('dpm3m', 'logsnr', 128, 1.9, 2.15),
           ('dpm3m_exact', 'logsnr', 64, 3.9, 4.5), ('ipndm_v', 'logsnr', 128, 2.6, 2.85),
           ('lms', 'logsnr', 128, 3.7, 4.1)]


@pytest.mark.parametrize('solver, grid, n, low, high, ending', [
    ('heun', 'rho', 128, 1.9, 2.1, 'denoise')] + [case + (ending,) for case in _ORDERS for ending in S.ENDINGS])
def test_convergence_order_on_gaussian_data(solver, grid, n, low, high, ending):
    """Gaussian data, D → ∞: the exact flow is x(σ) = μ + (x₀ − μ)·√((σ² + s²)/(σ₀² + s²)). Ending 'stop' returns
    x(σ_min); 'denoise' (and Heun, whose last step is the same up to rounding) D(x; σ_min), a linear map, so the
    error against D(x_exact(σ_min); σ_min) is a fixed multiple of the error at σ_min."""
    mean, std, sigma_min, sigma_max = 0.25, 0.5, 0.002, 80.0
    net = GaussianDenoiser(mean, std)
    x0 = torch.randn([4, 1, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max
    exact = mean + (x0 - mean) * math.sqrt((sigma_min ** 2 + std ** 2) / (sigma_max ** 2 + std ** 2))
    target = exact if ending == 'stop' else net(exact, torch.full([4], sigma_min, dtype=torch.float64))
    options = {} if solver == 'heun' else dict(ending=ending, sigma_grid=grid)
    errors = [(S.sample(net, x0, solver=solver, num_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, **options)
               - target).abs().max().item() for steps in (n, 2 * n)]
    order = math.log2(errors[0] / errors[1])
    assert low < order < high, (solver, errors, order)


@pytest.mark.parametrize('D', [2, 64, 2048, None])
@pytest.mark.parametrize('solver', S.MULTISTEP_SOLVERS)
def test_every_solver_lands_on_the_data(solver, D):
    """Both endings: 'denoise' lands on a data point, 'stop' within the noise σ_min leaves (σ_min·√N per sample)."""
    data = toy_data(count=6, channels=1, resolution=4)
    net = ExactDenoiser(data, D)
    rnd = S.SeedRandom(range(12), 'cpu')
    latents = rnd.prior(data.shape[1:], S.prior_sigma(net, solver=solver, num_steps=40), D)
    spread = torch.pdist(data.reshape(6, -1)).min()
    # 'stop' only for D ≥ 64: at D = 2 the kernel's heavy tails leave much more than σ_min·√N at σ_min.
    for ending, tolerance in [('denoise', 1e-3 * spread)] + ([('stop', 3 * 0.002 * math.sqrt(16))] if D != 2 else []):
        x0 = S.sample(net, latents, solver=solver, num_steps=40, ending=ending)
        nearest = torch.cdist(x0.reshape(12, -1), data.reshape(6, -1)).min(dim=1).values
        assert nearest.max() < tolerance, (solver, D, ending, nearest)


@pytest.mark.parametrize('solver', S.SOLVERS)
def test_nfe_counts_network_calls(solver):
    """Every ending and AFS setting: the calls made are nfe_for_steps, and steps_for_nfe inverts it."""
    net = GaussianDenoiser(0.0, 0.5)
    settings = [{}] if solver == 'heun' else [dict(ending=e, afs=a) for e in S.ENDINGS for a in (False, True)]
    for options in settings:
        for num_steps in (2, 3, 7):
            if solver != 'heun' and num_steps == 2 and options['ending'] == 'stop' and options['afs']:
                with pytest.raises(ValueError, match='no network evaluation'):
                    S.sample(net, torch.ones([2, 1, 4, 4], dtype=torch.float64), solver=solver, num_steps=2,
                             **options)
                continue
            net.calls = 0
            S.sample(net, torch.ones([2, 1, 4, 4], dtype=torch.float64), solver=solver, num_steps=num_steps,
                     **options)
            assert net.calls == S.nfe_for_steps(solver, num_steps, **options)
            assert S.steps_for_nfe(solver, net.calls, **options) == num_steps
    if solver == 'heun':
        assert S.nfe_for_steps(solver, 7) == 13
    else:  # the default ending stops at σ_min: the steps from σ_max to σ_min
        assert S.nfe_for_steps(solver, 7) == 6 and S.nfe_for_steps(solver, 7, ending='denoise', afs=True) == 6
        assert S.nfe_for_steps(solver, 7, ending='stop', afs=True) == 5


def test_impossible_nfe_and_bad_combinations_are_value_errors():
    for nfe, hint in [(10, 'try 9 or 11'), (4, 'try 3 or 5'), (2, 'try 3'), (1, 'try 3')]:
        with pytest.raises(ValueError, match=f'NFE {nfe} is impossible for heun.*{hint}'):
            S.steps_for_nfe('heun', nfe)
    with pytest.raises(ValueError, match='impossible for dpm2m'):
        S.steps_for_nfe('dpm2m', 0)
    with pytest.raises(ValueError, match='impossible for dpm2m'):
        S.steps_for_nfe('dpm2m', 1, ending='denoise')
    assert S.steps_for_nfe('dpm2m', 1) == 2 and S.steps_for_nfe('dpm2m', 1, ending='denoise', afs=True) == 2
    net = GaussianDenoiser(0.0, 0.5)
    with pytest.raises(ValueError, match='solver must be one of'):
        S.prior_sigma(net, solver='rk4')
    with pytest.raises(ValueError, match='cannot be combined'):
        S.prior_sigma(net, solver='dpm2m', discretization='vp')
    with pytest.raises(ValueError, match='S_churn'):
        S.sample(net, torch.ones([1, 1, 4, 4]), solver='ipndm', S_churn=10)
    # Heun keeps EDM's grid and ending; the ablation sampler has neither option.
    for options in [dict(ending='stop'), dict(ending='denoise'), dict(sigma_grid='logsnr'), dict(afs=True),
                    dict(lower_order_final=True)]:
        with pytest.raises(ValueError, match='applies to the one-evaluation solvers'):
            S.prior_sigma(net, solver='heun', **options)
        with pytest.raises(ValueError, match='applies to the one-evaluation solvers'):
            S.prior_sigma(net, solver='euler', discretization='edm', **options)
    with pytest.raises(ValueError, match='ending must be one of'):
        S.prior_sigma(net, solver='dpm2m', ending='zero')
    with pytest.raises(ValueError, match='sigma_grid must be one of'):
        S.prior_sigma(net, solver='dpm2m', sigma_grid='vp')


def test_heun_path_keeps_its_bytes():
    """The default sampler's output, pinned: sha256 of the float64 result computed on main at d8ca3fd (before the
    multistep solvers existed) with this exact setup. Elementwise float64 maths and CPU generators only, so the
    hash does not depend on the BLAS."""
    import hashlib
    net = GaussianDenoiser(0.25, 0.5, D=64.0)
    rnd = S.SeedRandom([5, 1, 9], 'cpu')
    latents = rnd.prior((1, 4, 4), S.prior_sigma(net, num_steps=7), 64.0)
    x = S.sample(net, latents, randn_like=rnd.randn_like, num_steps=7, noise_alpha=0.1)
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == \
        '89f82264329fc10dcc3fff73f2b97767c706164208f2a34163ca9f1da2c229e5'
    rnd = S.SeedRandom([5, 1, 9], 'cpu')
    latents = rnd.prior((1, 4, 4), S.prior_sigma(net, num_steps=7), 64.0)
    assert torch.equal(S.sample(net, latents, randn_like=rnd.randn_like, num_steps=7, noise_alpha=0.1,
                                solver='heun'), x)


@pytest.mark.parametrize('solver', S.MULTISTEP_SOLVERS)
def test_solvers_are_per_seed_and_batch_independent_with_alpha(solver):
    # An elementwise denoiser: a matrix-product one (ExactDenoiser) may round differently per batch size.
    net = GaussianDenoiser(0.25, 0.5, D=64.0, shape=(2, 4, 4))
    seeds = [7, 3, 11, 0, 5]
    kwargs = dict(solver=solver, num_steps=6, noise_alpha=0.1)

    def run(seed_list, **extra):
        rnd = S.SeedRandom(seed_list, 'cpu')
        latents = rnd.prior((2, 4, 4), S.prior_sigma(net, **kwargs), net.D)
        return S.sample(net, latents, randn_like=rnd.randn_like, **dict(kwargs, **extra))

    full = run(seeds)
    for i, seed in enumerate(seeds):
        assert torch.equal(run([seed])[0], full[i])
    assert torch.equal(run(seeds[::-1]), full.flip(0))
    assert not torch.allclose(run(seeds, noise_alpha=0), full)  # α perturbs the trajectory


# ----------------------------------------------------------------------------------------------------------------
# The published algorithms, written out independently of training/sampler.py in the published notation
# (DPM-Solver++ official code: φ1 = expm1(−h) < 0; iPNDM_v: diff-sampler's h_n, h_{n−1}, ... and slope buffer).

def published_dpm_solver_pp(net, x, t_steps, order, lower_order_final):
    """DPM-Solver++(order)M, data prediction, stopping at t_steps[-1]; warm start at orders 1, 2, ...; with
    lower_order_final the step order is min(order, steps left) once the warm start is over."""
    lam = lambda t: -math.log(t)
    models, times = [], []
    num_steps = len(t_steps)
    for i in range(num_steps - 1):
        t, t_next = t_steps[i], t_steps[i + 1]
        models.append(net(x, torch.full([x.shape[0]], t, dtype=torch.float64)))
        times.append(t)
        if lower_order_final:
            step_order = i + 1 if i + 1 < order else min(order, num_steps - (i + 1))
        else:
            step_order = min(order, i + 1)
        h = lam(t_next) - lam(times[-1])
        phi_1 = math.expm1(-h)
        x_new = (t_next / times[-1]) * x - phi_1 * models[-1]
        if step_order >= 2:
            r0 = (lam(times[-1]) - lam(times[-2])) / h
            D1_0 = (1 / r0) * (models[-1] - models[-2])
        if step_order == 2:
            x_new = x_new - 0.5 * phi_1 * D1_0
        if step_order == 3:
            r1 = (lam(times[-2]) - lam(times[-3])) / h
            D1_1 = (1 / r1) * (models[-2] - models[-3])
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1 / (r0 + r1)) * (D1_0 - D1_1)
            phi_2 = phi_1 / h + 1
            phi_3 = phi_2 / h - 0.5
            x_new = x_new + phi_2 * D1 - phi_3 * D2
        x = x_new
    return x


def published_ipndm_v(net, x, t_steps):
    """iPNDM_v (max order 4), stopping at t_steps[-1], with the published approximate variable-step weights."""
    slopes = []
    for i in range(len(t_steps) - 1):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        d_cur = (x - net(x, torch.full([x.shape[0]], t_cur, dtype=torch.float64))) / t_cur
        order = min(4, i + 1)
        hn = t_next - t_cur
        if order == 1:
            c = [1]
        else:
            hn1 = t_cur - t_steps[i - 1]
            base1, base2 = (2 + hn / hn1) / 2, -(hn / hn1) / 2
        if order == 2:
            c = [base1, base2]
        if order >= 3:
            hn2 = t_steps[i - 1] - t_steps[i - 2]
            tmp1 = (1 - hn / (3 * (hn + hn1)) * (hn * (hn + hn1)) / (hn1 * (hn1 + hn2))) / 2
        if order == 3:
            c = [base1 + tmp1, base2 - (1 + hn1 / hn2) * tmp1, tmp1 * hn1 / hn2]
        if order == 4:
            hn3 = t_steps[i - 2] - t_steps[i - 3]
            tmp2 = ((1 - hn / (3 * (hn + hn1))) / 2 + (1 - hn / (2 * (hn + hn1))) * hn / (6 * (hn + hn1 + hn2))) \
                * (hn * (hn + hn1) * (hn + hn1 + hn2)) / (hn1 * (hn1 + hn2) * (hn1 + hn2 + hn3))
            ratio = hn1 * (hn1 + hn2) / (hn2 * (hn2 + hn3))
            c = [base1 + tmp1 + tmp2,
                 base2 - (1 + hn1 / hn2) * tmp1 - (1 + hn1 / hn2 + ratio) * tmp2,
                 tmp1 * hn1 / hn2 + (hn1 / hn2 + ratio * (1 + hn2 / hn3)) * tmp2,
                 -tmp2 * ratio * hn1 / hn2]
        history = [d_cur] + slopes[::-1]
        x = x + hn * sum(w * d for w, d in zip(c, history))
        slopes = (slopes + [d_cur])[-3:]
    return x


@pytest.mark.parametrize('sigma_grid', S.SIGMA_GRIDS)
@pytest.mark.parametrize('num_steps', [3, 4, 6, 11])
def test_published_solvers_match_the_written_out_formulas(sigma_grid, num_steps):
    """dpm2m, dpm3m (both lower_order_final settings) and ipndm_v against the published step formulas. Catches the
    taylor 2M or the exact-quadratic 3M under the published name, another lower-order rule, the exact
    variable-step weights instead of iPNDM_v's, and an off-by-one in the 'stop' ending."""
    data = toy_data(count=5, channels=1, resolution=4, seed=6)
    net = ExactDenoiser(data, 64.0)
    latents = S.SeedRandom(range(3), 'cpu').prior(data.shape[1:], 80.0, 64.0)
    t_steps = S.sigma_steps(net, num_steps, 0.002, 80, 7, sigma_grid)
    common = dict(num_steps=num_steps, sigma_grid=sigma_grid, ending='stop', afs=False)
    for solver, order in [('dpm2m', 2), ('dpm3m', 3)]:
        for lof in (False, True):
            ours = S.sample(net, latents, solver=solver, lower_order_final=lof, **common)
            ref = published_dpm_solver_pp(net, latents, t_steps, order, lof)
            assert torch.allclose(ours, ref, rtol=0, atol=1e-12), (solver, lof, (ours - ref).abs().max())
    ours = S.sample(net, latents, solver='ipndm_v', lower_order_final=False, **common)
    ref = published_ipndm_v(net, latents, t_steps)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12), (ours - ref).abs().max()
    # The renamed forms are other algorithms once the history they differ in is used (ipndm_v and lms share the
    # exact second-order weights; they differ from third order on).
    full_order = dict(common, lower_order_final=False)
    for published, renamed in [('dpm2m', 'dpm2m_taylor'), ('dpm3m', 'dpm3m_exact'), ('ipndm_v', 'lms')]:
        if num_steps >= 4 or published == 'dpm2m':
            assert not torch.allclose(S.sample(net, latents, solver=published, **full_order),
                                      S.sample(net, latents, solver=renamed, **full_order), rtol=0, atol=1e-6)


def test_renamed_forms_keep_their_formulas():
    """One step of dpm2m_taylor is the official code's "taylor" 2M, and dpm3m_exact's differs from the published 3M
    only by the second difference's weight (−2φ3 instead of −φ3). Catches a mix-up of the step functions."""
    g = torch.Generator().manual_seed(3)
    x, m0, m1, m2 = (torch.randn([2, 1, 4, 4], generator=g, dtype=torch.float64) for _ in range(4))
    sigmas, sigma_next = [1.3, 2.9, 5.0], 0.6
    history = [(s, x, m) for s, m in zip(sigmas, (m0, m1, m2))]
    h = math.log(sigmas[0] / sigma_next)
    phi_1 = math.expm1(-h)
    r0 = math.log(sigmas[1] / sigmas[0]) / h
    D1_0 = (m0 - m1) / r0
    taylor = (sigma_next / sigmas[0]) * x - phi_1 * m0 + (phi_1 / h + 1) * D1_0
    assert torch.allclose(S._MULTISTEP['dpm2m_taylor'][0](history[:2], sigma_next), taylor, rtol=0, atol=1e-13)
    r1 = math.log(sigmas[2] / sigmas[1]) / h
    D2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
    phi_3 = (phi_1 / h + 1) / h - 0.5
    difference = S._MULTISTEP['dpm3m_exact'][0](history, sigma_next) - S._MULTISTEP['dpm3m'][0](history, sigma_next)
    assert torch.allclose(difference, -phi_3 * D2, rtol=0, atol=1e-12)


def test_logsnr_grid_closed_form():
    net = GaussianDenoiser(0.0, 0.5)
    t = S.sigma_steps(net, 6, 0.002, 80, 7, 'logsnr')
    assert t == pytest.approx([80 * (0.002 / 80) ** (i / 5) for i in range(6)], rel=1e-13)
    assert S.sigma_steps(net, 6, 0.002, 80, 7, 'rho') == S.edm_sigma_steps(net, 6, 0.002, 80, 7)
    assert S.prior_sigma(net, solver='dpm2m', num_steps=6, sigma_grid='logsnr', sigma_max=50) == pytest.approx(50)


def test_endings_and_analytic_first_step():
    """'denoise' is D(x; σ_min) of what 'stop' returns; AFS equals evaluating, at σ_max, a network whose output there
    is x − σ·x/√(1 + σ²). Catches an evaluation at σ_min under 'stop' and AFS at the wrong step or formula."""
    data = toy_data(count=5, channels=1, resolution=4, seed=7)
    net = ExactDenoiser(data, None)
    latents = S.SeedRandom(range(3), 'cpu').prior(data.shape[1:], 80.0, None)
    for solver in ('euler', 'dpm3m', 'ipndm'):
        stop = S.sample(net, latents, solver=solver, num_steps=6, ending='stop')
        denoise = S.sample(net, latents, solver=solver, num_steps=6, ending='denoise')
        assert torch.equal(denoise, net(stop, torch.full([3], 0.002, dtype=torch.float64)))

    class AnalyticAtTheTop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.D, self.sigma_min, self.sigma_max, self.calls = None, 0.0, float('inf'), 0

        def round_sigma(self, sigma):
            return torch.as_tensor(sigma)

        def forward(self, x, sigma, class_labels=None):
            if float(sigma[0]) == 80.0:
                return x - 80.0 * x / math.sqrt(1 + 80.0 ** 2)
            self.calls += 1
            return net(x, sigma)

    wrapped = AnalyticAtTheTop()
    for solver in ('euler', 'dpm2m', 'ipndm_v'):
        afs = S.sample(net, latents, solver=solver, num_steps=6, afs=True)
        wrapped.calls = 0
        assert torch.equal(afs, S.sample(wrapped, latents, solver=solver, num_steps=6, afs=False))
        assert wrapped.calls == S.nfe_for_steps(solver, 6, afs=True)

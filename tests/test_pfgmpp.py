"""The PFGM++ kernel (training.pfgmpp) against its exact laws: radius ~ BetaPrime, uniform directions, STF posterior."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from training import pfgmpp

P_MIN = 1e-3  # KS acceptance threshold; every sample below is drawn from a fixed seed


def radius_squared(shape, sigma, D, seed=0):
    generator = torch.Generator().manual_seed(seed)
    noise = pfgmpp.sample_noise(shape, sigma, D, generator=generator, dtype=torch.float64)
    return noise.flatten(1).square().sum(1).numpy()


def beta_prime_law(N, D):
    """The exact law of R²/r² (r = σ√D): BetaPrime(N/2, D/2)."""
    return stats.betaprime(N / 2, D / 2)


@pytest.mark.parametrize('N, D, rows', [
    (3, 1.5, 20000), (10, 1.5, 20000), (3, 128, 20000), (10, 2048, 20000),
    (3072, 1.5, 3000), (3072, 128, 3000), (3072, 2048, 3000),
])
def test_radius_follows_beta_prime(N, D, rows):
    sigma = 0.7
    r_squared = sigma ** 2 * D
    samples = radius_squared((rows, N), sigma, D, seed=N + int(D)) / r_squared
    assert stats.kstest(samples, beta_prime_law(N, D).cdf).pvalue > P_MIN


@pytest.mark.parametrize('N, rows', [(3, 20000), (10, 20000), (3072, 3000)])
def test_gaussian_radius_is_chi_squared(N, rows):
    sigma = 2.5
    samples = radius_squared((rows, N), sigma, None, seed=N) / sigma ** 2
    assert stats.kstest(samples, stats.chi2(N).cdf).pvalue > P_MIN


def test_ks_has_power_against_wrong_laws():
    N, rows = 3072, 3000
    at_128 = radius_squared((rows, N), 1.0, 128, seed=1) / 128
    assert stats.kstest(at_128, beta_prime_law(N, 100).cdf).pvalue < 1e-8  # D=128 is not D=100
    gauss = radius_squared((rows, N), 1.0, None, seed=2)
    assert stats.kstest(gauss / 128, beta_prime_law(N, 128).cdf).pvalue < 1e-8  # D=∞ is not D=128
    heavy = radius_squared((20000, 10), 1.0, 1.5, seed=3) / 1.5
    assert stats.kstest(heavy, beta_prime_law(10, 2.0).cdf).pvalue < 1e-8  # D=1.5 is not D=2


@pytest.mark.parametrize('N, D', [(3, 4.0), (10, 1.5)])
def test_radius_cdf_matches_integrated_density(N, D):
    """Brute force: integrate p_r(R) ∝ R^(N−1)/(R²+r²)^((N+D)/2) numerically in float64."""
    r = 1.3
    density = lambda R: R ** (N - 1) / (R * R + r * r) ** ((N + D) / 2)
    total = integrate.quad(density, 0, math.inf, epsabs=0, epsrel=1e-12, limit=200)[0]
    rows = 20000
    radii = np.sqrt(radius_squared((rows, N), r / math.sqrt(D), D, seed=5))
    dkw_band = math.sqrt(math.log(2 / 1e-4) / (2 * rows))  # holds with probability 1 − 1e-4
    for ratio in (0.5, 1.0, 2.0, 4.0):
        R = ratio * r
        integrated = integrate.quad(density, 0, R, epsabs=0, epsrel=1e-12, limit=200)[0] / total
        assert integrated == pytest.approx(beta_prime_law(N, D).cdf(ratio ** 2), abs=1e-8)
        assert abs(np.mean(radii <= R) - integrated) < dkw_band


@pytest.mark.parametrize('N, D', [(3, 1.5), (10, 128), (10, None)])
def test_directions_are_uniform_and_independent_of_radius(N, D):
    rows = 20000
    noise = pfgmpp.sample_noise((rows, N), 1.0, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    radius = noise.norm(dim=1, keepdim=True)
    unit = (noise / radius).numpy()
    # Any fixed projection of a uniform unit vector: (⟨u, v⟩ + 1)/2 ~ Beta((N−1)/2, (N−1)/2).
    projection_law = stats.beta((N - 1) / 2, (N - 1) / 2).cdf
    direction = np.random.default_rng(0).standard_normal(N)
    direction /= np.linalg.norm(direction)
    large = (radius.squeeze(1) > radius.median()).numpy()
    for projection in (unit[:, 0], unit @ direction):
        assert stats.kstest((projection + 1) / 2, projection_law).pvalue > P_MIN
        # Independence: the same law among the large and the small radii.
        assert stats.kstest((projection[large] + 1) / 2, projection_law).pvalue > P_MIN
        assert stats.kstest((projection[~large] + 1) / 2, projection_law).pvalue > P_MIN
    # Per-coordinate moments: E[u_i] = 0, Var[u_i] = 1/N; E[u_i²] = 1/N, Var[u_i²] = 2(N−1)/(N²(N+2)).
    assert np.abs(unit.mean(0)).max() < 5 * math.sqrt(1 / N / rows)
    assert np.abs((unit ** 2).mean(0) - 1 / N).max() < 5 * math.sqrt(2 * (N - 1) / (N * N * (N + 2)) / rows)


@pytest.mark.parametrize('N, D', [(10, 128.0), (3072, 64.0)])
def test_second_moment_closed_form(N, D):
    """E[R²] = r²N/(D−2); tolerance from Var[BetaPrime(a, b)] = a(a+b−1)/((b−2)(b−1)²)."""
    rows = 20000 if N < 100 else 3000
    sigma = 0.3
    samples = radius_squared((rows, N), sigma, D, seed=11) / (sigma ** 2 * D)
    a, b = N / 2, D / 2
    mean, variance = N / (D - 2), a * (a + b - 1) / ((b - 2) * (b - 1) ** 2)
    assert abs(samples.mean() - mean) < 5 * math.sqrt(variance / rows)


def test_kernel_approaches_gaussian_as_D_grows():
    N = 3072
    grid = stats.chi2(N).ppf(np.linspace(1e-4, 1 - 1e-4, 2001))  # R²/σ² values
    distances = [np.abs(beta_prime_law(N, D).cdf(grid / D) - stats.chi2(N).cdf(grid)).max()
                 for D in (1e2, 1e4, 1e6)]
    assert distances[0] > distances[1] > distances[2] and distances[2] < 2e-3
    samples = radius_squared((3000, N), 1.0, 1e6, seed=13)
    assert stats.kstest(samples, stats.chi2(N).cdf).pvalue > P_MIN


def test_no_clipping_at_cifar_scale_huge_D():
    """t = R²/(R²+r²) ~ Beta(N/2, D/2): at N=3072, D=3.072e6 about 52% of t lie below the reference's 1e-3 clip."""
    N, D = 3072, 3_072_000.0
    ratio = radius_squared((3000, N), 1.0, D, seed=17) / D
    t = ratio / (1 + ratio)
    expected = stats.beta(N / 2, D / 2).cdf(1e-3)
    assert 0.45 < expected < 0.6
    assert abs(np.mean(t < 1e-3) - expected) < 0.04
    assert stats.kstest(t, stats.beta(N / 2, D / 2).cdf).pvalue > P_MIN


def test_per_row_sigma():
    rows, N, D = 20000, 10, 7.0
    sigma = torch.tensor([0.1, 10.0]).repeat(rows // 2)
    R2 = radius_squared((rows, N), sigma, D, seed=19)
    scaled = R2 / (sigma.double().numpy() ** 2 * D)
    assert stats.kstest(scaled, beta_prime_law(N, D).cdf).pvalue > P_MIN
    # Median radii differ by the σ ratio (100), with the law's spread in each group.
    ratio = np.median(np.sqrt(R2[1::2])) / np.median(np.sqrt(R2[0::2]))
    assert 90 < ratio < 110


def test_generator_determinism_and_global_rng_untouched():
    shape, sigma = (4, 3, 8, 8), torch.full((4,), 1.5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = pfgmpp.sample_noise(shape, sigma, 128, generator=torch.Generator().manual_seed(1))
    second = pfgmpp.sample_noise(shape, sigma, 128, generator=torch.Generator().manual_seed(1))
    other = pfgmpp.sample_noise(shape, sigma, 128, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), before)
    # Without a generator the global RNG is used (so the training loop's RNG checkpoint covers it).
    torch.manual_seed(5)
    global_a = pfgmpp.sample_noise(shape, sigma, 128)
    torch.manual_seed(5)
    assert torch.equal(global_a, pfgmpp.sample_noise(shape, sigma, 128))


def test_sigma_forms_dtype_and_device():
    shape = (5, 2, 4, 4)
    draw = lambda sigma, **kw: pfgmpp.sample_noise(shape, sigma, 1.5, generator=torch.Generator().manual_seed(3), **kw)
    as_float = draw(2.0)
    assert torch.equal(as_float, draw(torch.full((5,), 2.0)))
    assert torch.equal(as_float, draw(torch.full((5, 1, 1, 1), 2.0)))
    assert torch.equal(as_float, draw(torch.tensor(2.0)))
    assert as_float.shape == shape and as_float.dtype == torch.float32 and as_float.device.type == 'cpu'
    as_double = draw(2.0, dtype=torch.float64)
    assert as_double.dtype == torch.float64
    torch.testing.assert_close(as_double.float(), as_float)
    assert draw(torch.full((5,), 2.0, dtype=torch.float64)).device == torch.device('cpu')
    with pytest.raises(ValueError, match='sigma must hold 1 or 5'):
        draw(torch.ones(3))
    with pytest.raises(ValueError, match='shape'):
        pfgmpp.sample_noise((5,), 1.0, None)
    gaussian = pfgmpp.sample_noise(shape, 2.0, None, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(gaussian).all() and gaussian.shape == shape


@pytest.mark.parametrize('bad', [0, -1, -0.5, float('nan'), float('inf'), 'abc', True, [128]])
def test_bad_D_is_rejected(bad):
    with pytest.raises(ValueError, match='augmentation dimension D'):
        pfgmpp.check_aug_dim(bad)
    with pytest.raises(ValueError, match='augmentation dimension D'):
        pfgmpp.sample_noise((2, 3), 1.0, bad)


def test_good_D_is_normalised():
    assert pfgmpp.check_aug_dim(None) is None
    assert pfgmpp.check_aug_dim(128) == 128.0 and isinstance(pfgmpp.check_aug_dim(128), float)
    assert pfgmpp.check_aug_dim(0.25) == 0.25
    assert pfgmpp.check_aug_dim(np.float32(2.0)) == 2.0


# ---- STF posterior mean ----

def brute_force_posterior_mean(noisy, references, sigma, D):
    """Direct float64 evaluation of Σ_j p(x|y_j) y_j / Σ_j p(x|y_j) from the normalised kernel densities."""
    noisy, references = np.asarray(noisy, np.float64), np.asarray(references, np.float64)
    N = noisy.shape[1]
    means = []
    for x, s in zip(noisy, np.asarray(sigma, np.float64)):
        densities = []
        for y in references:
            sq = float(np.sum((x - y) ** 2))
            if D is None:
                densities.append(math.exp(-sq / (2 * s * s)) / (2 * math.pi * s * s) ** (N / 2))
            else:
                r2 = s * s * D  # normaliser Γ((N+D)/2) r^D / (π^(N/2) Γ(D/2))
                log_norm = math.lgamma((N + D) / 2) + D / 2 * math.log(r2) - N / 2 * math.log(math.pi) - math.lgamma(D / 2)
                densities.append(math.exp(log_norm) * (sq + r2) ** (-(N + D) / 2))
        densities = np.array(densities)
        means.append(densities @ references / densities.sum())
    return np.array(means)


@pytest.mark.parametrize('D', [None, 1.5, 4.0, 128.0])
def test_posterior_mean_matches_brute_force(D):
    rng = np.random.default_rng(0)
    references = rng.uniform(-1, 1, size=(6, 4))
    sigma = np.array([0.3, 0.8, 1.5])
    noisy = references[:3] + rng.standard_normal((3, 4)) * sigma[:, None]
    expected = brute_force_posterior_mean(noisy, references, sigma, D)
    got = pfgmpp.posterior_mean(torch.tensor(noisy), torch.tensor(references), torch.tensor(sigma), D)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)
    # Chunking (one reference at a time) and float32 inputs give the same answer.
    chunked = pfgmpp.posterior_mean(torch.tensor(noisy), torch.tensor(references), torch.tensor(sigma), D, chunk_elements=1)
    np.testing.assert_allclose(chunked.numpy(), expected, rtol=0, atol=1e-10)
    single = pfgmpp.posterior_mean(torch.tensor(noisy, dtype=torch.float32), torch.tensor(references, dtype=torch.float32),
                                   torch.tensor(sigma, dtype=torch.float32), D)
    np.testing.assert_allclose(single.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('D', [None, 128.0])
def test_posterior_mean_is_stable_where_plain_exponentials_underflow(D):
    """Tiny σ and far references: every exp() underflows, yet log-sum-exp picks the nearest reference."""
    references = torch.tensor([[0.0, 0, 0, 0], [1.0, 1, 1, 1], [-1.0, 0.5, 0, 0]], dtype=torch.float64)
    noisy = torch.tensor([[0.9, 1.05, 1.0, 0.95], [-0.9, 0.4, 0.1, 0.0]], dtype=torch.float64)
    got = pfgmpp.posterior_mean(noisy, references, torch.tensor([1e-3, 1e-3]), D)
    torch.testing.assert_close(got, references[[1, 2]], rtol=0, atol=1e-12)


def test_posterior_weights_approach_gaussian_for_large_D():
    rng = np.random.default_rng(1)
    references = torch.tensor(rng.uniform(-1, 1, size=(8, 4)))
    noisy = references[:4] + 0.5 * torch.tensor(rng.standard_normal((4, 4)))
    sigma = torch.full((4,), 0.5, dtype=torch.float64)
    gaussian = pfgmpp.posterior_mean(noisy, references, sigma, None)
    errors = [(pfgmpp.posterior_mean(noisy, references, sigma, D) - gaussian).abs().max().item() for D in (1e2, 1e4, 1e6)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


@pytest.mark.parametrize('D', [16.0, None])
def test_norm_spread_matches_the_sampled_kernel(D):
    # Catches a wrong moment formula (e.g. D - 2 for D - 4 would give 0.417 instead of 0.451 at N=64, D=16).
    N, rows = 64, 200_000
    generator = torch.Generator().manual_seed(0)
    noise = pfgmpp.sample_noise([rows, N], sigma=torch.full([rows], 2.0), D=D, generator=generator,
                                dtype=torch.float64)
    squared = noise.square().sum(dim=1)
    measured = (squared.std() / squared.mean()).item()
    assert measured == pytest.approx(pfgmpp.norm_spread(N, D), rel=0.03)


def test_norm_spread_closed_forms():
    # The paper's CIFAR-10 table (paper-facts §1.3): 0.184, 0.130, 0.040 for D = 64, 128, 2048 at N = 3072.
    assert [round(pfgmpp.norm_spread(3072, D), 3) for D in (64, 128, 2048)] == [0.184, 0.130, 0.040]
    assert pfgmpp.norm_spread(3072, None) == pytest.approx(math.sqrt(2 / 3072))
    assert pfgmpp.norm_spread(256, 4) == math.inf

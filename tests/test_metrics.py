"""KID and precision/recall (training/metrics.py) against brute-force float64 loops and known answers."""

import itertools

import numpy as np
import pytest

from training import fid_stats, metrics


def brute_force_mmd2(x, y):
    """Unbiased MMD² with (x·y/d + 1)³ by explicit float64 loops over pairs."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return within - 2 * across


def test_kid_matches_brute_force_double_loop():
    # Catches a wrong kernel (missing /d or power), a biased estimator (diagonal kept) or a wrong subset draw.
    rng = np.random.RandomState(0)
    gen, ref = rng.randn(7, 5), rng.randn(11, 5) * 1.3 + 0.4
    result = metrics.kid(gen, ref, num_subsets=4, seed=3)
    expected = [brute_force_mmd2(gen[g], ref[r]) for g, r in metrics.kid_subsets(7, 11, 1000, 4, seed=3)]
    assert result.subset_size == 7
    assert result.mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert result.std == pytest.approx(np.std(expected), rel=1e-9)
    # The documented draw: RandomState(seed), per subset m generated then m reference indices without replacement.
    draw = np.random.RandomState(3)
    first_gen, first_ref = draw.choice(7, 7, replace=False), draw.choice(11, 7, replace=False)
    got_gen, got_ref = metrics.kid_subsets(7, 11, 1000, 4, seed=3)[0]
    np.testing.assert_array_equal(got_gen, first_gen)
    np.testing.assert_array_equal(got_ref, first_ref)
    # Equal sizes: every subset is a permutation of both sets, so every subset gives the same value.
    equal = metrics.kid(gen, ref[:7], num_subsets=3)
    assert equal.mean == pytest.approx(brute_force_mmd2(gen, ref[:7]), rel=1e-12) and equal.std < 1e-12


def test_bootstrap_without_repeats_is_the_plain_estimator():
    # Catches a weighted estimator that differs from mmd2_unbiased when every weight is 1 (the identity bootstrap).
    import torch
    rng = np.random.RandomState(1)
    x, y = torch.tensor(rng.randn(6, 4)), torch.tensor(rng.randn(6, 4) + 0.5)
    ones = torch.ones(2, 6, dtype=torch.float64)
    np.testing.assert_allclose(metrics._weighted_mmd2(x, y, ones).numpy(), metrics.mmd2_unbiased(x, y), rtol=1e-12)
    # Weight 2 on row 0 is row 0 twice, with its self-pair left out: the brute force over the repeated set, minus
    # the pair (copy, copy) on both orders.
    w = torch.tensor([[2.0, 1, 1, 1, 1, 0]], dtype=torch.float64)
    x_rep = np.concatenate([x.numpy()[:1], x.numpy()[:5]])
    k = lambda a, b: (float(np.dot(a, b)) / 4 + 1) ** 3
    pairs = [(i, j) for i, j in itertools.permutations(range(6), 2) if {i, j} != {0, 1}]
    within_x = sum(k(x_rep[i], x_rep[j]) for i, j in pairs) / len(pairs)
    within_y = sum(k(y[i].numpy(), y[j].numpy()) for i, j in itertools.permutations(range(6), 2)) / 30
    cross = sum(k(x_rep[i], y[j].numpy()) for i in range(6) for j in range(6)) / 36
    assert float(metrics._weighted_mmd2(x, y, w)[0]) == pytest.approx(within_x + within_y - 2 * cross, rel=1e-12)


def test_kid_is_unbiased_where_fid_is_not():
    # Two sets from one Gaussian: KID's average over replicates is 0 within its standard error; FID is far above 0.
    # Catches the biased (V-statistic) estimator, whose mean here is clearly positive.
    rng = np.random.RandomState(2)
    kids, fids = [], []
    for _ in range(20):
        gen, ref = rng.randn(60, 16), rng.randn(60, 16)
        kids.append(metrics.kid(gen, ref, num_subsets=1, num_bootstraps=2).mean)
        fids.append(fid_stats.calculate_fid_from_inception_stats(gen.mean(0), np.cov(gen, rowvar=False),
                                                                 ref.mean(0), np.cov(ref, rowvar=False)))
    kid_error = np.std(kids) / np.sqrt(len(kids))
    assert abs(np.mean(kids)) < 3 * kid_error
    assert np.mean(fids) > 10 * np.std(fids) / np.sqrt(len(fids))


def test_kid_grows_with_a_known_shift():
    # Catches a sign error or a kernel that ignores the mean: KID rises with the shift of one set.
    rng = np.random.RandomState(3)
    ref, base = rng.randn(200, 8), rng.randn(200, 8)
    values = [metrics.kid(base + shift, ref, num_subsets=5, num_bootstraps=2).mean for shift in (0, 0.3, 0.6, 1.2)]
    assert values == sorted(values) and values[-1] > 10 * abs(values[0])


def test_bootstrap_spread_matches_the_spread_over_independent_sets():
    # The spread over generated images of one set ≈ the std of KID over 40 independent generated sets against the
    # same reference. Catches a spread that only sees the reference subsets (0 here: all subsets equal) or one that
    # is off by the sqrt(n) of a standard error.
    rng = np.random.RandomState(4)
    ref = rng.randn(300, 8)
    draw = lambda: rng.randn(150, 8) * 1.1 + 0.15
    independent = np.std([metrics.kid(draw(), ref, num_subsets=1, num_bootstraps=2).mean for _ in range(40)])
    spreads = [metrics.kid(draw(), ref, num_subsets=1, num_bootstraps=200, seed=s).spread for s in range(3)]
    assert 0.5 < np.mean(spreads) / independent < 2, (spreads, independent)


def test_paired_change_spread_matches_the_spread_over_independent_seed_sets():
    # One model under two settings: row i of both sets comes from the same seed (after = before + small noise).
    # The change's std over 40 independent seed sets ≈ the paired bootstrap of one pair, and far below the two
    # spreads in quadrature. Catches unpaired resampling (which reproduces the quadrature) and a change that is not
    # KID(after) − KID(before).
    rng = np.random.RandomState(8)
    ref = rng.randn(300, 8)

    def pair():
        before = rng.randn(150, 8) * 1.1 + 0.15
        return before, before + rng.randn(150, 8) * 0.1 + 0.05
    changes = []
    for _ in range(40):
        before, after = pair()
        changes.append(metrics.kid(after, ref, num_subsets=1, num_bootstraps=2).mean -
                       metrics.kid(before, ref, num_subsets=1, num_bootstraps=2).mean)
    before, after = pair()
    change, spread = metrics.kid_paired_change(before, after, ref, num_subsets=1, num_bootstraps=200)
    separate = [metrics.kid(x, ref, num_subsets=1, num_bootstraps=200) for x in (before, after)]
    assert change == pytest.approx(separate[1].mean - separate[0].mean, rel=1e-12)
    assert 0.5 < spread / np.std(changes) < 2, (spread, np.std(changes))
    assert spread < 0.5 * np.hypot(separate[0].spread, separate[1].spread)
    with pytest.raises(ValueError, match='Paired sets differ'):
        metrics.kid_paired_change(before, after[:-1], ref)


def test_kid_input_errors():
    with pytest.raises(ValueError, match='Feature sizes differ'):
        metrics.kid(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match='at least 2 generated'):
        metrics.kid(np.zeros((1, 3)), np.zeros((4, 3)))

# ---------------------------------------------------------------------------------------------- precision / recall


def brute_force_precision_recall(gen, ref, k):
    def radii(points):
        return [sorted(np.sum((points[i] - points[j]) ** 2) for j in range(len(points)) if j != i)[k - 1]
                for i in range(len(points))]

    def share(samples, manifold):
        r = radii(manifold)
        return np.mean([any(np.sum((s - m) ** 2) <= r[j] for j, m in enumerate(manifold)) for s in samples])
    return share(gen, ref), share(ref, gen)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_precision_recall_matches_brute_force_knn(seed):
    # Catches the radius taken at the wrong neighbour (itself, or k+1) or the sets swapped.
    rng = np.random.RandomState(seed)
    gen, ref = rng.randn(23, 4) + 1.5, rng.randn(31, 4)
    result = metrics.precision_recall(gen, ref)
    expected = brute_force_precision_recall(gen, ref, 3)
    assert (result.precision, result.recall) == pytest.approx(expected, abs=1e-12)
    assert 0 < result.precision < 1 and 0 < result.recall < 1     # a case where both sets' balls matter


def test_subset_has_precision_one_and_collapse_has_recall_near_zero():
    rng = np.random.RandomState(5)
    ref = rng.randn(50, 6)
    assert metrics.precision_recall(ref[::3], ref).precision == 1.0
    collapsed = np.repeat(ref[:1], 50, axis=0) + rng.randn(50, 6) * 1e-3
    result = metrics.precision_recall(collapsed, ref)
    assert result.recall <= 2 / 50 and result.precision == 1.0


def test_precision_is_about_the_generated_samples():
    # Generated: half on the reference, half far away -> precision 1/2; every reference sample is covered -> recall 1.
    # Swapping the arguments swaps the numbers; catches the two shares exchanged.
    rng = np.random.RandomState(6)
    ref = rng.randn(40, 3)
    gen = np.concatenate([ref + rng.randn(40, 3) * 1e-3, rng.randn(40, 3) + 100])
    result = metrics.precision_recall(gen, ref)
    assert (result.precision, result.recall) == (0.5, 1.0)
    swapped = metrics.precision_recall(ref, gen)
    assert (swapped.precision, swapped.recall) == (1.0, 0.5)


def test_duplicates_count_as_neighbours():
    # Four copies of a point: its 3rd nearest other sample is a copy, so its ball has radius 0 (brute force agrees);
    # a generated sample on that point is inside the ball (≤, not <). Catches copies skipped as neighbours, or <.
    rng = np.random.RandomState(7)
    ref = np.concatenate([np.repeat(rng.randn(1, 3) * 10, 4, axis=0), rng.randn(10, 3)])
    gen = np.concatenate([ref[:1], rng.randn(11, 3)])
    result = metrics.precision_recall(gen, ref)
    assert (result.precision, result.recall) == pytest.approx(brute_force_precision_recall(gen, ref, 3), abs=1e-12)
    assert metrics.precision_recall(gen[:1].repeat(4, 0), ref).precision == 1.0
    radii = metrics.knn_radii(metrics._as_float64(ref, 'r', 'cpu'), 3)
    assert radii[:4].abs().max() < 1e-12 and radii[4:].min() > 0


def test_too_few_samples_is_one_clear_error():
    with pytest.raises(ValueError, match=r'k=3 needs at least 4 generated and 4 reference images, got 3 and 10'):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))

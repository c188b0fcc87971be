"""Metrics on feature sets beyond the Fréchet distance: KID with its spreads, and improved precision and recall.

Both take two float feature matrices, generated [n_gen, d] and reference [n_ref, d], and compute in float64.

- KID (Bińkowski et al. 2018, as torch-fidelity computes it): the unbiased estimator of MMD² with the cubic
  polynomial kernel k(x, y) = (x·y / d + 1)³, averaged over `num_subsets` random subsets of
  m = min(n_gen, n_ref, subset_size) generated and m reference features. `std` is the spread over those subsets;
  `spread` is the bootstrap standard deviation over the generated features (the sample noise that a comparison of
  two models has to beat; with n_gen ≤ m every subset holds all generated images, so `std` cannot show it).
- Precision and recall (Kynkäänniemi et al. 2019) with k nearest neighbours: a sample's ball reaches its k-th
  nearest neighbour in its own set (squared Euclidean distance; the sample itself excluded, duplicates count);
  precision is the share of generated samples inside some reference ball, recall the share of reference samples
  inside some generated ball.
"""

import dataclasses

import numpy as np
import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_BOOTSTRAPS = 100
PR_NEIGHBOURS = 3

# ---------------------------------------------------------------------------------------------- KID


@dataclasses.dataclass(frozen=True)
class KIDResult:
    mean: float            # KID: the mean of the subsets' unbiased MMD²
    std: float             # standard deviation over the reference (and generated) subsets
    spread: float          # bootstrap standard deviation over the generated features
    subset_size: int
    num_subsets: int


def _as_float64(features, name, device):
    features = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if features.ndim != 2:
        raise ValueError(f'{name} features must be a [N, D] matrix, got shape {list(features.shape)}')
    return features.to(device=device, dtype=torch.float64)


def polynomial_kernel(x, y):
    """(x·y / d + 1)³ for every pair of rows."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y):
    """Unbiased MMD² of two equal-size float64 sets: mean k over distinct pairs within each set, minus twice the
    mean k across the sets."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kid_subsets(n_gen, n_ref, subset_size, num_subsets, seed):
    """[(generated indices, reference indices)] per subset: np.random.RandomState(seed) draws, for each subset in
    turn, m generated then m reference indices without replacement."""
    rng = np.random.RandomState(seed)
    m = min(n_gen, n_ref, subset_size)
    return [(rng.choice(n_gen, m, replace=False), rng.choice(n_ref, m, replace=False)) for _ in range(num_subsets)]


def kid(gen_features, ref_features, num_subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
        num_bootstraps=KID_BOOTSTRAPS, seed=0, device='cpu'):
    """KIDResult of generated against reference features (see the module docstring).

    The bootstrap draws the generated features with replacement (one multinomial weight per image, the same for
    every subset) and recomputes the subsets' estimator with those weights, counting only pairs of distinct images
    within the generated set, so that repeated images do not add the kernel's diagonal.
    """
    x_all, y_all = _check_pair(gen_features, ref_features, device)
    weights = bootstrap_weights(x_all.shape[0], num_bootstraps, seed, device)
    subsets = kid_subsets(x_all.shape[0], y_all.shape[0], subset_size, num_subsets, seed)
    values, boot_values = _subset_and_bootstrap_kids(x_all, y_all, subsets, weights)
    return KIDResult(mean=float(values.mean()), std=float(values.std()), spread=float(boot_values.std()),
                     subset_size=len(subsets[0][0]), num_subsets=num_subsets)


def kid_paired_change(gen_before, gen_after, ref_features, num_subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                      num_bootstraps=KID_BOOTSTRAPS, seed=0, device='cpu'):
    """(KID(after) − KID(before), its bootstrap standard deviation) for two generated sets whose row i comes from
    the same seed (one model under two settings). Both KIDs use the subsets kid() draws; the bootstrap resamples the
    seeds, the same ones in both sets, so the correlation the shared seeds create is kept: the noise of the change,
    which the two sets' spreads in quadrature would overstate."""
    before, ref = _check_pair(gen_before, ref_features, device)
    after, _ = _check_pair(gen_after, ref_features, device)
    if before.shape != after.shape:
        raise ValueError(f'Paired sets differ in shape: {list(before.shape)} and {list(after.shape)}')
    weights = bootstrap_weights(before.shape[0], num_bootstraps, seed, device)
    subsets = kid_subsets(before.shape[0], ref.shape[0], subset_size, num_subsets, seed)
    values_before, boot_before = _subset_and_bootstrap_kids(before, ref, subsets, weights)
    values_after, boot_after = _subset_and_bootstrap_kids(after, ref, subsets, weights)
    return float(values_after.mean() - values_before.mean()), float((boot_after - boot_before).std())


def _check_pair(gen_features, ref_features, device):
    x_all = _as_float64(gen_features, 'generated', device)
    y_all = _as_float64(ref_features, 'reference', device)
    if x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f'Feature sizes differ: generated {x_all.shape[1]}, reference {y_all.shape[1]}')
    if min(x_all.shape[0], y_all.shape[0]) < 2:
        raise ValueError(f'KID needs at least 2 generated and 2 reference images, got {x_all.shape[0]} and '
                         f'{y_all.shape[0]}')
    return x_all, y_all


def bootstrap_weights(n, num_bootstraps, seed, device):
    """[B, n] multinomial counts: B resamples of n items with replacement, drawn by RandomState(seed + 1)."""
    rng = np.random.RandomState(seed + 1)
    return torch.as_tensor(rng.multinomial(n, np.full(n, 1 / n), size=num_bootstraps), dtype=torch.float64,
                           device=device)


def _subset_and_bootstrap_kids(x_all, y_all, subsets, weights):
    """(per-subset unbiased MMD² [S], bootstrap KIDs [B]: each the mean over subsets of the weighted estimator)."""
    values, boot_values = [], torch.zeros(weights.shape[0], dtype=torch.float64, device=x_all.device)
    for gen_index, ref_index in subsets:
        gen_index = torch.as_tensor(gen_index, device=x_all.device)
        x, y = x_all[gen_index], y_all[torch.as_tensor(ref_index, device=x_all.device)]
        values.append(mmd2_unbiased(x, y))
        boot_values += _weighted_mmd2(x, y, weights[:, gen_index])
    return np.array(values), (boot_values / len(subsets)).cpu().numpy()


def _weighted_mmd2(x, y, w):
    """[B] unbiased MMD² with integer weights w [B, m] on the rows of x: pairs (i, j), i ≠ j, weighted w_i·w_j."""
    m = y.shape[0]
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    cross_row_sums = polynomial_kernel(x, y).sum(1)                                     # [m]
    total, squares = w.sum(1), (w ** 2).sum(1)
    pairs = (total ** 2 - squares).clamp(min=1)
    within_x = (((w @ k_xx) * w).sum(1) - (w ** 2) @ k_xx.diagonal()) / pairs
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    cross = (w @ cross_row_sums) / (total.clamp(min=1) * m)
    return within_x + within_y - 2 * cross

# ---------------------------------------------------------------------------------------------- precision / recall


@dataclasses.dataclass(frozen=True)
class PrecisionRecall:
    precision: float       # share of generated samples inside the reference manifold
    recall: float          # share of reference samples inside the generated manifold
    k: int


def _squared_distances(a, b):
    """[len(a), len(b)] squared Euclidean distances, float64, clamped at 0 against round-off."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp(min=0)


def knn_radii(features, k, batch=1024):
    """Squared distance from each row to its k-th nearest other row (the row itself excluded by index)."""
    radii = []
    for start in range(0, features.shape[0], batch):
        block = _squared_distances(features[start:start + batch], features)
        rows = torch.arange(block.shape[0], device=block.device)
        block[rows, rows + start] = -1      # itself: always the smallest, so the (k+1)-th smallest is the k-th other
        radii.append(block.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def share_inside(samples, manifold, radii, batch=1024):
    """Share of `samples` within the ball (distance² ≤ radius²) of at least one row of `manifold`."""
    inside = [(_squared_distances(samples[start:start + batch], manifold) <= radii[None, :]).any(1)
              for start in range(0, samples.shape[0], batch)]
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(gen_features, ref_features, k=PR_NEIGHBOURS, device='cpu'):
    """PrecisionRecall of generated against reference features (order matters: precision is about the generated)."""
    gen = _as_float64(gen_features, 'generated', device)
    ref = _as_float64(ref_features, 'reference', device)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f'Feature sizes differ: generated {gen.shape[1]}, reference {ref.shape[1]}')
    if min(gen.shape[0], ref.shape[0]) < k + 1:
        raise ValueError(f'Precision/recall with k={k} needs at least {k + 1} generated and {k + 1} reference '
                         f'images, got {gen.shape[0]} and {ref.shape[0]}')
    precision = share_inside(gen, ref, knn_radii(ref, k))
    recall = share_inside(ref, gen, knn_radii(gen, k))
    return PrecisionRecall(precision=precision, recall=recall, k=k)

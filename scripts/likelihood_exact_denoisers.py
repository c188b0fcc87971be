"""The measurement behind docs/likelihood.md's tables for exact denoisers: error of the ODE log-likelihood and
NFE against the tolerance, in σ and in ln σ, for the Gaussian and the point-set cases of tests/test_likelihood.py
(same data, points and evaluation points), plus the Student-t prior's error in the point-set case.

    python scripts/likelihood_exact_denoisers.py      # ~1 minute on one CPU core
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import torch                                                   # noqa: E402

from test_likelihood import GaussianDenoiser, PointSetDenoiser  # noqa: E402
from training import likelihood                                # noqa: E402
from training.pfgmpp import kernel_log_density                 # noqa: E402


def gaussian_case():
    """Data N(0.3, 0.25 I) in N = 16 (3 points), σ ∈ [0.002, 80]: max error of log p against the closed form."""
    data = GaussianDenoiser(torch.full([16], 0.3), 0.25 * torch.eye(16))
    x = 0.3 + 0.5 * torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = data.log_density(x, 0.002)
    print('Gaussian, N = 16, sigma in [0.002, 80]')
    for tol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        for variable in likelihood.VARIABLES:
            result = likelihood.ode_log_likelihood(data, x, 0.002, 80.0, None, rtol=tol, atol=tol, variable=variable,
                                                   prior_log_density=lambda x_T: data.log_density(x_T, 80.0))
            error = float((result['log_p'] - exact).abs().max())
            print(f'  tol {tol:g}  {variable:9s}  NFE {result["nfe"]:4d}  max error {error:.2e} nats')


def point_set_case():
    """Data uniform over 3 points in N = 2, σ ∈ [0.05, 40]: error against the directly summed perturbed density,
    and the Student-t prior's error at the ODE's end points."""
    points = torch.tensor([[0.5, -0.3], [-0.6, 0.2], [0.1, 0.7]], dtype=torch.float64)
    x = points[[0, 2]] + 0.1 * torch.randn(2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for D in (1.0, 16.0, None):
        data = PointSetDenoiser(points, D)
        exact = data.log_density(x, 0.05)
        for tol in (1e-5, 1e-7):
            for variable in likelihood.VARIABLES:
                result = likelihood.ode_log_likelihood(data, x, 0.05, 40.0, D, rtol=tol, atol=tol, variable=variable,
                                                       prior_log_density=lambda x_T: data.log_density(x_T, 40.0))
                error = float((result['log_p'] - exact).abs().max())
                student = float((kernel_log_density(result['x_T'], 40.0, D) - result['prior_log_p']).abs().max())
                print(f'point set D={D}  tol {tol:g}  {variable:9s}  NFE {result["nfe"]:4d}  max error {error:.2e} '
                      f'nats  Student-t prior error {student:.2e} nats')


def main():
    torch.set_num_threads(1)
    gaussian_case()
    point_set_case()


if __name__ == '__main__':
    main()

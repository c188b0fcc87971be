"""training.schedules: σ_VP(t), its derivative and inverse against closed forms in float64, for Python numbers
and tensors alike."""

import math

import pytest
import torch

from training.schedules import vp_sigma, vp_sigma_deriv, vp_sigma_inv


@pytest.mark.parametrize('beta_d, beta_min', [(19.9, 0.1), (13.7, 0.37)])
def test_vp_schedule_closed_forms(beta_d, beta_min):
    def sigma(t):  # expm1: an independent route, accurate at small t
        return math.sqrt(math.expm1(0.5 * beta_d * t * t + beta_min * t))

    for t in (1e-5, 1e-3, 0.2, 0.5, 1.0):
        assert vp_sigma(t, beta_d, beta_min) == pytest.approx(sigma(t), rel=1e-9)
        assert vp_sigma_inv(sigma(t), beta_d, beta_min) == pytest.approx(t, rel=1e-9)
        h = 1e-5 * t
        central = (sigma(t + h) - sigma(t - h)) / (2 * h)
        assert vp_sigma_deriv(t, beta_d, beta_min) == pytest.approx(central, rel=1e-6)
    assert vp_sigma(1.0, 19.9, 0.1) == pytest.approx(math.sqrt(math.exp(10.05) - 1), rel=1e-12)


def test_tensors_and_numbers_agree():
    t = torch.tensor([1e-5, 0.01, 0.3, 1.0], dtype=torch.float64)
    sigma = vp_sigma(t, 19.9, 0.1)
    assert sigma.dtype == torch.float64
    assert sigma.tolist() == [vp_sigma(x, 19.9, 0.1) for x in t.tolist()]
    torch.testing.assert_close(vp_sigma_inv(sigma, 19.9, 0.1), t, rtol=1e-9, atol=0)
    assert vp_sigma(t.float(), 19.9, 0.1).dtype == torch.float32  # the networks' arithmetic stays float32

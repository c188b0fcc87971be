"""Likelihood through the probability-flow ODE: the prior density, the ODE against closed forms and direct
integration, the trace estimator, and likelihood.py end to end on a tiny checkpoint."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from click.testing import CliRunner

import likelihood as likelihood_script
from data_helpers import make_image_zip
from test_generate import tiny_config, write_checkpoint
from training import likelihood
from training.checkpoint import load_network, state_file_name
from training.dataset import ImageFolderDataset
from training.pfgmpp import kernel_log_density, posterior_mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GaussianDenoiser:
    """The exact denoiser E[y | x] of data N(μ, Σ) under Gaussian noise σ²I: μ + Σ(Σ + σ²I)⁻¹(x − μ)."""

    def __init__(self, mean, cov):
        self.mean, self.cov = mean.to(torch.float64), cov.to(torch.float64)

    def gain(self, sigma):
        return self.cov @ torch.linalg.inv(self.cov + sigma ** 2 * torch.eye(len(self.cov), dtype=torch.float64))

    def __call__(self, x, sigma, class_labels=None):
        flat = x.flatten(1) - self.mean
        return (self.mean + flat @ self.gain(float(sigma[0])).T).reshape(x.shape)

    def log_density(self, x, sigma):
        cov = self.cov + sigma ** 2 * torch.eye(len(self.cov), dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(self.mean, covariance_matrix=cov)
        return dist.log_prob(x.flatten(1).to(torch.float64))


class PointSetDenoiser:
    """The exact PFGM++ denoiser of data uniform over `points` ([R, N]) under the kernel with D."""

    def __init__(self, points, D):
        self.points, self.D = points, D

    def __call__(self, x, sigma, class_labels=None):
        return posterior_mean(x.flatten(1), self.points, sigma, self.D).reshape(x.shape)

    def log_density(self, x, sigma):
        """The perturbed density p_σ(x) = mean_j p_r(x | y_j), by direct summation over the points."""
        logs = torch.stack([kernel_log_density(x - y, sigma, self.D) for y in self.points], 1)
        return torch.logsumexp(logs, 1) - math.log(len(self.points))


# ----------------------------------------------------------------------------------------------------------------
# The prior density.

@pytest.mark.parametrize('N, D', [(1, 1.0), (2, 3.5), (5, 128.0), (16, 2048.0)])
def test_student_t_density_matches_scipy(N, D):
    """Catches a wrong normalising constant, r = σ instead of σ√D, or the wrong exponent (N+D)/2."""
    x = torch.from_numpy(np.random.RandomState(N).standard_t(D, size=(6, N)) * 3.0)
    sigma = 3.0
    ours = kernel_log_density(x, sigma, D).numpy()
    scipys = scipy.stats.multivariate_t(np.zeros(N), sigma ** 2 * np.eye(N), df=D).logpdf(x.numpy())
    np.testing.assert_allclose(ours, scipys, rtol=0, atol=1e-10)


@pytest.mark.parametrize('D', [1.0, 2.5, 40.0])
def test_student_t_density_integrates_to_one(D):
    """Integrates over the plane in polar coordinates (N = 2) and over the line (N = 1), independently of scipy's t:
    catches a constant that is right for one N only."""
    sigma = 0.7

    def radial(R):
        return 2 * math.pi * R * math.exp(float(kernel_log_density(torch.tensor([[R, 0.0]]), sigma, D)))

    def line(v):
        return math.exp(float(kernel_log_density(torch.tensor([[v]]), sigma, D)))

    plane = scipy.integrate.quad(radial, 0, math.inf, limit=200)[0]
    axis = scipy.integrate.quad(line, -math.inf, math.inf, limit=200)[0]
    assert abs(plane - 1) < 1e-6 and abs(axis - 1) < 1e-6, (plane, axis)


def test_student_t_tends_to_the_gaussian():
    """The error to N(0, σ²I) shrinks like 1/D: catches a kernel whose large-D limit has the wrong width."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    gauss = kernel_log_density(x, 2.0, None)
    expected = scipy.stats.multivariate_normal(np.zeros(16), 4 * np.eye(16)).logpdf(x.numpy())
    np.testing.assert_allclose(gauss.numpy(), expected, atol=1e-10)
    errors = [float((kernel_log_density(x, 2.0, D) - gauss).abs().max()) for D in (1e2, 1e3, 1e4, 1e5)]
    assert errors[0] > 0.1 and all(b < a / 5 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-3, errors


# ----------------------------------------------------------------------------------------------------------------
# The ODE against closed forms.

@pytest.mark.parametrize('variable', likelihood.VARIABLES)
def test_gaussian_data_ode_likelihood_is_the_closed_form(variable):
    """D = ∞, data N(μ, s²I), its exact denoiser and exact prior N(μ, (s² + σ_max²)I): log p_σmin is
    N(μ, (s² + σ_min²)I). At rtol = atol = 1e-6 the measured error is ≤ 2e-4 nats. Catches a sign error in the
    divergence, a missing N term, a wrong 1/σ factor in either variable, or an ODE integrated the wrong way."""
    N = 16
    data = GaussianDenoiser(torch.full([N], 0.3), 0.25 * torch.eye(N))
    x = 0.3 + 0.5 * torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma_min, sigma_max = 0.002, 80.0
    result = likelihood.ode_log_likelihood(data, x, sigma_min, sigma_max, None, rtol=1e-6, atol=1e-6,
                                           variable=variable,
                                           prior_log_density=lambda x_T: data.log_density(x_T, sigma_max))
    error = (result['log_p'] - data.log_density(x, sigma_min)).abs().max()
    assert error < 1e-3, float(error)
    assert result['nfe'] > 10


@pytest.mark.parametrize('D', [1.0, 16.0, None])
def test_point_set_ode_likelihood_is_the_perturbed_density(D):
    """Finite D (and ∞): data uniform over 3 points in N = 2, the exact PFGM++ denoiser and the exact perturbed
    density at σ_max as prior. The ODE's log p_σmin equals the perturbed density at σ_min by direct summation
    (measured error ≤ 5e-6 nats at tolerance 1e-7). Catches a prior or a flow that holds for the Gaussian only."""
    points = torch.tensor([[0.5, -0.3], [-0.6, 0.2], [0.1, 0.7]], dtype=torch.float64)
    data = PointSetDenoiser(points, D)
    x = points[[0, 2]] + 0.1 * torch.randn(2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma_min, sigma_max = 0.05, 40.0
    result = likelihood.ode_log_likelihood(data, x, sigma_min, sigma_max, D, rtol=1e-7, atol=1e-7,
                                           prior_log_density=lambda x_T: data.log_density(x_T, sigma_max))
    error = (result['log_p'] - data.log_density(x, sigma_min)).abs().max()
    assert error < 1e-4, float(error)
    # The Student-t prior (the data's spread neglected next to σ_max) differs from the exact one by 0.5% of a nat.
    student = kernel_log_density(result['x_T'], sigma_max, D)
    assert 1e-4 < float((student - result['prior_log_p']).abs().max()) < 0.02


def test_exact_trace_is_the_jacobian_trace():
    """Catches the exact trace summing the wrong entries (e.g. a row of the Jacobian instead of its diagonal) or
    losing dimensions when the basis is split into chunks (3 + 1 of the 4 here)."""
    cov = torch.tensor([[1.0, 0.6, 0.0, 0.2], [0.6, 2.0, 0.3, 0.0], [0.0, 0.3, 0.5, 0.1], [0.2, 0.0, 0.1, 1.5]])
    data = GaussianDenoiser(torch.zeros(4), cov)
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = float(torch.trace(data.gain(0.8)))
    for max_rows in (512, 9):
        denoised, trace = likelihood.divergence(data, x, 0.8, max_rows=max_rows)
        np.testing.assert_allclose(trace.numpy(), expected, rtol=1e-12)
        np.testing.assert_allclose(denoised.numpy(), x.numpy() @ data.gain(0.8).numpy().T, rtol=1e-12)


def test_hutchinson_is_unbiased_around_the_exact_trace():
    """Rademacher εᵀJε over many probes averages to tr J within 4 standard errors, for a Jacobian with off-diagonal
    entries (so a single probe is not exact); the same holds for the whole ODE log-likelihood. Catches probes that
    are not ±1, a vjp taken against the wrong vector, or a trace estimate scaled wrongly."""
    cov = torch.tensor([[1.0, 0.6, 0.0, 0.2], [0.6, 2.0, 0.3, 0.0], [0.0, 0.3, 0.5, 0.1], [0.2, 0.0, 0.1, 1.5]])
    data = GaussianDenoiser(torch.zeros(4), cov)
    count = 4000
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64).expand(count, 4)
    probes = likelihood.rademacher((count, 4), generator=torch.Generator().manual_seed(3))
    assert set(probes.unique().tolist()) == {-1.0, 1.0}
    _, estimates = likelihood.divergence(data, x, 0.8, probes=probes)
    exact = float(torch.trace(data.gain(0.8)))
    error = estimates.std().item() / math.sqrt(count)
    assert estimates.std() > 0.1 and abs(estimates.mean().item() - exact) < 4 * error

    count = 300
    x, probes = x[:count], probes[:count]
    kwargs = dict(sigma_min=0.01, sigma_max=20.0, D=None, rtol=1e-6, atol=1e-6,
                  prior_log_density=lambda x_T: data.log_density(x_T, 20.0))
    hutchinson = likelihood.ode_log_likelihood(data, x, probes=probes, **kwargs)['log_p']
    exact = likelihood.ode_log_likelihood(data, x[:1], **kwargs)['log_p']
    assert abs(float(exact[0] - data.log_density(x[:1], 0.01)[0])) < 1e-3
    assert hutchinson.std() > 0.05
    assert abs(float(hutchinson.mean() - exact[0])) < 4 * float(hutchinson.std()) / math.sqrt(count)


def test_bits_per_dim_and_dequantization():
    """The uniform density on [−1, 1]^N is 8 bits/dim for 8-bit data (one bin per level, 256 levels), and
    dequantized values fill [−1, 1). Catches the wrong +7 offset or the wrong scale of a uint8 bin."""
    N = 12
    assert likelihood.bits_per_dim(torch.tensor([-N * math.log(2)]), N).item() == pytest.approx(8.0)
    assert likelihood.bits_per_dim(torch.tensor([-N * math.log(2)]), N, bits=5).item() == pytest.approx(5.0)
    images = torch.tensor([0, 0, 255, 128], dtype=torch.uint8)
    x = likelihood.dequantize(images, torch.tensor([0.0, 0.5, 0.999, 0.0]))
    np.testing.assert_allclose(x.numpy(), [-1.0, -1 + 0.5 / 128, 1 - 0.001 / 128, 0.0])


def test_summary_mean_and_standard_error():
    """Catches a population (ddof=0) standard deviation or a missing √n in the standard error."""
    rows = [dict(bits_per_dim=v, nfe=n) for v, n in [(1.0, 10), (2.0, 20), (4.0, 30)]]
    summary = likelihood.summarize(rows)
    assert summary['bits_per_dim'] == pytest.approx(7 / 3)
    assert summary['standard_error'] == pytest.approx(np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    assert summary['mean_nfe'] == 20 and summary['num_images'] == 3


# ----------------------------------------------------------------------------------------------------------------
# likelihood.py end to end.

FAST = ['--rtol=1e-3', '--atol=1e-3', '--sigma_min=0.02', '--sigma_max=20']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    path = tmp_path_factory.mktemp('likelihood')
    run = path / 'run'
    run.mkdir()
    write_checkpoint(str(run / state_file_name(0)), tiny_config(D=8.0), seed=0)
    write_checkpoint(str(run / state_file_name(2)), tiny_config(D=8.0), seed=1)
    edm = write_checkpoint(str(path / 'edm.pt'), tiny_config(D=None), seed=2)
    small = write_checkpoint(str(path / 'edm4.pt'), tiny_config(D=None, resolution=4), seed=3)
    data = make_image_zip(str(path / 'data.zip'), num=5, resolution=8, channels=1)
    data4 = make_image_zip(str(path / 'data4.zip'), num=2, resolution=4, channels=1)
    wrong = make_image_zip(str(path / 'rgb.zip'), num=2, resolution=8, channels=3)
    cond = write_checkpoint(str(path / 'cond.pt'), tiny_config(D=8.0, label_dim=3), seed=4)
    labelled = make_image_zip(str(path / 'labelled.zip'), num=3, resolution=8, channels=1, labels=True)
    return dict(run=str(run), pfgm=str(run / state_file_name(2)), edm=edm, small=small, data=data, data4=data4,
                rgb=wrong, cond=cond, labelled=labelled)


def invoke(args):
    result = CliRunner().invoke(likelihood_script.main, args)
    return result


def test_cli_writes_what_the_library_computes(files, tmp_path):
    """The per-image log p in the JSON is ode_log_likelihood on the image dequantized with its seed's noise and
    probed with its seed's probe (not the program's own summary line), and the summary is their mean. Catches a
    result stored for the wrong image, a prior with the wrong D, or the wrong dequantization."""
    out = tmp_path / 'out'
    result = invoke([f'--network={files["pfgm"]}', f'--data={files["data"]}', f'--outdir={out}', '--images=1,3',
                     '--seed=10', '--batch=1'] + FAST)
    assert result.exit_code == 0, result.output
    record = json.load(open(out / 'likelihood-000002.json'))
    assert [row['index'] for row in record['images']] == [1, 3] and record['D'] == 8.0
    net = load_network(files["pfgm"])
    image = torch.as_tensor(ImageFolderDataset(files['data'])[3][0])[None]
    noise, probe = likelihood.image_randomness(image.shape[1:], 13)
    direct = likelihood.ode_log_likelihood(net, likelihood.dequantize(image, noise[None]), 0.02, 20.0, 8.0,
                                           probes=probe[None], rtol=1e-3, atol=1e-3, variable='sigma')
    row = record['images'][1]
    assert row['log_p'] == pytest.approx(float(direct['log_p'][0]), abs=1e-9)
    assert row['nfe'] == direct['nfe']
    assert row['bits_per_dim'] == pytest.approx(-row['log_p'] / (64 * math.log(2)) + 7)
    assert record['summary']['bits_per_dim'] == pytest.approx(np.mean([r['bits_per_dim'] for r in record['images']]))
    assert record['summary']['standard_error'] > 0


def test_cli_conditional_network_gets_each_image_label(files, tmp_path):
    """A class-conditional network is evaluated as log p(x | its label): catches labels dropped or mixed up."""
    out = tmp_path / 'out'
    result = invoke([f'--network={files["cond"]}', f'--data={files["labelled"]}', f'--outdir={out}', '--images=2']
                    + FAST)
    assert result.exit_code == 0, result.output
    row = json.load(open(out / 'likelihood-000000.json'))['images'][0]
    net = load_network(files['cond'])
    image, label = ImageFolderDataset(files['labelled'], use_labels=True)[2]
    assert label.argmax() == 2
    noise, probe = likelihood.image_randomness(image.shape, 2)
    x = likelihood.dequantize(torch.as_tensor(image)[None], noise[None])
    kwargs = dict(sigma_min=0.02, sigma_max=20.0, D=8.0, probes=probe[None], rtol=1e-3, atol=1e-3, variable='sigma')
    right = likelihood.ode_log_likelihood(net, x, class_labels=torch.as_tensor(label)[None], **kwargs)['log_p']
    wrong = likelihood.ode_log_likelihood(net, x, class_labels=torch.eye(3)[[0]], **kwargs)['log_p']
    assert row['log_p'] == pytest.approx(float(right[0]), abs=1e-9) and abs(float(wrong[0] - right[0])) > 1e-6


def test_cli_results_depend_on_the_image_seed_only_and_reruns_resume(files, tmp_path):
    """--batch=1: an image's row is the same whatever else is evaluated; a batch solve agrees within the solver
    tolerance; a rerun with the same settings keeps the file, other settings recompute it. Catches randomness drawn
    per batch instead of per image, and a resume that ignores changed settings."""
    one, two, batched = tmp_path / 'one', tmp_path / 'two', tmp_path / 'batched'
    common = [f'--network={files["edm"]}', f'--data={files["data"]}'] + FAST
    assert invoke(common + [f'--outdir={one}', '--images=0,4', '--batch=1']).exit_code == 0
    assert invoke(common + [f'--outdir={two}', '--images=4', '--batch=1']).exit_code == 0
    assert invoke(common + [f'--outdir={batched}', '--images=0,4', '--batch=2']).exit_code == 0
    rows = [json.load(open(folder / 'likelihood-000000.json'))['images'] for folder in (one, two, batched)]
    assert rows[0][1] == rows[1][0]
    assert rows[2][1]['bits_per_dim'] != rows[0][1]['bits_per_dim']
    assert rows[2][1]['bits_per_dim'] == pytest.approx(rows[0][1]['bits_per_dim'], abs=0.02)

    before = os.stat(one / 'likelihood-000000.json').st_mtime_ns
    again = invoke(common + [f'--outdir={one}', '--images=0,4', '--batch=1'])
    assert 'skipped' in again.output and os.stat(one / 'likelihood-000000.json').st_mtime_ns == before
    assert invoke(common + [f'--outdir={one}', '--images=0,4', '--batch=1', '--seed=1']).exit_code == 0
    assert json.load(open(one / 'likelihood-000000.json'))['images'][0]['seed'] == 1


def test_cli_exact_trace_and_log_sigma_agree_with_hutchinson_on_average(files, tmp_path):
    """--exact-trace and --variable=log_sigma run on the real network; the exact trace in σ and in ln σ agree
    within the tolerance, and Hutchinson's per-image values scatter around them. Catches a variable or a trace
    mode that computes a different quantity."""
    rows = {}
    for name, extra in [('sigma', ['--exact-trace']), ('log', ['--exact-trace', '--variable=log_sigma']),
                        ('hutch', [])]:
        out = tmp_path / name
        result = invoke([f'--network={files["small"]}', f'--data={files["data4"]}', f'--outdir={out}', '--batch=2']
                        + FAST + extra)
        assert result.exit_code == 0, result.output
        rows[name] = np.array([r['bits_per_dim'] for r in json.load(open(out / 'likelihood-000000.json'))['images']])
    np.testing.assert_allclose(rows['sigma'], rows['log'], atol=0.01)
    assert np.abs(rows['hutch'] - rows['sigma']).max() < 0.5


def test_run_directory_mode_writes_one_file_per_checkpoint(files, tmp_path):
    """Without --network every training state of --outdir within --ckpt..--end_ckpt gets its file: catches the
    range filter ignored or results written under the wrong kimg."""
    result = invoke([f'--outdir={files["run"]}', f'--data={files["data"]}', '--images=0', '--ckpt=1'] + FAST)
    assert result.exit_code == 0, result.output
    written = sorted(name for name in os.listdir(files['run']) if name.startswith('likelihood-'))
    assert written == ['likelihood-000002.json']
    os.remove(os.path.join(files['run'], written[0]))


@pytest.mark.parametrize('args, message', [
    (['--network={missing}'], 'no such file'),
    (['--network={pfgm}', '--images=5'], 'past the end'),
    (['--network={pfgm}', '--data={rgb}'], 'trained on'),
    (['--network={pfgm}', '--sigma_min=5', '--sigma_max=1'], 'sigma_min'),
    (['--network={pfgm}', '--images=2,2'], 'twice'),
    (['--network={pfgm}', '--data={missing}'], 'not found'),
    (['--network={cond}'], 'needs matching labels'),
    ([], 'no checkpoints'),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, files, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    paths = dict(files, missing=str(tmp_path / 'nope.pt'))
    defaults = [f'--data={files["data"]}'] if not any(a.startswith('--data') for a in args) else []
    result = invoke([a.format(**paths) for a in args] + defaults + [f'--outdir={out}'])
    assert result.exit_code != 0 and not isinstance(result.exception, (ValueError, RuntimeError)), result.output
    assert message in result.output and 'Traceback' not in result.output, result.output
    assert os.listdir(out) == []


def test_torchrun_two_ranks_match_one_process(files, tmp_path):
    """Two gloo processes share the images and gather them: catches rows lost or duplicated in the gather, or
    randomness that depends on the rank."""
    common = [f'--network={files["pfgm"]}', f'--data={files["data"]}', '--images=0-2', '--batch=1'] + FAST
    assert invoke(common + [f'--outdir={tmp_path / "one"}']).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k != 'PFGMPP_DEVICE'}
    env['OMP_NUM_THREADS'] = '1'
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'likelihood.py', f'--outdir={tmp_path / "two"}'] + common,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.load(open(tmp_path / name / 'likelihood-000002.json'))['images'] for name in ('one', 'two'))
    assert one == two and len(one) == 3


def test_digits_report_pairs_images_and_marks_missing_models():
    """scripts/likelihood_digits.py's table: "vs EDM" is the mean and standard error of the per-image differences
    (not the difference of the means with unpaired errors), and a model not yet measured says so. Catches
    differences taken between different images or a table that hides a missing model."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import likelihood_digits

    def record(values):
        rows = [dict(index=1500 + i, bits_per_dim=v, nfe=100) for i, v in enumerate(values)]
        return dict(images=rows, summary=dict(likelihood.summarize(rows), seconds=1.0))

    edm, d128 = [3.0, 4.0, 5.0], [3.1, 4.3, 5.2]
    results = dict(recipe=dict(likelihood_digits.FULL, network=None), prior_error={'EDM': (1e-4, 2e-4)},
                   models={'EDM': record(edm), 'D=128': record(d128)})
    text = likelihood_digits.report(results)
    diff = np.subtract(d128, edm)
    expected = f'{diff.mean():+.4f} ± {diff.std(ddof=1) / math.sqrt(3):.4f}'
    assert expected == '+0.2000 ± 0.0577'
    assert f'| D=128 | {np.mean(d128):.4f} ± {np.std(d128, ddof=1) / math.sqrt(3):.4f} | {expected} |' in text
    assert '| D=8 | not measured |' in text and '| D=2048 | not measured |' in text

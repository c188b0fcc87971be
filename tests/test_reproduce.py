"""scripts/reproduce.py: the verdict logic on made-up scores, and the whole quick pipeline end to end."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import reproduce                                  # noqa: E402
import reproduce_report                           # noqa: E402

THREE_MODELS = dataclasses.replace(reproduce.QUICK, models=(('D=8', 8), ('D=128', 128), ('EDM', None)),
                                   alphas=(0, 0.2), steps=(3,), bits=(4,), second_seed_set='D=8')


def _results(tmp_path, alpha_fids, second_set=(10.0, 11.0)):
    """Results whose α = 0.2 FIDs are alpha_fids (baselines 10); the D=8 2nd seed set gives the noise."""
    reproduction = reproduce.Reproduction(THREE_MODELS, str(tmp_path))
    scores = {}

    def put(label, seed_set, axis, value, fid):
        scores[os.path.relpath(reproduction.folder(label, seed_set, axis, value), reproduction.out)] = fid
    for label, _ in THREE_MODELS.models:
        put(label, 1, 'alpha', 0, 10.0)
        put(label, 1, 'alpha', 0.2, alpha_fids[label])
        put(label, 1, 'steps', 3, 20.0)
        put(label, 1, 'quant', 4, 10.5)
    put('D=8', 2, 'alpha', 0, second_set[0])
    put('D=8', 2, 'alpha', 0.2, second_set[1])
    put('D=8', 2, 'steps', 3, 20.0)
    put('D=8', 2, 'quant', 4, 10.5)
    reproduction.scores = scores
    return reproduce_report.Results(reproduction)


@pytest.mark.parametrize('fids, word', [
    (dict(zip(['D=8', 'D=128', 'EDM'], [11.0, 12.0, 15.0])), 'holds'),
    (dict(zip(['D=8', 'D=128', 'EDM'], [15.0, 12.0, 11.0])), 'is reversed'),
    (dict(zip(['D=8', 'D=128', 'EDM'], [11.0, 16.0, 14.0])), 'holds only partly'),
    (dict(zip(['D=8', 'D=128', 'EDM'], [11.0, 11.1, 11.2])), 'is not resolved'),
])
def test_verdict_words_follow_the_fid_changes(tmp_path, fids, word):
    # Catches a verdict that ignores the D order, compares absolute FIDs instead of changes, or ignores inversions.
    results = _results(tmp_path, fids)
    assert results.harshest('alpha') == 0.2 and results.harshest('steps') == 5 and results.harshest('quant') == 4
    got, detail = reproduce_report.axis_verdict(results, 'alpha', margin=0.5)
    assert got.startswith(word)
    assert f'D=8 {fids["D=8"] - 10:+.2f}' in detail


def test_noise_yardstick_is_the_paired_change_between_seed_sets(tmp_path):
    # Seed set 2 of D=8: baseline 13, α 0.2 at 14.5 -> FID gap 3.5 (at α 0.2: |11 - 14.5|), change gap |1 - 1.5|.
    results = _results(tmp_path, dict(zip(['D=8', 'D=128', 'EDM'], [11.0, 12.0, 15.0])), second_set=(13.0, 14.5))
    fid_gap, change_gap = results.seed_set_gap('alpha')
    assert fid_gap == pytest.approx(3.5) and change_gap == pytest.approx(0.5)
    # The NFE axis carries the baseline as its 35-NFE point and the bits axis as full precision.
    assert results.points('EDM', 'steps') == [(5, 20.0), (35, 10.0)]
    assert results.points('EDM', 'quant') == [(4, 10.5), (reproduce_report.FULL_PRECISION_BITS, 10.0)]


def _commands_run(out):
    return sum(line.startswith('$ ') for path in glob.glob(os.path.join(out, 'logs', '*.log')) for line in open(path))


def test_quick_reproduction_end_to_end_and_resume(tmp_path):
    """The whole pipeline through the CLIs on tiny sizes; a second run redoes nothing and rewrites the report."""
    out, report = tmp_path / 'run', tmp_path / 'report.md'
    command = [sys.executable, os.path.join(ROOT, 'scripts', 'reproduce.py'), '--quick', f'--out={out}',
               f'--report={report}']
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    recipe = reproduce.QUICK
    folders_per_model = len(recipe.alphas) + len(recipe.steps) + len(recipe.bits)
    scores = json.load(open(out / 'scores.json'))
    assert len(scores) == folders_per_model * (len(recipe.models) + 1)     # + the second seed set of one model
    assert all(0 < fid < 1000 for fid in scores.values())
    for path in scores:                                                    # every scored folder is complete
        assert len(glob.glob(str(out / path / '*' / '*.png'))) == recipe.num_images
    text = report.read_text()
    assert f'{scores["runs/edm/ckpt_000001_alpha_0.2"]:.2f}' in text
    for axis in ('alpha', 'steps', 'quant', 'loss'):
        assert (tmp_path / f'report-{axis}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    commands = _commands_run(out)
    report.unlink()
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    assert _commands_run(out) == commands                                  # nothing trained, sampled or scored
    assert json.load(open(out / 'scores.json')) == scores
    assert report.read_text() == text


def test_d_with_spread_inverts_norm_spread():
    # Catches an algebra slip in the inverse used for the report's "paper's D with the same spread" column.
    from training.pfgmpp import norm_spread
    for D in (6.0, 64.0, 128.0, 2048.0):
        assert reproduce_report.d_with_spread(3072, norm_spread(3072, D)) == pytest.approx(D, rel=1e-9)
    assert reproduce_report.d_with_spread(256, norm_spread(256, None)) is None       # the Gaussian floor

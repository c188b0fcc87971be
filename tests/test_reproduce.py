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


def _results(tmp_path, alpha_fids, second_set=(10.0, 11.0), recipe=THREE_MODELS):
    """Results whose α = 0.2 FIDs are alpha_fids (baselines 10); the D=8 2nd seed set gives the noise. KID is FID/1000
    with spread 0.001 everywhere."""
    reproduction = reproduce.Reproduction(recipe, str(tmp_path))
    scores = {}

    def put(label, seed_set, axis, value, fid):
        scores[os.path.relpath(reproduction.folder(label, seed_set, axis, value), reproduction.out)] = dict(
            fid=fid, kid=fid / 1000, kid_std=0.0, kid_spread=0.001)
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
    # NFE 5 at FID 20 is exactly twice the baseline: still judged (within, not beyond).
    assert results.judged('alpha') == 0.2 and results.judged('steps') == 5 and results.judged('quant') == 4
    got, detail = reproduce_report.axis_verdict(results, 'alpha', margin=0.5)
    assert got.startswith(word)
    assert f'D=8 {fids["D=8"] - 10:+.2f}' in detail
    kid_word, kid_detail = reproduce_report.axis_verdict(results, 'alpha', margin=0.0005, key='kid')
    assert kid_word.startswith(word) and f'D=8 {(fids["D=8"] - 10) / 1000:+.4f}' in kid_detail


def test_noise_yardstick_is_the_paired_change_between_seed_sets(tmp_path):
    # Seed set 2 of D=8: baseline 13, α 0.2 at 14.5 -> FID gap 3.5 (at α 0.2: |11 - 14.5|), change gap |1 - 1.5|.
    results = _results(tmp_path, dict(zip(['D=8', 'D=128', 'EDM'], [11.0, 12.0, 15.0])), second_set=(13.0, 14.5))
    fid_gap, change_gap = results.seed_set_gap('alpha')
    assert fid_gap == pytest.approx(3.5) and change_gap == pytest.approx(0.5)
    # The NFE axis carries the baseline as its 35-NFE point and the bits axis as full precision.
    assert results.points('EDM', 'steps') == [(5, 20.0), (35, 10.0)]
    assert results.points('EDM', 'quant') == [(4, 10.5), (reproduce_report.FULL_PRECISION_BITS, 10.0)]


STEPS_RECIPE = dataclasses.replace(THREE_MODELS, steps=(3, 4, 6))     # NFE 5, 7, 11


@pytest.mark.parametrize('nfe7_fids, judged', [
    ((19.0, 30.0, 50.0), 7),       # D=8 best at NFE 7 and within 2x its baseline 10: judged at NFE 7, not NFE 5
    ((21.0, 30.0, 50.0), 11),      # best at NFE 7 is over 2x its baseline: the harshest meaningful NFE is 11
    ((30.0, 30.0, 12.0), 7),       # EDM best (12 <= 2 x its baseline 10)
])
def test_each_axis_is_judged_at_the_harshest_meaningful_setting(tmp_path, nfe7_fids, judged):
    # Catches judging at the harshest setting regardless (NFE 5, where every model is noise), "within twice" taken
    # against another model's baseline, or the search running from the wrong end.
    results = _results(tmp_path, dict(zip(['D=8', 'D=128', 'EDM'], [11.0, 12.0, 15.0])), recipe=STEPS_RECIPE)
    scores = results.r.scores
    for label, fid7 in zip(['D=8', 'D=128', 'EDM'], nfe7_fids):
        for steps, fid in [(3, 360.0), (4, fid7), (6, 12.0)]:
            scores[os.path.relpath(results.r.folder(label, 1, 'steps', steps), results.r.out)] = dict(
                fid=fid, kid=fid / 1000, kid_std=0.0, kid_spread=0.001)
    assert results.perturbed('steps') == [11, 7, 5] and results.harshest('steps') == 5
    assert results.judged('steps') == judged


def test_best_models_own_baseline_decides(tmp_path):
    # EDM is best at NFE 5 (FID 12) but its own baseline is 5: 12 > 2 x 5, so NFE 5 is not meaningful, although
    # D=8 (baseline 10) sits at 15 < 20. No setting passes: the verdict says so instead of ranking noise.
    results = _results(tmp_path, dict(zip(['D=8', 'D=128', 'EDM'], [11.0, 12.0, 15.0])))
    scores = results.r.scores
    for label, base, nfe5 in [('D=8', 10.0, 15.0), ('D=128', 10.0, 30.0), ('EDM', 5.0, 12.0)]:
        for axis, value, fid in [('alpha', 0, base), ('steps', 3, nfe5)]:
            scores[os.path.relpath(results.r.folder(label, 1, axis, value), results.r.out)] = dict(
                fid=fid, kid=fid / 1000, kid_std=0.0, kid_spread=0.001)
    assert results.judged('steps') is None
    word, detail = reproduce_report.axis_verdict(results, 'steps', margin=0.5)
    assert word == 'is not judged' and 'within 2×' in detail


def test_kid_verdict_margin_follows_the_bootstrap_spreads(tmp_path):
    # KID changes +0.001, +0.002, +0.005 (FID/1000). Spreads 0.0015: a model's change has noise √2·0.0015 and the
    # margin is 2·√2·√2·0.0015 = 0.006, so D=8 vs EDM (0.004 apart) is within it; spreads 0.0001 resolve it.
    # Catches a margin that ignores the spreads or adds them linearly.
    results = _results(tmp_path, dict(zip(['D=8', 'D=128', 'EDM'], [11.0, 12.0, 15.0])))
    assert results.kid_change_noise('D=8', 'alpha') == pytest.approx(2 ** 0.5 * 0.001)
    for entry in results.r.scores.values():
        entry['kid_spread'] = 0.0015
    assert reproduce_report.kid_margin(results, 'alpha') == pytest.approx(0.006)
    word, _ = reproduce_report.axis_verdict(results, 'alpha', reproduce_report.kid_margin(results, 'alpha'), 'kid')
    assert word.startswith('is not resolved')
    for entry in results.r.scores.values():
        entry['kid_spread'] = 0.0001
    word, _ = reproduce_report.axis_verdict(results, 'alpha', reproduce_report.kid_margin(results, 'alpha'), 'kid')
    assert word == 'holds'


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
    assert all(0 < entry['fid'] < 1000 and entry['kid_spread'] > 0 for entry in scores.values())
    assert all(sorted(entry) == sorted(reproduce.SCORE_KEYS) for entry in scores.values())
    for path in scores:                                                    # every scored folder is complete
        assert len(glob.glob(str(out / path / '*' / '*.png'))) == recipe.num_images
    text = report.read_text()
    edm = scores['runs/edm/ckpt_000001_alpha_0.2']
    assert f'{edm["fid"]:.2f}' in text and f'{edm["kid"]:.4f} ± {edm["kid_spread"]:.4f}' in text
    for name in ('alpha', 'steps', 'quant', 'loss', 'alpha-kid', 'steps-kid', 'quant-kid'):
        assert (tmp_path / f'report-{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    commands = _commands_run(out)
    report.unlink()
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    assert _commands_run(out) == commands                                  # nothing trained, sampled or scored
    assert json.load(open(out / 'scores.json')) == scores
    assert report.read_text() == text

    # An older run's bare-FID score is redone from the folder's cached features: one fid.py call, no sampling, and
    # the cache is not rewritten (no feature was computed).
    rel = 'runs/edm/ckpt_000001_alpha_0.2'
    [cache] = glob.glob(str(out / (rel + '.features-*.npz')))
    stamp = os.stat(cache).st_mtime_ns
    json.dump(dict(scores, **{rel: scores[rel]['fid']}), open(out / 'scores.json', 'w'))
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    assert _commands_run(out) == commands + 1 and os.stat(cache).st_mtime_ns == stamp
    assert json.load(open(out / 'scores.json'))[rel] == pytest.approx(scores[rel], rel=1e-9)


def test_d_with_spread_inverts_norm_spread():
    # Catches an algebra slip in the inverse used for the report's "paper's D with the same spread" column.
    from training.pfgmpp import norm_spread
    for D in (6.0, 64.0, 128.0, 2048.0):
        assert reproduce_report.d_with_spread(3072, norm_spread(3072, D)) == pytest.approx(D, rel=1e-9)
    assert reproduce_report.d_with_spread(256, norm_spread(256, None)) is None       # the Gaussian floor


def test_kid_change_noise_is_the_paired_bootstrap_on_cached_features(tmp_path):
    # With both folders' feature caches present the margin comes from metrics.kid_paired_change on rows paired by
    # file name (seed); catches unpaired rows (names in another order) or the quadrature used despite the caches.
    import numpy as np
    from training import features, fid_stats, metrics
    results = _results(tmp_path, dict(zip(['D=8', 'D=128', 'EDM'], [11.0, 12.0, 15.0])))
    rng = np.random.RandomState(0)
    ref = rng.randn(40, 6)
    fid_stats.save_reference_stats(results.r.ref_stats, ref.mean(0), np.cov(ref, rowvar=False), features=ref)
    before = rng.randn(30, 6)
    after = before + rng.randn(30, 6) * 0.1
    names = [f'000000/{seed:06d}.png' for seed in range(30)]
    for value, rows in [(0, before), (0.2, after)]:
        order = rng.permutation(30)                      # written in another order: pairing goes by name
        entries = {names[i]: ((1, 1), rows[i].astype(np.float32)) for i in order}
        folder = results.r.folder('D=8', 1, 'alpha', value)
        features.write_cache(features.cache_path(folder, fid_stats.OFFLINE_DETECTOR_SHA1),
                             fid_stats.OFFLINE_DETECTOR_SHA1, entries)
    expected = metrics.kid_paired_change(before.astype(np.float32), after.astype(np.float32), ref, num_subsets=10)[1]
    assert results.kid_change_noise('D=8', 'alpha') == pytest.approx(expected, rel=1e-9)
    assert results.kid_change_noise('EDM', 'alpha') == pytest.approx(2 ** 0.5 * 0.001)   # no caches: quadrature

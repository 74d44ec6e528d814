"""Paired bootstrap over windows (saeforge.pipeline.bootstrap): exact known cases and a slow-loop oracle."""
import numpy as np
import pytest

from saeforge.pipeline import bootstrap as B


def _case(n_windows=7, seed=0):
    rng = np.random.default_rng(seed)
    n = rng.integers(5, 20, n_windows).astype(float)
    clean = n * rng.uniform(2.0, 3.0, n_windows)
    spliced = clean + n * rng.uniform(0.0, 0.5, n_windows)
    zero = clean + n * rng.uniform(1.0, 4.0, n_windows)
    mean = clean + n * rng.uniform(0.5, 1.0, n_windows)
    return clean, spliced, zero, mean, n


def _slow(clean, spliced, zero, mean, n, n_resamples, seed):
    """One Python loop per resample, each CE summed over the SAME drawn windows; ratio of means per resample."""
    idx = np.concatenate(list(B.resample_indices(len(clean), n_resamples, seed)))
    lr, lr_mean, dce = [], [], []
    for row in idx:
        c = s = z = m = k = 0.0
        for w in row:
            c, s, z, m, k = c + clean[w], s + spliced[w], z + zero[w], m + mean[w], k + n[w]
        lr.append(((z - s) / k) / ((z - c) / k))
        lr_mean.append(((m - s) / k) / ((m - c) / k))
        dce.append(s / k - c / k)
    pct = lambda v: list(np.percentile(v, [2.5, 97.5]))  # noqa: E731
    return {"loss_recovered_ci95": pct(lr), "loss_recovered_mean_ci95": pct(lr_mean), "delta_ce_ci95": pct(dce)}


@pytest.mark.parametrize("n_windows,n_resamples,seed", [(7, 1000, 0), (3, 257, 5), (40, 600, 11)])
def test_matches_a_direct_slow_loop_with_the_same_indices(n_windows, n_resamples, seed):
    clean, spliced, zero, mean, n = _case(n_windows, seed)
    got = B.splice_intervals(clean, spliced, n, zero=zero, mean=mean, n_resamples=n_resamples, seed=seed)
    want = _slow(clean, spliced, zero, mean, n, n_resamples, seed)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key
    assert got["loss_recovered_ci95"] != got["loss_recovered_mean_ci95"]


def test_resample_indices_are_fixed_by_the_seed_and_cover_the_windows():
    idx = np.concatenate(list(B.resample_indices(5, 1000, 0)))
    assert idx.shape == (1000, 5) and idx.min() == 0 and idx.max() == 4
    assert np.array_equal(idx, np.concatenate(list(B.resample_indices(5, 1000, 0))))
    assert not np.array_equal(idx, np.concatenate(list(B.resample_indices(5, 1000, 1))))
    counts = np.concatenate([B._counts(i, 5) for i in B.resample_indices(5, 1000, 0)])
    assert (counts.sum(1) == 5).all()  # every resample draws n_windows windows
    assert np.array_equal(counts[3], np.bincount(idx[3], minlength=5))


def test_identical_spliced_and_clean_give_exactly_one():
    clean, _, zero, mean, n = _case(9, 2)
    ci = B.splice_intervals(clean, clean.copy(), n, zero=zero, mean=mean)
    assert ci == {"loss_recovered_ci95": [1.0, 1.0], "loss_recovered_mean_ci95": [1.0, 1.0],
                  "delta_ce_ci95": [0.0, 0.0]}


def test_spliced_equal_to_the_ablation_gives_exactly_zero_and_one_window_collapses():
    clean, _, zero, _, n = _case(6, 3)
    assert B.splice_intervals(clean, zero.copy(), n, zero=zero)["loss_recovered_ci95"] == [0.0, 0.0]
    one = B.splice_intervals(np.array([20.0]), np.array([23.0]), np.array([10.0]), zero=np.array([50.0]))
    assert one["loss_recovered_ci95"] == [0.9, 0.9] and one["delta_ce_ci95"] == pytest.approx([0.3, 0.3])
    assert one["loss_recovered_mean_ci95"] is None  # no mean ablation given


def test_undefined_resamples_give_no_interval():
    # one window where the ablation changes nothing: a resample of only that window divides by zero
    clean = np.array([10.0, 10.0])
    ci = B.splice_intervals(clean, np.array([10.5, 11.0]), np.array([5.0, 5.0]), zero=np.array([10.0, 20.0]))
    assert ci["loss_recovered_ci95"] is None and ci["delta_ce_ci95"] is not None
    assert B.percentile_ci(np.array([1.0, np.inf])) is None

"""The native Gram accumulation (SYRK on one triangle) against a plain fp64 NumPy reference."""

import numpy as np
import pytest

from rocketkit._native import gram_accumulate, gram_symmetrize


@pytest.mark.parametrize("d", [1, 19, 111, 130])
@pytest.mark.parametrize("batches", [(1,), (7, 0, 33)])
def test_gram_accumulate_matches_numpy(d, batches):
    rng = np.random.default_rng(d * 10 + len(batches))
    H = np.zeros((d, d))
    lower_before = np.tril(H, -1).copy()
    xs = [rng.standard_normal((n, d)) * rng.uniform(0.1, 10, size=d) for n in batches]
    for x in xs:
        gram_accumulate(H, x)
    ref = sum(x.T @ x for x in xs)
    iu = np.triu_indices(d)
    np.testing.assert_allclose(H[iu], ref[iu], rtol=1e-13, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_array_equal(np.tril(H, -1), lower_before)  # one triangle only
    gram_symmetrize(H)
    np.testing.assert_array_equal(H, H.T)
    np.testing.assert_allclose(H, ref, rtol=1e-13, atol=1e-12 * np.abs(ref).max())


def test_gram_accumulate_adds_to_existing_upper_triangle():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((23, 17))
    H0 = rng.standard_normal((17, 17))
    H = H0.copy()
    gram_accumulate(H, x)
    iu = np.triu_indices(17)
    np.testing.assert_allclose(H[iu], (H0 + x.T @ x)[iu], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "H, X",
    [
        (np.zeros((3, 4)), np.zeros((2, 3))),  # H not square
        (np.zeros((3, 3), dtype=np.float32), np.zeros((2, 3))),  # H not float64
        (np.zeros((3, 3)), np.zeros((2, 4))),  # X width differs
        (np.zeros((3, 3)), np.zeros(3)),  # X not 2-D
        (np.asfortranarray(np.zeros((3, 3)))[:, :2], np.zeros((2, 2))),  # H not contiguous
    ],
)
def test_gram_accumulate_rejects_bad_input(H, X):
    with pytest.raises(ValueError, match=r"\[gram_accumulate\]"):
        gram_accumulate(H, X)


def test_gram_buffers_must_be_writable():
    H = np.zeros((4, 4))
    H.flags.writeable = False
    with pytest.raises(ValueError, match=r"\[gram_symmetrize\]"):
        gram_symmetrize(H)
    with pytest.raises(ValueError, match=r"\[gram_accumulate\]"):
        gram_accumulate(H, np.zeros((1, 4)))

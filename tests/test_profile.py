"""Candidate grid, profiling of tiny models, and profile save/load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS, Profile, candidate_grid, profile_model


def test_default_grid_has_294_candidates():
    assert len(DEFAULT_CRS) == 14 and len(DEFAULT_KS) == 21
    assert DEFAULT_CRS[0] == 0.05 and DEFAULT_CRS[-1] == 0.7
    assert DEFAULT_KS[0] == 1.0 and DEFAULT_KS[-1] == 3.0
    g = candidate_grid(2048, 2048)
    assert g.n_total == 294 and len(g) == 294  # square and large: nothing dropped


@pytest.mark.parametrize("d1,d2", [(1, 1), (7, 53), (53, 7), (37, 37), (576, 1536), (1536, 576)])
def test_grid_formula_and_dropping(d1, d2):
    g = candidate_grid(d1, d2)
    assert g.n_total == 294
    kept = set()
    for cr in DEFAULT_CRS:
        for ks in DEFAULT_KS:
            k = math.floor((1 - cr) * d1 * d2 / (d1 + d2 / ks) + 0.5)
            s = max(1, math.floor(k / ks + 1e-9))
            p = d1 * k + s * d2
            if 1 <= k <= min(d1, d2) and s <= k and p < d1 * d2:
                kept.add((cr, ks, k, s, p))
    got = {(float(a), float(b), int(c), int(d), int(e)) for a, b, c, d, e in zip(g.cr, g.ks, g.k, g.s, g.params)}
    assert got == kept
    assert np.all(g.params == d1 * g.k + g.s * d2)
    assert np.all(g.params < d1 * d2) and np.all(g.k <= min(d1, d2)) and np.all(g.s >= 1)
    assert np.all(g.index_bytes == 2 * g.s * d2)


def test_grid_drops_everything_for_a_tiny_layer():
    g = candidate_grid(1, 1)
    assert len(g) == 0 and g.n_total == 294


def test_exact_division_does_not_lose_a_nonzero():
    # k = 11 at ks = 1.1 must give s = 10, although 11 / 1.1 = 10.000000000000002 or 9.999... in floats.
    g = candidate_grid(100, 100, crs=[0.9447], kss=[1.1])
    assert int(g.s[0]) == int(g.k[0] / 1.1 + 1e-9)


@pytest.mark.parametrize("bad", [[0.0], [1.0], [-0.1], [float("nan")], []])
def test_grid_rejects_bad_crs(bad):
    with pytest.raises(ValueError, match="crs"):
        candidate_grid(8, 8, crs=bad)


def test_grid_rejects_bad_kss():
    with pytest.raises(ValueError, match="kss"):
        candidate_grid(8, 8, kss=[0.5])


def _check_profile(prof, model, ids):
    from rocketkit.models import block_linears, decoder_blocks

    names = {f"model.layers.{i}.{rel}" for i, b in enumerate(decoder_blocks(model)) for rel in block_linears(b)}
    assert set(prof.layers) == names
    for lp in prof.layers.values():
        assert lp.tokens == ids.numel() and lp.skipped == 0
        assert lp.e_weight.shape == lp.e_output.shape == (len(lp.grid),)
        assert np.all((lp.e_weight >= 0) & (lp.e_weight <= 1 + 1e-9))
        assert np.all((lp.e_output >= 0) & (lp.e_output <= 1 + 1e-9))


def test_profile_tiny_model_and_roundtrip(tiny_llama, tiny_ids, tmp_path):
    prof = profile_model(tiny_llama, tiny_ids, crs=(0.2, 0.5), kss=(1.0, 2.0), progress=False)
    _check_profile(prof, tiny_llama, tiny_ids)
    q = prof.layers["model.layers.0.self_attn.q_proj"]
    assert q.d1 == 64 and q.d2 == 64 and len(q.grid) == 4
    st, js = prof.save(tmp_path / "profile")
    assert st.name == "profile.safetensors" and js.name == "profile.json"
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    back = Profile.load(tmp_path / "profile.json")
    assert back.meta == json.loads(json.dumps(prof.meta))
    assert list(back.layers) == list(prof.layers)
    for name, lp in prof.layers.items():
        b = back.layers[name]
        np.testing.assert_array_equal(b.e_weight, lp.e_weight)
        np.testing.assert_array_equal(b.e_output, lp.e_output)
        np.testing.assert_array_equal(b.grid.k, lp.grid.k)
        assert (b.jitter, b.tokens, b.skipped, b.dead_channels) == (lp.jitter, lp.tokens, lp.skipped, lp.dead_channels)


def test_profile_errors_match_explicit_reconstruction(tiny_llama, tiny_ids):
    """Profiled errors are those of rocketkit.factorize's reconstruction (fp64 reference)."""
    from rocketkit import factorize
    from rocketkit.calibrate import stream_blocks
    from rocketkit.apply import dense_C, measured_errors
    from rocketkit.profile import weight_f64, whiten_grams

    prof = profile_model(tiny_llama, tiny_ids, crs=(0.3, 0.6), kss=(1.0, 2.5), progress=False)
    cb = next(iter(stream_blocks(tiny_llama, tiny_ids, progress=False)))
    wh = whiten_grams(cb.grams)
    for rel in ("self_attn.v_proj", "mlp.down_proj"):
        lp = prof.layers[f"model.layers.0.{rel}"]
        W, S = weight_f64(cb.linears[rel]), wh[id(cb.grams[rel])].S.numpy()
        for i in range(len(lp.grid)):
            k, s = int(lp.grid.k[i]), int(lp.grid.s[i])
            f = factorize(W, S, k, s)
            e_w, e_o = measured_errors(W, S, f.U, dense_C(f.values, f.indices, k))
            assert abs(e_w - lp.e_weight[i]) < 1e-9 and abs(e_o - lp.e_output[i]) < 1e-9


def test_profile_load_validation(tiny_llama, tiny_ids, tmp_path):
    from safetensors.torch import load_file, save_file

    prof = profile_model(tiny_llama, tiny_ids, crs=(0.5,), kss=(1.0,), progress=False)
    prof.save(tmp_path / "p")
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["version"] = 99
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="version"):
        Profile.load(tmp_path / "p")
    prof.save(tmp_path / "p")
    t = load_file(tmp_path / "p.safetensors")
    t["0.e_weight"] = torch.zeros(3, dtype=torch.float64)
    save_file(t, tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"p\.safetensors.*0\.e_weight"):
        Profile.load(tmp_path / "p")
    (tmp_path / "p.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        Profile.load(tmp_path / "p")
    with pytest.raises(ValueError, match="not found"):
        Profile.load(tmp_path / "missing")

"""Numerical faults with a defined outcome: layers that cannot be factorized are kept dense with a
warning (and say why in the profile), a NaN weight is an error naming the layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_ids, make_tiny_model
from rocketkit.allocate import allocate
from rocketkit.calibrate import CalibratedBlock, Gram, stream_blocks
from rocketkit.models import LoadedModel
from rocketkit.pipeline import compress
from rocketkit.profile import Profile, profile_block

GRID = dict(crs=(0.2, 0.5), kss=(1.0, 2.0))


def _block(model, ids):
    return next(iter(stream_blocks(model, ids, batch_size=4, progress=False)))


def test_zero_weight_is_kept_dense_end_to_end(tmp_path):
    model = make_tiny_model("llama")
    name = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(name).weight.zero_()
    ids = make_tiny_ids(4, 21, seed=3)
    with pytest.warns(RuntimeWarning, match=rf"{name} is kept dense: its weight is all zeros"):
        s = compress(LoadedModel(model, None, "tiny"), 0.3, out_dir=tmp_path / "o", calib_ids=ids, progress=False,
                     buckets=5000, **GRID)
    prof = Profile.load(tmp_path / "o" / "profile")
    lp = prof.layers[name]
    assert lp.dense_reason == "its weight is all zeros" and len(lp.grid) == 0 and lp.grid.n_total == 4
    assert sum(bool(p.dense_reason) for p in prof.layers.values()) == 1
    alloc = allocate(prof, 0.3, buckets=5000)
    assert alloc.layers[name].dense and not all(d.dense for d in alloc.layers.values())
    assert allocate(prof, 0.3, method="uniform").layers[name].dense
    assert s["achieved_ratio"] >= 0.3


def test_nan_weight_is_an_error_naming_the_layer(tmp_path):
    model = make_tiny_model("qwen3")
    name = "model.layers.0.self_attn.o_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[3, 5] = float("inf")
    with pytest.raises(ValueError, match=rf"{name}: the weight contains NaN or Inf"):
        compress(LoadedModel(model, None, "tiny"), 0.3, out_dir=tmp_path / "o", calib_ids=make_tiny_ids(2, 9),
                 progress=False, buckets=5000, **GRID)
    assert not (tmp_path / "o").exists()


def test_gram_without_finite_tokens_keeps_its_layers_dense():
    model = make_tiny_model("llama")
    cb = _block(model, make_tiny_ids(2, 11))
    d = cb.linears["self_attn.q_proj"].in_features
    empty = Gram(torch.zeros(d, d, dtype=torch.float64), tokens=0, skipped=22)
    grams = {n: (empty if n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") else g)
             for n, g in cb.grams.items()}
    with pytest.warns(RuntimeWarning, match=r"(q|k|v)_proj is kept dense: no finite calibration token reached it \(22 skipped\)"):
        layers = profile_block(CalibratedBlock(cb.index, cb.name, cb.block, cb.linears, grams), **GRID)
    for rel, lp in layers.items():
        faulty = rel.split(".")[-1] in ("q_proj", "k_proj", "v_proj")
        assert bool(lp.dense_reason) == faulty and (len(lp.grid) == 0) == faulty
        assert faulty or np.isfinite(lp.e_output).all()


def test_gram_that_no_jitter_fixes_keeps_its_layers_dense(tmp_path):
    model = make_tiny_model("llama")
    cb = _block(model, make_tiny_ids(2, 11))
    g = cb.grams["mlp.down_proj"]
    d = g.H.shape[0]
    broken = Gram(-torch.eye(d, dtype=torch.float64) * 1e6 + torch.ones(d, d, dtype=torch.float64), g.tokens, 0)
    grams = dict(cb.grams, **{"mlp.down_proj": broken})
    with pytest.warns(RuntimeWarning, match=r"down_proj is kept dense: its Gram is not positive definite"):
        layers = profile_block(CalibratedBlock(cb.index, cb.name, cb.block, cb.linears, grams), **GRID)
    prof = Profile(layers=layers, meta={"crs": list(GRID["crs"]), "kss": list(GRID["kss"])})
    prof.save(tmp_path / "p")
    back = Profile.load(tmp_path / "p")
    assert back.layers[f"{cb.name}.mlp.down_proj"].dense_reason.startswith("its Gram is not positive definite")
    assert allocate(back, 0.2, buckets=2000).layers[f"{cb.name}.mlp.down_proj"].dense


def test_dead_channel_and_fp16_overflow_have_defined_outcomes():
    """A dead input channel gets jitter and is counted; fp16 activations that overflow to Inf are skipped
    tokens, and a layer left with none is kept dense."""
    model = make_tiny_model("llama").half()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[7] = 0.0  # channel 7 of q/k/v's input is always 0
        model.model.layers[0].post_attention_layernorm.weight.fill_(4.0e3)  # act(gate)·up overflows fp16
    cb = _block(model, make_tiny_ids(3, 17, seed=5))
    down = cb.grams["mlp.down_proj"]
    assert down.tokens == 0 and down.skipped == 3 * 17
    with pytest.warns(RuntimeWarning, match=r"down_proj is kept dense: no finite calibration token reached it \(51 skipped\)"):
        layers = profile_block(cb, **GRID)
    q = layers[f"{cb.name}.self_attn.q_proj"]
    assert q.dead_channels == 1 and q.jitter > 0 and not q.dense_reason and q.skipped == 0
    assert np.isfinite(q.e_weight).all() and np.isfinite(q.e_output).all()
    lp = layers[f"{cb.name}.mlp.down_proj"]
    assert lp.skipped == 51 and lp.dense_reason and len(lp.grid) == 0
    up = layers[f"{cb.name}.mlp.up_proj"]  # its input (the normalised residual) still fits fp16
    assert up.skipped == 0 and not up.dense_reason and len(up.grid) == 4


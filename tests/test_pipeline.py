"""End to end: pipeline.compress on tiny Llama/Qwen3/Mistral and on real SmolLM2 weights."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

from conftest import make_tiny_ids
from rocketkit import load_pretrained
from rocketkit.models import LoadedModel
from rocketkit.modules import FactorizedLinear
from rocketkit.pipeline import compress, format_summary

SMALL_GRID = dict(crs=(0.2, 0.4, 0.6), kss=(1.0, 2.0))


def _check_checkpoint(out, model, ids, tol=1e-6):
    cfg = json.loads((out / "config.json").read_text())
    layers = cfg["rocketkit"]["layers"]
    assert layers
    for rec in layers:
        p, a = rec["errors"]["profiled"], rec["errors"]["applied"]
        assert abs(p["e_weight"] - a["e_weight"]) <= tol, rec["name"]
        assert abs(p["e_output"] - a["e_output"]) <= tol, rec["name"]
    for f in ("profile.json", "profile.safetensors", "allocation.json", "summary.json", "runlog.json",
              "model.safetensors.index.json"):
        assert (out / f).is_file(), f
    loaded = load_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    return cfg


@pytest.mark.parametrize("family,cost,alpha", [("llama", "weight", None), ("qwen3", "output", None), ("mistral", "blend", 0.5)])
def test_compress_tiny(tiny_model_factory, tmp_path, family, cost, alpha):
    model = tiny_model_factory(family)
    ids, eval_ids = make_tiny_ids(4, 33, seed=1), make_tiny_ids(2, 33, seed=2)
    out = tmp_path / "out"
    s = compress(LoadedModel(model, None, f"tiny-{family}"), 0.25, cost=cost, alpha=alpha, out_dir=out,
                 calib_ids=ids, eval_ids=eval_ids, progress=False, buckets=5000, **SMALL_GRID)
    assert s["achieved_ratio"] >= 0.25 and s["compressible_params_after"] <= (1 - 0.25) * s["compressible_params_before"]
    assert s["factorized_layers"] > 0 and s["max_profiled_vs_applied_error"] <= 1e-6
    assert s["params_after"] < s["params_before"]
    assert s["ppl_before"] > 0 and s["ppl_after"] > 0
    assert set(s["time_s"]) >= {"calibrate_profile", "allocate", "factorize", "save", "eval_before", "eval_after"}
    assert s["bytes"]["C_indices"] > 0
    assert json.loads((out / "summary.json").read_text())["achieved_ratio"] == s["achieved_ratio"]
    assert "ratio target / achieved" in format_summary(s)
    _check_checkpoint(out, model, ids)


def test_compress_refined_reports_profiled_and_applied(tiny_llama, tmp_path):
    """refine=1 lowers every layer's whitened error below the profiled one; the summary and card say both."""
    ids = make_tiny_ids(4, 33, seed=1)
    kw = dict(calib_ids=ids, progress=False, buckets=5000, **SMALL_GRID)
    plain = compress(LoadedModel(copy.deepcopy(tiny_llama), None, "tiny"), 0.3, out_dir=tmp_path / "a", **kw)
    refined = compress(LoadedModel(tiny_llama, None, "tiny"), 0.3, out_dir=tmp_path / "b", refine=1, **kw)
    assert plain["refine"] == 0 and "mean_output_error_applied" not in plain
    assert refined["refine"] == 1 and refined["achieved_ratio"] == plain["achieved_ratio"]
    assert refined["mean_output_error_applied"] < refined["mean_output_error_profiled"]
    assert "refinement after allocation | 1 iteration" in (tmp_path / "b" / "README.md").read_text()
    layers = json.loads((tmp_path / "b" / "config.json").read_text())["rocketkit"]["layers"]
    assert all(r["errors"]["applied"]["e_output"] < r["errors"]["profiled"]["e_output"] for r in layers)
    with torch.no_grad():  # the in-memory model was compressed in place, from the published shards
        assert torch.equal(load_pretrained(tmp_path / "b")(ids).logits, tiny_llama(ids).logits)


def test_compress_bad_input(tiny_llama, tmp_path):
    lm = LoadedModel(tiny_llama, None, "tiny")
    with pytest.raises(ValueError, match="ratio"):
        compress(lm, 1.0, out_dir=tmp_path / "a", calib_ids=make_tiny_ids())
    with pytest.raises(ValueError, match="Conv1D"):
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64))
        compress(LoadedModel(gpt2, None, "gpt2"), 0.2, out_dir=tmp_path / "b", calib_ids=make_tiny_ids(), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _truncated(loaded: LoadedModel, n_blocks: int) -> LoadedModel:
    """A deep copy of the real model keeping its first n_blocks decoder blocks (real weights)."""
    model = copy.deepcopy(loaded.model)
    model.model.layers = torch.nn.ModuleList(model.model.layers[:n_blocks])
    model.config.num_hidden_layers = n_blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n_blocks]
    return LoadedModel(model, loaded.tokenizer, loaded.source)


def _smollm2_profiled_equals_applied(smollm2, tmp_path, n_blocks):
    lm = _truncated(smollm2, n_blocks) if n_blocks else LoadedModel(copy.deepcopy(smollm2.model), smollm2.tokenizer, smollm2.source)
    out = tmp_path / "smol"
    s = compress(lm, 0.2, cost="output", calib_tokens=256, seq_len=128, out_dir=out, progress=False, **SMALL_GRID)
    assert s["factorized_layers"] > 0
    assert s["max_profiled_vs_applied_error"] <= 1e-6
    assert s["achieved_ratio"] >= 0.2
    ids = make_tiny_ids(2, 16, seed=3)
    cfg = _check_checkpoint(out, lm.model, ids)
    assert all(isinstance(lm.model.get_submodule(r["name"]), FactorizedLinear) for r in cfg["rocketkit"]["layers"])
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_smollm2_profiled_equals_applied(smollm2, tmp_path):
    """Real SmolLM2 weights and tokenizer, first block (7 layers), real BoolQ calibration text."""
    _smollm2_profiled_equals_applied(smollm2, tmp_path, 1)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ROCKETKIT_FULL_SMOLLM2") != "1", reason="set ROCKETKIT_FULL_SMOLLM2=1 (all 210 layers, minutes)")
def test_smollm2_full_profiled_equals_applied(smollm2, tmp_path):
    _smollm2_profiled_equals_applied(smollm2, tmp_path, 0)


def test_blockwise_perplexity_equals_full_forward(tiny_model_factory, tmp_path):
    """The block-by-block perplexity (streaming evaluation) is evaluate.perplexity's definition, for
    the dense model and with compressed blocks swapped in."""
    from rocketkit.evaluate import perplexity
    from rocketkit.pipeline import blockwise_perplexity

    model = tiny_model_factory("qwen3")
    ids, eval_ids = make_tiny_ids(4, 33, seed=1), make_tiny_ids(3, 21, seed=2)
    dense = blockwise_perplexity(model, eval_ids, batch_size=2)
    assert abs(dense - perplexity(model, eval_ids, batch_size=2, progress=False)) <= 1e-6 * dense
    compressed = copy.deepcopy(model)
    s = compress(LoadedModel(compressed, None, "tiny"), 0.3, out_dir=tmp_path / "o", calib_ids=ids, eval_ids=eval_ids,
                 progress=False, buckets=5000, **SMALL_GRID)
    after = perplexity(compressed, eval_ids, batch_size=8, progress=False)
    assert abs(s["ppl_after"] - after) <= 1e-6 * after and abs(s["ppl_before"] - dense) <= 1e-6 * dense

    def swap(i, block):
        return {rel: compressed.model.layers[i].get_submodule(rel) for rel, m in block.named_modules()
                if isinstance(m, torch.nn.Linear) and isinstance(compressed.model.layers[i].get_submodule(rel), FactorizedLinear)}

    assert abs(blockwise_perplexity(model, eval_ids, batch_size=2, replace=swap) - after) <= 1e-6 * after
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())  # swapped back


def test_compress_options_validated_once_before_any_work(tmp_path):
    """Every option is checked by CompressOptions.create, before a model is opened."""
    from rocketkit.pipeline import CompressOptions

    o = CompressOptions.create(ratio=0.3, out_dir=tmp_path / "o", cache_budget="2G", crs=[0.5], kss=[1])
    assert o.cache_budget == 2 << 30 and o.crs == (0.5,) and o.kss == (1.0,) and o.alpha is None
    with pytest.raises(TypeError, match="unknown compress options: ratioo"):
        CompressOptions.create(ratioo=0.3, ratio=0.3, out_dir=tmp_path / "o")
    for bad, message in [({"ratio": 1.5}, "ratio"), ({"buckets": 0}, "buckets"), ({"batch_size": True}, "batch_size"),
                         ({"cache_budget": "much"}, "cache budget"), ({"method": "magic"}, "method"),
                         ({"dtype": torch.int8}, "dtype"), ({"out_dir": None}, "out_dir"), ({"refine": -1}, "refine"),
                         ({"refine": 1.5}, "refine")]:
        kwargs = {"ratio": 0.3, "out_dir": tmp_path / "o", **bad}
        with pytest.raises(ValueError, match=message):
            CompressOptions.create(**kwargs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.ratio = 0.5

"""FactorizedLinear numerics and autograd; save_compressed -> load_pretrained round trips and validation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rocketkit.modules import FactorizedLinear


def random_factorized(d1, d2, k, s, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(d1, k, generator=g, dtype=torch.float64)
    values = torch.randn(s, d2, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(k, generator=g)[:s].sort().values for _ in range(d2)], 1)
    b = torch.randn(d2, generator=g, dtype=torch.float64) if bias else None
    return FactorizedLinear.from_factors(U, values, idx, bias=b, dtype=dtype)


@pytest.mark.parametrize("d1,d2,k,s", [(1, 1, 1, 1), (7, 53, 5, 3), (53, 7, 7, 7), (37, 64, 19, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_fp64(d1, d2, k, s, bias):
    m = random_factorized(d1, d2, k, s, bias)
    x = torch.randn(3, 11, d1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = x @ m.to_dense_weight().T + (m.bias if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-12)
    assert m.to_dense_weight().shape == (d2, d1)


def test_forward_fp32_and_bf16():
    m64 = random_factorized(37, 64, 19, 6)
    m32 = FactorizedLinear.from_factors(m64.U, m64.C_values, m64.C_indices, m64.bias, dtype=torch.float32)
    x = torch.randn(5, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = x @ m64.to_dense_weight().T + m64.bias
    with torch.no_grad():
        torch.testing.assert_close(m32(x.float()).double(), ref, rtol=1e-5, atol=1e-5)
        mb = FactorizedLinear.from_factors(m64.U, m64.C_values, m64.C_indices, m64.bias, dtype=torch.bfloat16)
        yb = mb(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), ref, rtol=5e-2, atol=0.3)


def test_backward_matches_dense_autograd():
    m = random_factorized(37, 64, 19, 6)
    x = torch.randn(4, 9, 37, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(3))
    w = torch.randn(4, 9, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (m(x) * w).sum().backward()
    # Reference: the same function with C scattered densely inside autograd.
    U = m.U.detach().clone().requires_grad_()
    V = m.C_values.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    C = torch.zeros(m.k, 64, dtype=torch.float64).scatter(0, m.C_indices.long(), V)
    ((x2 @ U @ C + b) * w).sum().backward()
    for got, ref in ((x.grad, x2.grad), (m.U.grad, U.grad), (m.C_values.grad, V.grad), (m.bias.grad, b.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_csr_cache_follows_parameter_updates():
    m = random_factorized(16, 24, 8, 3)
    x = torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        first = m._csr
        m(x)
        assert m._csr is first  # cached, not rebuilt
        m.C_values.mul_(2.0)
        y = m(x)
    torch.testing.assert_close(y, x @ m.to_dense_weight().T + m.bias, rtol=0, atol=1e-12)


def test_index_dtype():
    assert FactorizedLinear(8, 8, 4, 2).C_indices.dtype == torch.int16
    assert FactorizedLinear(40000, 40000, 32768, 1, dtype=torch.float16, device="meta").C_indices.dtype == torch.int32
    with pytest.raises(ValueError):
        FactorizedLinear(8, 8, 9, 2)


@pytest.fixture
def compressed_tiny(tiny_model_factory, tiny_ids):
    from rocketkit.allocate import allocate
    from rocketkit.apply import apply_allocation
    from rocketkit.profile import profile_model

    def build(family="llama", **overrides):
        model = tiny_model_factory(family, **overrides)
        prof = profile_model(model, tiny_ids, crs=(0.2, 0.5), kss=(1.0, 2.0), progress=False)
        alloc = allocate(prof, 0.3, "weight", buckets=5000)
        applied = apply_allocation(model, tiny_ids, alloc, progress=False)
        return model, alloc, applied

    return build


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_logits_equal(compressed_tiny, tiny_ids, tmp_path, tie):
    from rocketkit import load_pretrained, save_compressed

    model, alloc, applied = compressed_tiny("llama", tie_word_embeddings=tie)
    assert applied and all(isinstance(model.get_submodule(n), FactorizedLinear) for n in applied)
    info = save_compressed(model, None, alloc, tmp_path / "ck", applied=applied, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name != "ck"]  # no temp folder left behind
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    section = cfg["rocketkit"]
    assert section["format_version"] == 1 and len(section["layers"]) == len(applied)
    rec = section["layers"][0]
    assert set(rec) >= {"name", "k", "s", "cr", "ks", "cost", "index_dtype", "d1", "d2", "errors"}
    assert info["bytes"]["C_indices"] == sum(2 * d.s * d.d2 for d in alloc.layers.values() if not d.dense)
    assert info["params"]["factorized_layers_after"] == sum(d.params for d in alloc.layers.values() if not d.dense)

    loaded = load_pretrained(tmp_path / "ck")
    assert type(loaded) is type(model)
    for n in applied:
        assert isinstance(loaded.get_submodule(n), FactorizedLinear)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_ids).logits, model(tiny_ids).logits, rtol=1e-5, atol=1e-5)
    l16 = load_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert l16.get_submodule(next(iter(applied))).U.dtype == torch.bfloat16


def test_load_validation(compressed_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from rocketkit import load_pretrained, save_compressed

    model, alloc, applied = compressed_tiny("qwen3")
    save_compressed(model, None, alloc, tmp_path / "ck", applied=applied, progress=False)
    with pytest.raises(ValueError, match="exists"):
        save_compressed(model, None, alloc, tmp_path / "ck", applied=applied, progress=False)
    st = tmp_path / "ck" / "model.safetensors"
    good = load_file(st)
    name = next(iter(applied))

    bad = dict(good)
    bad[f"{name}.U"] = bad[f"{name}.U"][:, :-1].contiguous()
    save_file(bad, st, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{name}\.U.*shape"):
        load_pretrained(tmp_path / "ck")

    bad = dict(good)
    bad[f"{name}.C_indices"] = bad[f"{name}.C_indices"].to(torch.int32)
    save_file(bad, st, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="C_indices.*dtype"):
        load_pretrained(tmp_path / "ck")

    bad = dict(good)
    del bad["model.norm.weight"]
    save_file(bad, st, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        load_pretrained(tmp_path / "ck")

    bad = dict(good)
    bad["model.extra.weight"] = torch.zeros(2)
    save_file(bad, st, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected.*model.extra.weight"):
        load_pretrained(tmp_path / "ck")

    save_file(good, st, metadata={"format": "pt"})
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rocketkit"]["format_version"] = 42
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"):
        load_pretrained(tmp_path / "ck")
    del cfg["rocketkit"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rocketkit section"):
        load_pretrained(tmp_path / "ck")


def test_save_requires_applied_allocation(tiny_llama, tiny_ids, tmp_path):
    from rocketkit.allocate import allocate
    from rocketkit.checkpoint import save_compressed
    from rocketkit.profile import profile_model

    prof = profile_model(tiny_llama, tiny_ids, crs=(0.5,), kss=(1.0,), progress=False)
    alloc = allocate(prof, 0.3, buckets=1000)
    with pytest.raises(ValueError, match="not a FactorizedLinear"):
        save_compressed(tiny_llama, None, alloc, tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()


def test_apply_rejects_foreign_allocation(tiny_model_factory, tiny_ids):
    from rocketkit.allocate import allocate
    from rocketkit.apply import apply_allocation
    from rocketkit.profile import profile_model

    prof = profile_model(tiny_model_factory("llama"), tiny_ids, crs=(0.5,), kss=(1.0,), progress=False)
    other = tiny_model_factory("llama", intermediate_size=96)
    with pytest.raises(ValueError, match="mlp"):
        apply_allocation(other, tiny_ids, allocate(prof, 0.3, buckets=1000), progress=False)
    assert not any(isinstance(m, FactorizedLinear) for m in other.modules())
    assert isinstance(other.model.layers[0].mlp.up_proj, nn.Linear)

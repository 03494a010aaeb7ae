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


def _reference_forward(m, x):
    return x @ m.to_dense_weight().T + (m.bias if m.bias is not None else 0)


def test_cpu_forward_is_native_and_never_densifies(monkeypatch):
    import rocketkit._native as native
    import rocketkit.modules as modules

    m = random_factorized(37, 64, 19, 6, dtype=torch.float32)
    x = torch.randn(2, 5, 37, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _reference_forward(m, x)
    calls = []
    real = native._factorized_matmul_prevalidated
    monkeypatch.setattr(native, "_factorized_matmul_prevalidated", lambda *a: calls.append(1) or real(*a))

    def no_densify(*a, **kw):
        raise AssertionError("the forward densified C")

    monkeypatch.setattr(modules, "_dense_C", no_densify)
    monkeypatch.setattr(torch, "sparse_csr_tensor", no_densify)
    with torch.no_grad():
        y = m(x)
    with torch.inference_mode():
        yi = m(x)
    assert len(calls) == 2 and y.shape == (2, 5, 64)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yi, ref, rtol=1e-5, atol=1e-5)
    assert m(torch.zeros(0, 37)).shape == (0, 64)


def test_index_check_follows_updates():
    m = random_factorized(16, 24, 8, 3)
    x = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        m(x)
        key = m._checked_key
        m(x)
        assert m._checked_key == key  # validated once, not per call
        m.C_values.mul_(2.0)
        torch.testing.assert_close(m(x), _reference_forward(m, x), rtol=0, atol=1e-12)
        good = m.C_indices.clone()
        m.C_indices[1, 5] = 8  # in place, out of range: caught before the kernel reads it
        with pytest.raises(ValueError, match=r"C_indices must be in \[0, 8\), found values in \[0, 8\]"):
            m(x)
        m.C_indices.copy_(good)
        m(x)
        m.C_indices = torch.full_like(good, -1)  # a replaced tensor is checked again
        with pytest.raises(ValueError, match="C_indices must be in"):
            m(x)
        m.C_indices = good
        m.U = nn.Parameter(m.U[:, :4].clone())  # a narrower U makes k smaller
        with pytest.raises(ValueError, match=r"C_indices must be in \[0, 4\)"):
            m(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_autograd_all_dtypes_and_repeated_rows(dtype):
    g = torch.Generator().manual_seed(7)
    d1, d2, k, s = 23, 41, 9, 4
    idx = torch.randint(0, k, (s, d2), generator=g)  # repeated rows in a column add up
    m = FactorizedLinear.from_factors(torch.randn(d1, k, generator=g), torch.randn(s, d2, generator=g), idx,
                                      bias=torch.randn(d2, generator=g), dtype=dtype)
    x = torch.randn(3, d1, generator=g).to(dtype).requires_grad_()
    w = torch.randn(3, d2, generator=g)
    y = m(x)
    assert y.dtype == dtype
    (y.float() * w).sum().backward()
    U, V, b = (p.detach().double().requires_grad_() for p in (m.U, m.C_values, m.bias))
    x2 = x.detach().double().requires_grad_()
    C = torch.zeros(k, d2, dtype=torch.float64).scatter_add(0, idx, V)
    yr = x2 @ U @ C + b
    (yr * w.double()).sum().backward()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]  # output rounding only
    scale = lambda r: max(1.0, float(r.detach().abs().max()))  # noqa: E731
    torch.testing.assert_close(y.detach().double(), yr.detach(), rtol=0, atol=tol * scale(yr))
    for got, ref in ((x.grad, x2.grad), (m.U.grad, U.grad), (m.C_values.grad, V.grad), (m.bias.grad, b.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol * scale(ref))


def test_torch_path_matches_native(monkeypatch):
    """The non-CPU path (torch matmul + CSR), forced on the CPU, gives the native path's values and grads."""
    m = random_factorized(37, 64, 19, 6)
    x = torch.randn(4, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    results = []
    for native in (True, False):
        monkeypatch.setattr(FactorizedLinear, "_uses_native", lambda self, x, native=native: native)
        m.zero_grad()
        x.grad = None
        y = m(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), m.U.grad.clone(), m.C_values.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


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
    assert section["format_version"] == 2 and len(section["layers"]) == len(applied)
    assert cfg["quantization_config"] == {"quant_method": "rocketkit", "format_version": 2}
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
    assert not loaded.training and all(rec["dtype"] == "float32" for rec in section["layers"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_ids).logits, model(tiny_ids).logits, rtol=1e-5, atol=1e-5)
    # generate() works and follows the in-memory model (greedy).
    prompt = tiny_ids[:2, :9]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(loaded.generate(prompt, **kw), model.generate(prompt, **kw), rtol=0, atol=0)
    l16 = load_pretrained(tmp_path / "ck", dtype="bfloat16")
    assert l16.get_submodule(next(iter(applied))).U.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(l16(tiny_ids).logits).all()


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
    cfg["rocketkit"]["format_version"] = 2
    cfg_path.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="quantization_config must be"):
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


# ---- corrupted, truncated and inconsistent checkpoints ----------------------------------------

@pytest.fixture
def saved_tiny(compressed_tiny, tmp_path):
    """(folder, model, applied names) of a saved tiny qwen2 checkpoint (q/k/v have biases)."""
    from rocketkit import save_compressed

    model, alloc, applied = compressed_tiny("qwen2")
    save_compressed(model, None, alloc, tmp_path / "ck", applied=applied, progress=False)
    return tmp_path / "ck", model, list(applied)


def _shard(folder, first_names):
    """Split model.safetensors into two shards (``first_names`` in the first) with an index."""
    from safetensors.torch import load_file, save_file

    st = folder / "model.safetensors"
    tensors = load_file(st)
    a = {k: v for k, v in tensors.items() if k in first_names}
    b = {k: v for k, v in tensors.items() if k not in first_names}
    save_file(a, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(b, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    st.unlink()
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_load_sharded_and_bad_index(saved_tiny, tiny_ids):
    from rocketkit import load_pretrained

    ck, model, names = saved_tiny
    weight_map = _shard(ck, {f"{names[0]}.U", "model.embed_tokens.weight"})
    loaded = load_pretrained(ck)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_ids).logits, model(tiny_ids).logits, rtol=1e-5, atol=1e-5)
    index = ck / "model.safetensors.index.json"

    def write_index(wm):
        index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))

    shard2 = ck / "model-00002-of-00002.safetensors"
    shard2.rename(ck / "moved.safetensors")
    with pytest.raises(ValueError, match=r"index\.json: lists shard 'model-00002-of-00002\.safetensors', which is missing"):
        load_pretrained(ck)
    (ck / "moved.safetensors").rename(shard2)
    cases = [
        ({**weight_map, "model.norm.weight": "../elsewhere.safetensors"}, "not a file name in the folder"),
        ({k: v for k, v in weight_map.items() if k != "model.norm.weight"}, r"'model\.norm\.weight' is not in .*index\.json"),
        ({**weight_map, f"{names[0]}.U": "model-00002-of-00002.safetensors"}, r"is mapped to model-00002-of-00002"),
        ({**weight_map, "model.ghost.weight": "model-00001-of-00002.safetensors"}, r"in no shard's header: \['model\.ghost\.weight'\]"),
    ]
    for wm, msg in cases:
        write_index(wm)
        with pytest.raises(ValueError, match=msg):
            load_pretrained(ck)
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r'index\.json: no "metadata" object'):
        load_pretrained(ck)
    index.write_text('{"weight_map": {')
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON"):
        load_pretrained(ck)
    write_index(weight_map)
    load_pretrained(ck)


def test_load_truncated_and_garbage_files(saved_tiny):
    from rocketkit import load_pretrained

    ck, model, names = saved_tiny
    st = ck / "model.safetensors"
    good = st.read_bytes()
    for cut, msg in [(len(good) - 100, "runs past the end of the file"), (20, "runs past the end of the file"),
                     (5, "shorter than the 8-byte header length"), (0, "shorter than the 8-byte header length")]:
        st.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=rf"model\.safetensors: .*{msg}"):
            load_pretrained(ck)
    n = int.from_bytes(good[:8], "little")
    st.write_bytes(good[:8] + b"{" * n + good[8 + n:])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        load_pretrained(ck)
    st.write_bytes(good)

    cfg_path = ck / "config.json"
    cfg_text = cfg_path.read_text()
    cfg_path.write_text(cfg_text[: len(cfg_text) // 2])
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_pretrained(ck)
    cfg_path.write_bytes(b"\x00\xff garbage")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_pretrained(ck)
    cfg = json.loads(cfg_text)
    for change, msg in [
        ({"model_type": "no-such-model"}, r"config\.json: not a loadable transformers config"),
        ({"model_type": "gpt2"}, r"config\.json: \[block_linears\] no nn.Linear layer to compress in GPT2Block"),
    ]:
        cfg_path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=msg):
            load_pretrained(ck)
    rec = cfg["rocketkit"]["layers"][0]
    for change, msg in [
        ({"k": rec["d1"] + rec["d2"]}, r"needs 1 <= s <= k <= min\(d1, d2\)"),
        ({"s": "3"}, "malformed rocketkit layer record"),
        ({"index_dtype": "int32"}, "index_dtype int32 does not match k"),
        ({"dtype": "bfloat16"}, r"tensor '.*\.U' has dtype float32, expected bfloat16"),
        ({"d2": rec["d2"] - 1}, r"has shape .*, expected"),
        ({"name": "model.layers.0.mlp.nonexistent"}, "factorized layer 'model.layers.0.mlp.nonexistent' has no tensor"),
    ]:
        bad = json.loads(cfg_text)
        bad["rocketkit"]["layers"][0] = {**rec, **change}
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"{msg}"):
            load_pretrained(ck)
    bad = json.loads(cfg_text)
    bad["rocketkit"]["layers"].append(dict(rec))
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="is listed twice"):
        load_pretrained(ck)
    cfg_path.write_text(cfg_text)
    load_pretrained(ck)


def test_load_out_of_range_index_and_dtypes(saved_tiny):
    from safetensors.torch import load_file, save_file

    from rocketkit import load_pretrained

    ck, model, names = saved_tiny
    st = ck / "model.safetensors"
    good = load_file(st)
    k = model.get_submodule(names[0]).k
    for bad_value in (k, -1, 32767):
        bad = dict(good)
        bad[f"{names[0]}.C_indices"] = good[f"{names[0]}.C_indices"].clone()
        bad[f"{names[0]}.C_indices"][-1, -1] = bad_value
        save_file(bad, st, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{names[0]}\.C_indices' has indices in .* outside \[0, {k}\)"):
            load_pretrained(ck)
    for key, t, msg in [
        (f"{names[0]}.C_values", good[f"{names[0]}.C_values"].to(torch.int32), "C_values' has dtype int32, expected float32"),
        (f"{names[0]}.bias", good[f"{names[0]}.bias"][:-1].contiguous(), r"bias' has shape"),
        ("model.embed_tokens.weight", good["model.embed_tokens.weight"].to(torch.int64), "dtype int64, expected float32"),
        (f"{names[0]}.weight", torch.zeros(2, 2), "also has a dense weight"),
    ]:
        save_file({**good, key: t}, st, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=msg):
            load_pretrained(ck)
    save_file(good, st, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="dtype must be"):
        load_pretrained(ck, dtype=torch.int8)
    assert load_pretrained(ck, dtype=torch.float16).get_submodule(names[0]).U.dtype == torch.float16


# ---- dense export and sizes -----------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_export_dense_logits_match(compressed_tiny, tiny_ids, tmp_path, tie):
    from transformers import AutoModelForCausalLM

    from rocketkit import save_compressed
    from rocketkit.checkpoint import export_dense

    model, alloc, applied = compressed_tiny("qwen2", tie_word_embeddings=tie)
    save_compressed(model, None, alloc, tmp_path / "ck", applied=applied, progress=False)
    res = export_dense(tmp_path / "ck", tmp_path / "dense", progress=False)
    assert res["merged_layers"] == len(applied) and res["files"] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "dense"]  # no temp folder left behind
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "rocketkit" not in cfg
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, FactorizedLinear) for m in dense.modules())
    for name in applied:
        lin = dense.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        torch.testing.assert_close(lin.weight, model.get_submodule(name).to_dense_weight(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(dense(tiny_ids).logits, model(tiny_ids).logits, rtol=1e-5, atol=1e-5)

    # Sharded and in another dtype: still a plain checkpoint.
    res = export_dense(tmp_path / "ck", tmp_path / "dense16", dtype="bfloat16", max_shard_bytes=40_000, progress=False)
    assert len(res["files"]) > 1 and (tmp_path / "dense16" / "model.safetensors.index.json").is_file()
    d16 = AutoModelForCausalLM.from_pretrained(tmp_path / "dense16", dtype=torch.bfloat16).eval()
    assert d16.get_submodule(next(iter(applied))).weight.dtype == torch.bfloat16
    with torch.no_grad():
        ref = model(tiny_ids).logits
        torch.testing.assert_close(d16(tiny_ids).logits.float(), ref, rtol=0, atol=0.05 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="exists"):
        export_dense(tmp_path / "ck", tmp_path / "dense", progress=False)


def test_export_dense_cli_and_bad_source(saved_tiny, tmp_path, capsys):
    from rocketkit.cli import main

    ck, model, names = saved_tiny
    assert main(["export-dense", str(ck), str(tmp_path / "d"), "--no-progress"]) == 0
    assert "factorized layers merged" in capsys.readouterr().out
    assert (tmp_path / "d" / "model.safetensors").is_file()
    st = ck / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-10])
    assert main(["export-dense", str(ck), str(tmp_path / "d2"), "--no-progress"]) == 2
    assert "runs past the end of the file" in capsys.readouterr().err
    assert not (tmp_path / "d2").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_info_bytes_params_and_ratio(saved_tiny, capsys):
    from safetensors import safe_open

    from rocketkit.checkpoint import checkpoint_info
    from rocketkit.cli import main

    ck, model, names = saved_tiny
    info = checkpoint_info(ck)
    by_kind = {"U": 0, "C_values": 0, "C_indices": 0, "dense": 0}
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            kind = key.rsplit(".", 1)[1] if key.rsplit(".", 1)[0] in names and key.endswith(("U", "C_values", "C_indices")) else "dense"
            by_kind[kind] += t.numel() * t.element_size()
    assert {k: info["bytes"][k] for k in by_kind} == by_kind
    assert info["bytes"]["C_indices"] == sum(2 * model.get_submodule(n).s * model.get_submodule(n).out_features for n in names)
    assert info["bytes"]["safetensors_total"] == (ck / "model.safetensors").stat().st_size
    assert info["bytes"]["safetensors_headers"] == info["bytes"]["safetensors_total"] - sum(by_kind.values())
    dense_params = sum(p.numel() for p in model.parameters())  # tied weights counted once, as stored
    fact = [model.get_submodule(n) for n in names]
    original = dense_params - sum(m.U.numel() + m.C_values.numel() for m in fact) + sum(m.in_features * m.out_features for m in fact)
    assert info["params"]["total"] == dense_params and info["original"]["params"] == original
    assert info["original"]["tensor_bytes"] == 4 * original
    assert info["ratio"]["tensor_bytes_vs_original"] == pytest.approx(sum(by_kind.values()) / (4 * original))
    assert info["ratio"]["params_vs_original"] < 1
    assert main(["info", str(ck)]) == 0
    text = capsys.readouterr().out
    assert "original at the same dtype" in text and "bytes C indices" in text


@pytest.mark.slow
def test_smollm2_40_percent_smaller_on_disk(smollm2, tmp_path):
    """SmolLM2 at 40% removed (reduced grid, few calibration tokens) against the original saved at the same dtype."""
    import copy

    from rocketkit.checkpoint import checkpoint_info
    from rocketkit.models import LoadedModel
    from rocketkit.pipeline import compress

    original = tmp_path / "original"
    smollm2.model.save_pretrained(original)
    dtype = next(smollm2.model.parameters()).dtype
    lm = LoadedModel(copy.deepcopy(smollm2.model), smollm2.tokenizer, smollm2.source)
    # One BLAS/torch thread: multi-threaded OpenBLAS slows down tenfold on a busy machine.
    s = compress(lm, 0.4, calib_tokens=64, seq_len=64, out_dir=tmp_path / "ck", progress=False,
                 crs=(0.4, 0.6), kss=(2.0,), buckets=5000, num_threads=1)
    assert s["achieved_ratio"] >= 0.4
    info = checkpoint_info(tmp_path / "ck")
    assert info["dtypes"] == [str(dtype).replace("torch.", "")]
    orig_bytes = sum(p.stat().st_size for p in original.glob("*.safetensors"))
    assert info["bytes"]["safetensors_total"] < orig_bytes
    assert info["bytes"]["safetensors_total"] < 0.85 * orig_bytes  # well below, indices included
    # The original's size that info derives from the headers is the one save_pretrained writes.
    assert abs(info["original"]["tensor_bytes"] - orig_bytes) < 1e5

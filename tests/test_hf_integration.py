"""rocketkit checkpoints through transformers' own API: from_pretrained (rocketkit's quantizer),
save_pretrained round trips, generate(), refusals (no `import rocketkit`, format_version 1, tensors
that disagree with the config), and the model card."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rocketkit.modules import FactorizedLinear



@pytest.fixture
def saved(tiny_model_factory, tiny_ids, tmp_path):
    """``build(family)`` -> (folder, in-memory compressed model, factorized names)."""
    from rocketkit.allocate import allocate
    from rocketkit.apply import apply_allocation
    from rocketkit.checkpoint import save_compressed
    from rocketkit.profile import profile_model

    def build(family="llama", **overrides):
        model = tiny_model_factory(family, **overrides)
        prof = profile_model(model, tiny_ids, crs=(0.2, 0.5), kss=(1.0, 2.0), progress=False)
        alloc = allocate(prof, 0.3, "weight", buckets=5000)
        applied = apply_allocation(model, tiny_ids, alloc, progress=False)
        folder = tmp_path / f"ck-{family}"
        save_compressed(model, None, alloc, folder, applied=applied, progress=False)
        return folder, model, list(applied)

    return build


def _from_pretrained(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_from_pretrained_builds_factorized_layers(saved, tiny_ids, family):
    from rocketkit import load_pretrained

    folder, model, names = saved(family)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "rocketkit", "format_version": 2}
    m = _from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    assert type(m) is type(model) and not m.training
    state = m.state_dict()
    for n in names:
        assert isinstance(m.get_submodule(n), FactorizedLinear)
        assert f"{n}.weight" not in state  # no dense weight anywhere
    ref = load_pretrained(folder)
    with torch.no_grad():
        logits = m(tiny_ids).logits
        assert torch.equal(logits, ref(tiny_ids).logits)  # the alias is the same load
        torch.testing.assert_close(logits, model(tiny_ids).logits, rtol=0, atol=0)
    assert m.config.quantization_config.to_dict() == cfg["quantization_config"]


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_round_trip(saved, tiny_ids, tmp_path, tie):
    folder, model, names = saved("llama", tie_word_embeddings=tie)
    m = _from_pretrained(folder)
    m.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "rocketkit"
    assert cfg["rocketkit"] == json.loads((folder / "config.json").read_text())["rocketkit"]
    assert "import rocketkit" in cfg["transformers_weights"]  # the guard survives save_pretrained
    m2 = _from_pretrained(tmp_path / "again")
    a, b = _state(m), _state(m2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert all(isinstance(m2.get_submodule(n), FactorizedLinear) for n in names)
    if tie:
        assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(m(tiny_ids).logits, m2(tiny_ids).logits)
    m16 = _from_pretrained(tmp_path / "again", dtype=torch.bfloat16)
    assert m16.get_submodule(names[0]).U.dtype == torch.bfloat16
    assert m16.get_submodule(names[0]).C_indices.dtype == torch.int16


def _load_without_rocketkit(path):
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "sys.exit('loaded' if 'rocketkit' not in sys.modules else 'rocketkit was imported')")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)


def test_without_import_rocketkit_loading_fails(saved, tmp_path):
    folder, _, _ = saved("qwen2")
    _from_pretrained(folder).save_pretrained(tmp_path / "again")
    for path in (folder, tmp_path / "again"):
        r = _load_without_rocketkit(path)
        assert r.returncode != 0 and "import rocketkit" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("code", [
    "import rocketkit; rocketkit.load_pretrained(sys.argv[1])",
    "import rocketkit; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])",
    "from transformers import AutoModelForCausalLM; import rocketkit; AutoModelForCausalLM.from_pretrained(sys.argv[1])",
])
def test_fresh_process_any_import_order(saved, code):
    """`import rocketkit` does not import transformers; the quantizer registers whenever it does."""
    import rocketkit
    # the child imports the rocketkit this process tested (CI: the installed one, whose _C is built)
    where = {**os.environ, "PYTHONPATH": str(Path(rocketkit.__file__).resolve().parents[1])}
    folder, _, names = saved("llama")
    check = (f"import sys; {code}; "
             "assert 'rocketkit' in __import__('transformers.quantizers.auto', fromlist=['x']).AUTO_QUANTIZER_MAPPING")
    r = subprocess.run([sys.executable, "-c", check, str(folder)], capture_output=True, text=True, timeout=300,
                       env={**where, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-c", "import sys, rocketkit; assert 'transformers' not in sys.modules"],
                       capture_output=True, text=True, timeout=120, env=where)
    assert r.returncode == 0, r.stderr[-3000:]


def _make_format_1(folder):
    """Rewrite a checkpoint's config.json as format_version 1 wrote it; returns the version 2 config."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    v1 = {k: v for k, v in json.loads(cfg_path.read_text()).items() if k not in ("quantization_config", "transformers_weights")}
    v1["rocketkit"]["format_version"] = 1
    cfg_path.write_text(json.dumps(v1))
    return cfg


def test_format_version_1_refused_then_upgraded(saved, tiny_ids, capsys):
    from rocketkit import load_pretrained
    from rocketkit.checkpoint import checkpoint_info
    from rocketkit.cli import main

    folder, model, _ = saved("llama")
    cfg_path = folder / "config.json"
    cfg = _make_format_1(folder)
    for load in (load_pretrained, checkpoint_info):
        with pytest.raises(ValueError, match=r"config\.json: rocketkit format_version 1 .*`rocketkit upgrade "):
            load(folder)
    assert main(["upgrade", str(folder)]) == 0
    assert "upgraded from format_version 1 to format_version 2" in capsys.readouterr().out
    assert json.loads(cfg_path.read_text()) == cfg
    assert main(["upgrade", str(folder)]) == 0 and "already format_version 2" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(_from_pretrained(folder)(tiny_ids).logits, model(tiny_ids).logits)


_FORMAT_1_REFUSED = r"config\.json: rocketkit format_version 1 .*`rocketkit upgrade .*ck-llama"


def test_format_version_1_refused_by_from_pretrained(saved, tiny_model_factory, tiny_ids, tmp_path):
    """A version 1 folder has no quantization_config, so the quantizer never sees it: from_pretrained
    itself refuses it (through AutoModel*, a model class, a subfolder) and leaves other models alone."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    folder, _, _ = saved("llama")
    _make_format_1(folder)
    for load in (lambda: AutoModelForCausalLM.from_pretrained(folder),
                 lambda: AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu"),
                 lambda: LlamaForCausalLM.from_pretrained(folder),  # no config object: config.json is read
                 lambda: LlamaForCausalLM.from_pretrained(folder, config=AutoConfig.from_pretrained(folder)),
                 lambda: AutoModelForCausalLM.from_pretrained(folder.parent, subfolder=folder.name)):
        with pytest.raises(ValueError, match=_FORMAT_1_REFUSED):
            load()
    dense = tiny_model_factory("llama")
    dense.save_pretrained(tmp_path / "dense")
    for load in (AutoModelForCausalLM.from_pretrained, LlamaForCausalLM.from_pretrained):
        m = load(tmp_path / "dense")
        with torch.no_grad():
            assert torch.equal(m(tiny_ids).logits, dense(tiny_ids).logits)


@pytest.mark.parametrize("code", [
    "import rocketkit; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])",
    "from transformers import AutoModelForCausalLM; import rocketkit; AutoModelForCausalLM.from_pretrained(sys.argv[1])",
    "import transformers.modeling_utils, rocketkit; from transformers import LlamaForCausalLM; "
    "LlamaForCausalLM.from_pretrained(sys.argv[1])",
])
def test_format_version_1_refused_in_fresh_process_any_import_order(saved, code):
    import rocketkit

    where = {**os.environ, "PYTHONPATH": str(Path(rocketkit.__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    folder, _, _ = saved("llama")
    _make_format_1(folder)
    r = subprocess.run([sys.executable, "-c", f"import sys; {code}", str(folder)], capture_output=True, text=True,
                       timeout=300, env=where)
    assert r.returncode != 0 and "ValueError" in r.stderr, r.stderr[-3000:]
    assert re.search(_FORMAT_1_REFUSED, r.stderr), r.stderr[-3000:]


def test_from_pretrained_refuses_tensors_that_disagree(saved, tmp_path):
    """The hostile cases through transformers' own entry point: ValueError naming file and tensor."""
    from safetensors.torch import load_file, save_file

    folder, model, names = saved("qwen2")
    st = folder / "model.safetensors"
    good = load_file(st)
    name = names[0]
    k = model.get_submodule(name).k
    wrong_idx = good[f"{name}.C_indices"].clone()
    wrong_idx[0, 0] = k
    cases = [
        ({k_: v for k_, v in good.items() if k_ != f"{name}.C_indices"},
         rf"factorized layer '{name}' has no tensor '{name}\.C_indices'"),
        ({**good, f"{name}.U": good[f"{name}.U"][:, :-1].contiguous()}, rf"model\.safetensors: tensor '{name}\.U' has shape"),
        ({**good, f"{name}.C_indices": wrong_idx},
         rf"model\.safetensors: tensor '{name}\.C_indices' has indices in \[0, {k}\], outside \[0, {k}\)"),
        ({**good, "model.layers.0.mlp.extra": torch.zeros(3)}, r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra'"),
    ]
    for tensors, msg in cases:
        save_file(tensors, st, metadata={"format": "pt"})
        for kw in ({}, {"dtype": torch.float32}):
            with pytest.raises(ValueError, match=msg):
                _from_pretrained(folder, **kw)
    save_file(good, st, metadata={"format": "pt"})
    data = st.read_bytes()
    st.write_bytes(data[:-64])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '.*' runs past the end of the file"):
        _from_pretrained(folder, dtype=torch.float32)
    st.write_bytes(data)
    _from_pretrained(folder)


def test_generate_matches_in_memory_model(saved):
    folder, model, _ = saved("llama")
    m = _from_pretrained(folder)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 256, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # left padding of different lengths
    ids[1, :2], mask[1, :2] = 0, 0
    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=20, temperature=0.9)):
        out = []
        for mod in (model, m):
            torch.manual_seed(123)
            out.append(mod.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, use_cache=True, **kw))
        assert out[0].shape == (3, 19) and torch.equal(out[0], out[1]), kw
    torch.manual_seed(0)
    no_cache = m.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, do_sample=False, use_cache=False)
    torch.manual_seed(0)
    cached = m.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, do_sample=False, use_cache=True)
    assert torch.equal(no_cache, cached)


def test_model_card(saved, capsys):
    import yaml

    from rocketkit.cli import main
    from rocketkit.modelcard import write_model_card

    folder, _, names = saved("llama")
    summary = {"model": "smollm2", "model_type": "llama", "ratio": 0.4, "achieved_ratio": 0.3991, "cost": "weight",
               "alpha": None, "method": "mckp", "weighting": "params", "power": 2, "params_before": 1000,
               "params_after": 700, "layers": 14, "factorized_layers": len(names), "calib_tokens": 4096,
               "eval_tokens": 2048, "ppl_before": 12.5, "ppl_after": 20.25}
    path = write_model_card(folder, summary, "rocketkit compress smollm2 --ratio 0.4")
    text = path.read_text()
    head = yaml.safe_load(text.split("---\n")[1])
    assert head["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and head["library_name"] == "rocketkit"
    assert head["pipeline_tag"] == "text-generation" and "rocketkit" in head["tags"]
    for part in ("(2,048 tokens) | 12.500 → 20.250", "rocketkit compress smollm2 --ratio 0.4", "import rocketkit",
                 "| cr | layers |", "weight, minimise Σ params·e^2 (mckp)"):
        assert part in text, part
    n_layers = sum(int(line.rsplit("|", 2)[1]) for line in text.splitlines() if line.startswith("| 0."))
    assert n_layers == len(names)
    assert main(["info", str(folder)]) == 0
    assert "model card" in capsys.readouterr().out
    local = write_model_card(folder, {**summary, "model": "/some/local/folder", "ppl_before": None, "ppl_after": None}, "x")
    text = local.read_text()
    assert "base_model" not in text and "not measured" in text


@pytest.mark.skipif(__import__("importlib").util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_eval_cli_harness_on_factorized_smollm2(smollm2, tmp_path, capsys):
    """`rocketkit eval` (lm-evaluation-harness's HFLM on the from_pretrained model, shipped data) gives
    the accuracies of rocketkit's own scorer on the same examples."""
    import copy

    from transformers import AutoTokenizer

    from rocketkit.cli import main
    from rocketkit.models import LoadedModel
    from rocketkit.pipeline import compress
    from rocketkit.tasks import evaluate_tasks

    lm = LoadedModel(copy.deepcopy(smollm2.model), smollm2.tokenizer, smollm2.source)
    compress(lm, 0.4, calib_tokens=64, seq_len=64, out_dir=tmp_path / "ck", progress=False,
             crs=(0.4, 0.6), kss=(2.0,), buckets=5000, num_threads=1)
    assert "library_name: rocketkit" in (tmp_path / "ck" / "README.md").read_text()  # compress wrote the card
    assert main(["eval", str(tmp_path / "ck"), "--tasks", "piqa,arc_easy", "--limit", "4", "--batch-size", "4",
                 "--out", str(tmp_path / "results.json")]) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "results.json").read_text())
    model = _from_pretrained(tmp_path / "ck")
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    # the harness's limit scores the head of each task; rocketkit's default subset is spread over it
    ours = evaluate_tasks(model, AutoTokenizer.from_pretrained(tmp_path / "ck"), ["piqa", "arc_easy"], limit=4,
                          batch_size=4, progress=False, subset="head")
    for task in ("piqa", "arc_easy"):
        theirs = doc["results"][f"rocketkit_local_{task}"]["acc,none"]
        print(f"{task}: rocketkit eval acc {theirs}, rocketkit scorer acc {ours[task]['value']} "
              f"(n={ours[task]['n']}, outcomes {ours[task]['outcomes']})")
        assert theirs == pytest.approx(ours[task]["value"], abs=1e-12), task

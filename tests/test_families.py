"""Decoder-only families beyond Llama: tiny random models from transformers configs, each compressed
end to end at 30% on the reduced grid, reloaded (compressed and dense-exported) and checked; plus the
walk's refusals (Conv1D, shared weights), MoE experts held as modules or as 3-D tensors (per-expert
Grams, unrouted experts, streaming), and the README's untested list."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from conftest import make_tiny_ids, make_tiny_model
from rocketkit import load_pretrained
from rocketkit.arch.moe import LinearExperts
from rocketkit.evaluate import perplexity
from rocketkit.models import LoadedModel, block_linears, block_skipped, causal_lm_model_types, walk_model
from rocketkit.pipeline import compress, format_summary
from rocketkit.profile import REDUCED_CRS, REDUCED_KS

RATIO = 0.3
_VOCAB = 128
_SHAPE = dict(vocab_size=_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=0, eos_token_id=0)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)

# model_type -> (config overrides, what the family exercises). Calibration sequences are 24 tokens
# long, so an 8-token window really slides.
FAMILIES = {
    "llama": ({}, "reference"),
    "mistral": (dict(sliding_window=8), "sliding-window attention"),
    "qwen2": ({}, "q/k/v biases"),
    "qwen3": ({}, "q/k norms"),
    "gemma": (dict(tie_word_embeddings=True, head_dim=8), "tied embeddings"),
    "gemma2": (dict(sliding_window=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, head_dim=8),
               "soft-capped logits, alternating sliding/global attention, tied embeddings"),
    "phi3": ({}, "fused qkv_proj and gate_up_proj"),
    "gpt_neox": ({}, "fused query_key_value, parallel residual"),
    "falcon": (dict(new_decoder_architecture=True, num_kv_heads=2), "fused query_key_value"),
    "olmo2": ({}, ""),
    "granite": ({}, "residual/logit multipliers"),
    "stablelm": ({}, "partial rotary"),
    "starcoder2": (dict(sliding_window=8), "sliding-window attention, biased MLP"),
    "cohere": ({}, "parallel attention/MLP, logit scale"),
    "phi": ({}, "parallel attention/MLP"),
    "gemma3_text": (dict(sliding_window=8, head_dim=8), "local (sliding) and global layers, tied embeddings"),
    "cohere2": ({}, "sliding-window layers"),
    "smollm3": ({}, "layers without rotary embedding"),
    "bloom": (dict(n_head=4, n_layer=2), "fused query_key_value, ALiBi"),
    "mpt": (dict(d_model=32, n_heads=4, n_layers=2), "fused Wqkv, ALiBi"),
    "gpt_bigcode": (dict(n_embd=32, n_head=4, n_layer=2), "fused c_attn, multi-query attention"),
    "codegen": (dict(n_embd=32, n_head=4, n_layer=2, rotary_dim=4), "fused qkv_proj"),
    "opt": (dict(ffn_dim=48, word_embed_proj_dim=32), "learned positions"),
    "mixtral": (dict(num_local_experts=4, **_MOE), "MoE: 3-D experts as per-expert linears, router kept dense"),
    "qwen2_moe": (dict(num_experts=4, shared_expert_intermediate_size=24, **_MOE),
                  "MoE with a shared expert: 3-D experts as per-expert linears, router kept dense"),
    "qwen3_moe": (dict(num_experts=4, **_MOE), "MoE: 3-D experts as per-expert linears, router kept dense"),
    "olmoe": (dict(num_experts=4, **_MOE), "MoE: 3-D experts as per-expert linears, router kept dense"),
    "gpt_oss": (dict(num_local_experts=4, head_dim=8, sliding_window=8, **_MOE),
                "MoE with transposed, biased, interleaved gate/up experts; attention sinks, sliding layers"),
    "jamba": (dict(num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                   expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=4,
                   use_mamba_kernels=False),
              "hybrid: Mamba and attention blocks of different types, one MoE block"),
    "bamba": (dict(mamba_d_state=4, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_chunk_size=8,
                   attn_layer_indices=[1]), "hybrid Mamba-2/attention; blocks return (hidden, attn) tuples"),
}
# Families whose blocks hold weights the walk leaves alone (Mamba's Conv1d, Mamba's dt_proj, which its
# code uses as a bare weight and so no calibration token reaches).
PARTIAL = ("jamba", "bamba")
# Families whose experts are 3-D tensors (arch.moe converts them to per-expert linears); their routers
# stay dense and are reported.
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "jamba")
TESTED = tuple(FAMILIES)


def _tiny(family: str, seed: int = 0) -> nn.Module:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[family](**{**_SHAPE, **FAMILIES[family][0]})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _ids(n_seq, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, _VOCAB, (n_seq, seq_len), generator=g)


@pytest.mark.parametrize("family", TESTED)
def test_family_compresses_and_round_trips(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from rocketkit.checkpoint import export_dense

    model = _tiny(family)
    calib, probe = _ids(4, 24, seed=1), _ids(2, 24, seed=2)
    ppl_dense = perplexity(model, probe, progress=False)
    out = tmp_path / "ck"
    with warnings.catch_warnings():
        # A layer kept dense warns; the summary's not_compressed is checked below instead.
        warnings.filterwarnings("ignore", message=r".* is kept dense: ", category=RuntimeWarning)
        s = compress(LoadedModel(model, None, f"tiny-{family}"), RATIO, out_dir=out, calib_ids=calib, eval_ids=probe,
                     progress=False, buckets=2000, crs=REDUCED_CRS, kss=REDUCED_KS)
    # The streamed block-by-block perplexity runs each family's own head (final norm, soft-capping).
    assert abs(s["ppl_before"] - ppl_dense) <= 1e-6 * ppl_dense
    ppl_after = perplexity(model, probe, progress=False)
    assert abs(s["ppl_after"] - ppl_after) <= 1e-6 * ppl_after
    assert s["model_type"] == family
    assert RATIO <= s["achieved_ratio"] <= RATIO + 0.05, s["achieved_ratio"]
    assert s["compressible_params_after"] <= (1 - RATIO) * s["compressible_params_before"]
    assert s["factorized_layers"] > 0 and s["max_profiled_vs_applied_error"] <= 1e-6
    text = format_summary(s)
    left = s["not_compressed"]
    if family in PARTIAL:
        assert left and "weights not compressed" in text
        assert all(re.search(r"not an nn\.Linear|^kept dense: |^router \(kept dense", why) for why in left.values()), left
    if family in MOE:
        # Every 3-D experts tensor became per-expert linears; only routers (and unrouted experts) stay.
        routers = [n for n, why in left.items() if why.startswith("router (kept dense")]
        assert routers and not any(re.search(r"experts\.(gate_up|up|down)_proj$", n) for n in left), left
        if family not in PARTIAL:
            assert all(n in routers or why.startswith("kept dense: no finite calibration token")
                       for n, why in left.items()), left
        section = json.loads((out / "config.json").read_text())["rocketkit"]
        experts = [r["name"] for r in section["experts"]]
        assert experts and all(isinstance(model.get_submodule(n), LinearExperts) for n in experts)
        factorized_experts = [r["name"] for r in section["layers"] if re.search(r"\.experts\.\d+\.(gate_up|up|down)_proj$", r["name"])]
        assert factorized_experts, section["layers"]
    elif family not in PARTIAL:
        assert left == {}
    with torch.no_grad():
        compressed = model(probe).logits  # the in-memory model is compressed in place
        reloaded = load_pretrained(out)(probe).logits
        assert torch.equal(reloaded, compressed)
        dense_dir = export_dense(out, tmp_path / "dense", progress=False)["path"]
        dense = AutoModelForCausalLM.from_pretrained(dense_dir, local_files_only=True).eval()
        torch.testing.assert_close(dense(probe).logits, compressed, rtol=1e-4, atol=1e-4)
    if family in MOE:
        # The export holds the family's own 3-D experts tensors, which plain transformers loaded above.
        assert not any(isinstance(m, LinearExperts) for m in dense.modules())
        with safe_open(str(Path(dense_dir) / "model.safetensors"), framework="pt") as f:
            for name in experts:
                assert len(f.get_slice(f"{name}.down_proj").get_shape()) == 3


def test_gpt2_conv1d_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rocketkit.models import check_architecture

    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    with pytest.raises(ValueError, match=r"no nn.Linear layer to compress in GPT2Block; not handled: attn\.c_attn\.weight \(2-D parameter of Conv1D"):
        check_architecture(config)
    with pytest.raises(ValueError, match="Conv1D"):
        compress(LoadedModel(GPT2LMHeadModel(config), None, "gpt2"), RATIO, out_dir=tmp_path / "o", calib_ids=_ids(1, 8, 0))


def test_encoder_decoder_refused():
    from transformers import T5Config

    from rocketkit.models import check_architecture

    with pytest.raises(ValueError, match=r"\[check_architecture\] model_type 't5' is an encoder-decoder"):
        check_architecture(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64))


def test_weights_shared_across_blocks_refused(tmp_path):
    model = make_tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is the same tensor as model\.layers\.1\.mlp\.up_proj\.weight"):
        compress(LoadedModel(model, None, "tied"), RATIO, out_dir=tmp_path / "o", calib_ids=make_tiny_ids())


class _Expert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _ModuleMoE(nn.Module):
    """Top-1 MoE whose experts are modules (as in remote-code Mixtral): ``gate`` routes; expert 2 is
    made unreachable so that no calibration token reaches it."""

    def __init__(self, d, f, n=3):
        super().__init__()
        self.gate = nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList(_Expert(d, f) for _ in range(n))

    def route(self, x):
        logits = self.gate(x)
        logits[..., 2] = -torch.inf
        return logits.argmax(-1)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = self.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx = torch.nonzero(choice == e).squeeze(1)
            if idx.numel():
                out[idx] = expert(flat[idx])
        return out.reshape(x.shape)


def test_module_experts_get_routed_grams():
    from rocketkit.calibrate import BlockStream
    from rocketkit.models import not_compressed
    from rocketkit.profile import Profile, profile_block

    model = make_tiny_model("llama")
    torch.manual_seed(3)
    for layer in model.model.layers:
        layer.mlp = _ModuleMoE(64, 24)
    block = model.model.layers[0]
    assert "mlp.gate" not in block_linears(block) and block_skipped(block) == {"mlp.gate": "router (kept dense)"}
    ids = make_tiny_ids(3, 11, seed=4)
    inputs = []
    stream = BlockStream(model, ids, batch_size=2)
    handle = block.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().reshape(-1, 64).double()))
    cb = stream.run(0)
    handle.remove()
    x = torch.cat(inputs)
    choice = block.mlp.route(x.float())
    for e in range(2):
        routed = x[choice == e]
        g = cb.grams[f"mlp.experts.{e}.gate_proj"]
        assert g is cb.grams[f"mlp.experts.{e}.up_proj"] and g.tokens == routed.shape[0]
        assert routed.shape[0] > 0
        torch.testing.assert_close(g.H, routed.T @ routed, rtol=1e-12, atol=1e-12)
    assert cb.grams["mlp.experts.2.gate_proj"].tokens == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = profile_block(cb, crs=(0.3,), kss=(1.0,))
    for rel in ("gate_proj", "up_proj", "down_proj"):
        lp = layers[f"model.layers.0.mlp.experts.2.{rel}"]
        assert "no finite calibration token" in lp.dense_reason and len(lp.grid) == 0
        assert len(layers[f"model.layers.0.mlp.experts.0.{rel}"].grid) == 1
    assert any("experts.2" in str(w.message) for w in caught)
    stream.close()
    left = not_compressed(walk_model(model), Profile(layers=layers))["not_compressed"]
    assert left["model.layers.1.mlp.gate"] == "router (kept dense)"
    assert left["model.layers.0.mlp.experts.2.down_proj"].startswith("kept dense: no finite calibration token")
    assert not any(".experts.0." in name for name in left)


def test_walk_finds_todays_smollm2_layers():
    """The generic walk on a Llama-shaped model finds exactly the layers today's table named."""
    model = make_tiny_model("llama")
    walk = walk_model(model)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert walk.prefix == "model.layers" and [list(d) for d in walk.linears] == [names, names]
    assert walk.skipped_by_name() == {}


def test_readme_lists_every_untested_architecture():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- untested-architectures:start -->(.*?)<!-- untested-architectures:end -->", readme, re.S)
    assert m, "README.md lacks the untested-architectures list"
    listed = set(re.findall(r"`([A-Za-z0-9_\-]+)`", m.group(1)))
    expected = set(causal_lm_model_types()) - set(TESTED)
    assert listed == expected, f"README untested list: missing {sorted(expected - listed)}, stale {sorted(listed - expected)}"
    m = re.search(r"<!-- tested-architectures:start -->(.*?)<!-- tested-architectures:end -->", readme, re.S)
    assert m and set(re.findall(r"`([A-Za-z0-9_\-]+)`", m.group(1))) == set(TESTED)


@pytest.mark.parametrize("family", MOE)
def test_tensor_experts_conversion_keeps_logits(family):
    """Per-expert linears (arch.moe) compute what the family's 3-D experts module computes."""
    from rocketkit.models import prepare_model

    model = _tiny(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" not in name:
                p.normal_(0, 0.1)  # biases (gpt_oss) and sinks start at zero
        ids = _ids(2, 19, seed=5)
        before = model(ids).logits
        names = prepare_model(model)
        assert names and all(isinstance(model.get_submodule(n), LinearExperts) for n in names)
        assert prepare_model(model) == []  # idempotent
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-6)


def _mixtral_with_unrouted_expert():
    """Tiny top-1 Mixtral whose expert 3 no token can reach: router rows 0 and 1 are opposite, so one
    of their logits is positive whenever the other is negative, and row 3 is zero."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING["mixtral"](**{**_SHAPE, **FAMILIES["mixtral"][0], "num_experts_per_tok": 1})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w[1] = -w[0]
            w[3] = 0
    return model


def test_tensor_experts_get_routed_grams_and_unrouted_ones_stay_dense(tmp_path):
    from transformers import AutoModelForCausalLM

    from rocketkit.calibrate import BlockStream
    from rocketkit.checkpoint import export_dense

    model = _mixtral_with_unrouted_expert()
    calib, probe = _ids(4, 24, seed=1), _ids(2, 24, seed=2)
    routed = []
    block = model.model.layers[0]
    stream = BlockStream(model, calib, batch_size=2)  # its capture runs block 0 once: hook after it
    handle = block.mlp.gate.register_forward_hook(
        lambda m, args, out: routed.append((args[0].detach().reshape(-1, 32).double(), out[2])))
    cb = stream.run(0)
    handle.remove()
    stream.close()
    x = torch.cat([r[0] for r in routed])
    choice = torch.cat([r[1] for r in routed])[:, 0]
    for e in range(4):
        g = cb.grams[f"mlp.experts.{e}.gate_up_proj"]
        mine = x[choice == e]
        assert g.tokens == mine.shape[0] and (g.tokens > 0) == (e != 3)
        torch.testing.assert_close(g.H, mine.T @ mine, rtol=1e-12, atol=1e-12)
    assert "mlp.gate.weight" not in {n for n in cb.linears}  # the router is no linear of the walk
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* is kept dense: ", category=RuntimeWarning)
        s = compress(LoadedModel(model, None, "tiny-mixtral-unrouted"), RATIO, out_dir=tmp_path / "ck", calib_ids=calib,
                     eval_ids=probe, progress=False, buckets=2000, crs=REDUCED_CRS, kss=REDUCED_KS)
    left = s["not_compressed"]
    for i in range(2):
        assert left[f"model.layers.{i}.mlp.gate.weight"].startswith("router (kept dense")
        for proj in ("gate_up_proj", "down_proj"):
            assert left[f"model.layers.{i}.mlp.experts.3.{proj}"].startswith("kept dense: no finite calibration token")
    assert not any(".experts.0." in n for n in left)
    with torch.no_grad():
        compressed = model(probe).logits
        # transformers' own entry point (rocketkit's quantizer), and a save_pretrained of what it loaded:
        # Mixtral's checkpoint renamings (block_sparse_moe, experts.*.w1) apply neither way.
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", local_files_only=True).eval()
        assert torch.equal(loaded(probe).logits, compressed)
        loaded.save_pretrained(tmp_path / "resaved")
        assert torch.equal(load_pretrained(tmp_path / "resaved")(probe).logits, compressed)
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rocketkit"]["experts"] = cfg["rocketkit"]["experts"][:1]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rocketkit experts \['model\.layers\.0\.mlp\.experts'\] do not match"):
        load_pretrained(tmp_path / "ck")
    cfg["rocketkit"]["experts"][0]["projections"] = ["w1", "w2"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="malformed rocketkit experts record"):
        load_pretrained(tmp_path / "ck")
        dense_dir = export_dense(tmp_path / "ck", tmp_path / "dense", progress=False)["path"]
        dense = AutoModelForCausalLM.from_pretrained(dense_dir, local_files_only=True).eval()
        torch.testing.assert_close(dense(probe).logits, compressed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,names", [("qwen3_moe", "own"), ("mixtral", "hub"), ("qwen2_moe", "hub")])
def test_tensor_experts_stream_from_a_folder(family, names, tmp_path):
    """A folder compresses streamed (each expert's weights cut from the 3-D tensors as its block is
    materialized) as it does in memory, whether it holds the model's own 3-D experts tensors or the
    hub's per-expert names that transformers merges while loading (save_pretrained writes those:
    Mixtral's block_sparse_moe.experts.<e>.w1/w2/w3, Qwen's experts.<e>.gate_proj/up_proj/down_proj)."""
    from safetensors.torch import save_file

    model = _tiny(family)
    folder = tmp_path / "src"
    if names == "hub":
        model.save_pretrained(folder)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            assert not any(k.endswith("experts.down_proj") for k in f.keys())
    else:
        folder.mkdir()
        model.config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
                   not model.config.tie_word_embeddings}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    calib, probe = _ids(4, 24, seed=1), _ids(2, 24, seed=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* is kept dense: ", category=RuntimeWarning)
        streamed = compress(str(folder), RATIO, out_dir=tmp_path / "streamed", calib_ids=calib, eval_ids=probe,
                            progress=False, buckets=2000, crs=REDUCED_CRS, kss=REDUCED_KS)
        in_memory = compress(LoadedModel(model, None, f"tiny-{family}"), RATIO, out_dir=tmp_path / "mem", calib_ids=calib,
                             eval_ids=probe, progress=False, buckets=2000, crs=REDUCED_CRS, kss=REDUCED_KS)
    assert streamed["factorized_layers"] == in_memory["factorized_layers"] > 0
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "streamed")(probe).logits, load_pretrained(tmp_path / "mem")(probe).logits)

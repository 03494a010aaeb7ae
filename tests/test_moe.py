"""arch.moe on single experts modules: every layout flag of transformers' ``@use_experts_implementation``
contract (ungated, transposed, biased, interleaved gate/up, post-expert norm) gives the same output
as the family's own module, and a module it cannot convert is reported with the reason."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from rocketkit.arch.moe import LinearExperts, convert_tensor_experts, linear_experts_from


def _text_config(model_type: str, **kw):
    from transformers import CONFIG_MAPPING

    if model_type == "muse_spark":  # a multimodal config: its text part holds the experts' sizes
        from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig

        return MuseSparkTextConfig(**kw)
    return CONFIG_MAPPING[model_type](**kw)


_SIZES = dict(hidden_size=32, moe_intermediate_size=24, intermediate_size=24, num_experts_per_tok=2)
# (model_type, experts class, config keywords, what the class exercises)
CASES = [
    ("mixtral", "MixtralExperts", dict(num_local_experts=5), "gated, concatenated gate/up"),
    ("nemotron_h", "NemotronHExperts", dict(n_routed_experts=5), "ungated (up_proj, act_fn)"),
    ("gpt_oss", "GptOssExperts", dict(num_local_experts=5), "transposed, biased, interleaved gate/up, clamped gate"),
    ("muse_spark", "MuseSparkExperts", dict(num_experts=5, num_local_experts=5, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=8), "post-expert norm"),
]


def _experts(model_type: str, cls_name: str, kw: dict) -> nn.Module:
    config = _text_config(model_type, **{**_SIZES, **kw})
    config._experts_implementation = "eager"
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    torch.manual_seed(0)
    experts = getattr(module, cls_name)(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    return experts


@pytest.mark.parametrize("model_type,cls_name,kw,what", CASES, ids=[c[0] for c in CASES])
def test_linear_experts_match_the_family_module(model_type, cls_name, kw, what):
    experts = _experts(model_type, cls_name, kw)
    E, transposed = experts.down_proj.shape[0], experts.is_transposed
    H = experts.down_proj.shape[2] if transposed else experts.down_proj.shape[1]
    g = torch.Generator().manual_seed(1)
    n = 19
    x = torch.randn(n, H, generator=g)
    top_k = torch.stack([torch.randperm(E - 1, generator=g)[:2] for _ in range(n)])  # expert E-1 unrouted
    weights = torch.rand(n, 2, generator=g)
    with torch.no_grad():
        want = experts(x, top_k, weights)
        first = experts.gate_up_proj if experts.has_gate else experts.up_proj
        converted = linear_experts_from(experts)
        assert converted.num_experts == E and not any(p.ndim == 3 for p in converted.parameters())
        e1 = converted.expert(1).first.weight
        torch.testing.assert_close(e1, first[1].T if transposed else first[1], rtol=0, atol=0)
        calls = []
        handle = converted.expert(E - 1).first.register_forward_pre_hook(lambda m, a: calls.append(a))
        got = converted(x, top_k, weights)
        handle.remove()
    assert calls == []  # an expert no token is routed to never runs (so its Gram stays empty)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_unconvertible_experts_are_reported_with_the_reason():
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from rocketkit.models import block_skipped

    config = CONFIG_MAPPING["mixtral"](vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                                       num_experts_per_tok=1)
    model = AutoModelForCausalLM.from_config(config)
    model.model.layers[0].mlp.experts.scale = nn.Parameter(torch.ones(3, 16))
    assert convert_tensor_experts(model) == []
    assert not any(isinstance(m, LinearExperts) for m in model.modules())
    why = block_skipped(model.model.layers[0])["mlp.experts.gate_up_proj"]
    assert why.startswith("3-D parameter of MixtralExperts (3x48x16), not an nn.Linear") and \
        "holds weights besides its projections: scale" in why

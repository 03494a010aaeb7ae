"""Mixture-of-experts blocks whose experts are 3-D tensors, as one nn.Linear per expert projection.

transformers (5.x) stores the routed experts of Mixtral, Qwen2/3-MoE, OLMoE and most MoE families in
one module per block holding ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) as bare
parameters, not nn.Linear, so the generic walk cannot give each expert its own Gram. Every such
class is built with transformers' ``@use_experts_implementation`` decorator, which fixes a contract
that this adapter reads instead of a per-family table: the instance states ``has_gate``,
``has_bias``, ``is_transposed`` (weights stored (E, in, out)), ``is_concatenated`` and
``has_post_expert_norm``, gates with ``_apply_gate`` (or applies ``act_fn`` when ungated), and its
forward is ``forward(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K))`` with every
registered implementation computing, per routed (token, slot),
``down(gate(gate_up(x))) [-> post_expert_norm] * weight`` summed over the slots
(``transformers.integrations.moe.batched_mm_experts_forward``).

:func:`convert_tensor_experts` replaces each such module by :class:`LinearExperts`, whose children
``0 .. E-1`` each hold the expert's ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` as
nn.Linear. The walk then finds them like any linear; an expert's linears are called only on the
tokens routed to it, so their Grams are that expert's, and an expert no calibration token reaches
gets an empty Gram (the profile keeps it dense and says so). The router is untouched (dense).
State-dict names become ``<experts>.<e>.gate_up_proj.weight``; :func:`tensor_layout` gives back the
family's own 3-D names and layout (``export_dense`` writes those).
"""

from __future__ import annotations

import torch
from torch import nn

_CONTRACT = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm", "_apply_gate")


def is_tensor_experts(module: nn.Module) -> bool:
    """A module built by transformers' ``@use_experts_implementation`` (the contract above) whose
    expert weights are still 3-D parameters."""
    return (not isinstance(module, LinearExperts) and all(hasattr(module, a) for a in _CONTRACT)
            and isinstance(module._parameters.get("down_proj"), nn.Parameter) and module.down_proj.ndim == 3)


def projection_names(has_gate: bool) -> tuple[str, str]:
    """The two projections of an expert: (input projection, ``down_proj``)."""
    return ("gate_up_proj" if has_gate else "up_proj", "down_proj")


class ExpertLinears(nn.Module):
    """One expert's projections as nn.Linear: ``gate_up_proj`` (or ``up_proj``) and ``down_proj``."""

    def __init__(self, first_name: str, first: nn.Linear, down: nn.Linear):
        super().__init__()
        self.first_name = first_name
        self.add_module(first_name, first)
        self.down_proj = down

    @property
    def first(self) -> nn.Linear:
        return self._modules[self.first_name]


class LinearExperts(nn.Module):
    """The experts of one MoE block as per-expert nn.Linear layers, with the forward contract of the
    transformers experts module it replaces (see the module docstring). Children ``"0" .. "E-1"``
    are :class:`ExpertLinears`; a ``post_expert_norm`` is kept as it was. The replaced module stays
    behind (not registered, its 3-D weights dropped) for its gating function and activation."""

    def __init__(self, source: nn.Module, experts: list[ExpertLinears]):
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.num_experts = len(experts)
        self.source_class = type(source).__name__
        self.has_gate, self.has_bias = bool(source.has_gate), bool(source.has_bias)
        self.is_transposed = bool(source.is_transposed)
        self.has_post_expert_norm = bool(source.has_post_expert_norm)
        if self.has_post_expert_norm:
            self.post_expert_norm = source.post_expert_norm
        self._source = (source,)  # a tuple, so that it is not registered as a child

    def expert(self, e: int) -> ExpertLinears:
        return self._modules[str(e)]

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        source = self._source[0]
        return source._apply_gate(h) if self.has_gate else source.act_fn(h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # The order of transformers' eager loop (experts in index order, index_add_ per expert), so the
        # result matches the replaced module's to fp rounding.
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:  # expert-parallel sentinel
                continue
            slot, token = torch.where(mask[e])
            expert = self.expert(e)
            h = expert.down_proj(self._gate(expert.first(hidden_states[token])))
            if self.has_post_expert_norm:
                h = self.post_expert_norm(h)
            h = h * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, from={self.source_class}, transposed={self.is_transposed}"


def _refuse(name: str, module: nn.Module, why: str):
    raise ValueError(f"[convert_tensor_experts] {name} ({type(module).__name__}): {why}; its experts cannot be "
                     "turned into per-expert linears")


def linear_experts_from(module: nn.Module, name: str = "experts") -> LinearExperts:
    """A :class:`LinearExperts` holding copies of ``module``'s weights (so converting needs this one
    module's weights twice, briefly; its 3-D tensors are freed once no one else holds them).
    ``module`` keeps its gating code but loses its 3-D parameters. A ValueError names the module when
    its layout is not the contract's (expert parallelism on, a missing projection, other weights)."""
    first_name, down_name = projection_names(bool(module.has_gate))
    weights = [first_name, down_name]
    biases = [f"{p}_bias" for p in weights] if module.has_bias else []
    if getattr(module, "_is_expert_parallel", False):
        _refuse(name, module, "expert parallelism is on")
    for p in weights + biases:
        if not isinstance(module._parameters.get(p), nn.Parameter):
            _refuse(name, module, f"no parameter {p!r}")
    own = set(weights + biases)
    extra = [n for n, p in module._parameters.items() if p is not None and n not in own]
    extra += [f"{c}.{n}" for c, child in module.named_children() if c != "post_expert_norm"
              for n, _ in child.named_parameters()]
    extra += [n for n, b in module.named_buffers()]
    if extra:
        _refuse(name, module, f"holds weights besides its projections: {', '.join(extra)}")
    W1, W2 = module._parameters[first_name], module._parameters[down_name]
    if W1.ndim != 3 or W2.ndim != 3 or W1.shape[0] != W2.shape[0]:
        _refuse(name, module, f"{first_name} {tuple(W1.shape)} and {down_name} {tuple(W2.shape)} are not (E, ., .) alike")
    transposed = bool(module.is_transposed)

    def linear(W: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
        # Copies, not views: each expert's tensors own their storage, so savers do not take views of one
        # 3-D tensor for tied weights, and a factorized expert frees its dense weight.
        w = W.detach().T if transposed else W.detach()  # (out, in)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=W.dtype)
        lin.weight = nn.Parameter(w.clone(memory_format=torch.contiguous_format), requires_grad=W.requires_grad)
        if b is not None:
            lin.bias = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        return lin

    B1 = module._parameters.get(f"{first_name}_bias") if module.has_bias else None
    B2 = module._parameters.get(f"{down_name}_bias") if module.has_bias else None
    experts = [ExpertLinears(first_name, linear(W1[e], None if B1 is None else B1[e]),
                             linear(W2[e], None if B2 is None else B2[e])) for e in range(W1.shape[0])]
    for p in own:
        del module._parameters[p]
    return LinearExperts(module, experts).train(module.training)


NOT_CONVERTED_ATTR = "_rocketkit_experts_not_converted"


def convert_tensor_experts(model: nn.Module) -> list[str]:
    """Replace, in place, every 3-D experts module of ``model`` (see :func:`is_tensor_experts`) by
    a :class:`LinearExperts` with the same forward; returns their qualified names, in module order.
    Works on the meta device too (no memory). A model without such modules is left as it is. A
    module that cannot be converted stays as it is, with the reason in its ``NOT_CONVERTED_ATTR``
    (the walk reports its 3-D weights as not compressed, with that reason)."""
    names = []
    for name in [n for n, m in model.named_modules() if is_tensor_experts(m)]:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        try:
            converted = linear_experts_from(owner.get_submodule(child), name)
        except ValueError as e:
            setattr(owner.get_submodule(child), NOT_CONVERTED_ATTR, str(e))
            continue
        setattr(owner, child, converted)
        names.append(name)
    return names


def experts_record(name: str, module: LinearExperts) -> dict:
    """config.json's record of one converted experts module (checkpoint.rocketkit_section)."""
    return {"name": name, "class": module.source_class, "num_experts": module.num_experts,
            "projections": list(projection_names(module.has_gate)), "transposed": module.is_transposed,
            "bias": module.has_bias}


def experts_records(model: nn.Module) -> list[dict]:
    return [experts_record(n, m) for n, m in model.named_modules() if isinstance(m, LinearExperts)]


def tensor_layout(record: dict) -> dict[str, tuple[list[str], str, bool]]:
    """For one experts record: family tensor name -> (the per-expert tensor names it stacks, in
    expert order, which of weight/bias they are, whether each is transposed before stacking)."""
    x, E = record["name"], record["num_experts"]
    out = {}
    for p in record["projections"]:
        out[f"{x}.{p}"] = ([f"{x}.{e}.{p}.weight" for e in range(E)], "weight", bool(record["transposed"]))
        if record["bias"]:
            out[f"{x}.{p}_bias"] = ([f"{x}.{e}.{p}.bias" for e in range(E)], "bias", False)
    return out

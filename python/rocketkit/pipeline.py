"""One-call compression, streamed one decoder block at a time, resumable and shardable over ranks.

``compress`` never materializes the whole model (a model folder is opened with
``models.open_streaming``; an in-memory ``LoadedModel`` is walked the same way):

1. **Pass 1 (profile).** For each block: load its weights, run the calibration activations through
   it while hooks accumulate its fp64 Grams, whiten, score every candidate of every linear, write
   the block's profile atomically, keep the block's dense outputs as the next block's inputs, free
   the block.
2. **Allocate.** The MCKP needs only the profiles; rank 0 solves it and broadcasts the result.
3. **Pass 2 (factorize).** Stream again; the same inputs give the same Grams, hence the same
   whitening, so each layer's applied error equals its profiled one (the summary reports the
   largest difference and a warning fires above 1e-6). Each finished block is written as its own
   safetensors shard, atomically.
4. **Assemble.** The non-block weights, config.json with the rocketkit section, the shard index,
   tokenizer, profile, allocation, summary and run log are written, and the folder is renamed to
   ``out_dir`` in one step: the output appears only when complete.

Peak memory is one block, its Grams, one whitening and the calibration activations, whatever the
depth. Everything goes through a work folder (``rocketkit.workdir``, ``OUT.partial/`` by default)
whose manifest fingerprints everything that determines the result; rerunning the same call after a
crash, ``kill -9`` or Ctrl-C continues from the last completed block and writes a bit-identical
checkpoint (torch and OpenBLAS threads are pinned to a recorded count). Under torchrun the blocks
are shared among the ranks (``rocketkit.distributed``). Per stage and per block, time and peak
memory go to ``runlog.json`` in the output.

Tests may set ``ROCKETKIT_TEST_PAUSE_AT`` to ``profile:<i>`` (after block i's profile is written),
``factorize:<i>`` (block i factorized, its shard not yet written) or ``assemble`` (everything
written but the final rename): the process then sleeps there, to be killed or interrupted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from rocketkit.allocate import (DEFAULT_POWER, DEFAULT_WEIGHTING, METHODS, allocate, check_cost, check_power,
                                check_ratio, check_weighting)
from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS

# Largest |profiled − applied| error (relative, fp64) that the guarantee allows.
PROFILE_APPLY_TOLERANCE = 1e-6
_PAUSE_ENV = "ROCKETKIT_TEST_PAUSE_AT"


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _pause_point(event: str) -> None:
    if os.environ.get(_PAUSE_ENV) == event:
        print(f"rocketkit: paused at {event} ({_PAUSE_ENV})", file=sys.stderr, flush=True)
        time.sleep(3600)


def _check_ids(name: str, ids, vocab: int | None) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D (n_seq, seq_len) tensor of token ids, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must hold integer token ids, got {ids.dtype}")
    ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        raise ValueError(f"{name} holds token ids outside [0, {vocab})")
    return ids


def _ids_fingerprint(ids: torch.Tensor | None) -> dict | None:
    from rocketkit.workdir import tensor_sha256

    return None if ids is None else {"shape": list(ids.shape), "sha256": tensor_sha256(ids)}


@torch.no_grad()
def blockwise_perplexity(model, input_ids, batch_size: int = 4, device="cpu", replace=None, progress: bool = False,
                         desc: str = "perplexity") -> float:
    """Perplexity computed one decoder block at a time (a streaming model is never materialized);
    the same definition as ``evaluate.perplexity``. ``replace(i, block)`` may return
    {relative name: module} to use in block i instead of its own modules (a compressed block)."""
    from tqdm.auto import tqdm

    from rocketkit.calibrate import BlockStream
    from rocketkit.apply import _set_submodule

    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (n_seq, seq_len) with seq_len >= 2, got {tuple(input_ids.shape)}")
    stream = BlockStream(model, input_ids, batch_size=batch_size, device=device)
    parent = model.get_submodule(stream.path.rpartition(".")[0])
    norm, lm_head = getattr(parent, "norm", None), model.get_output_embeddings()
    if norm is None or lm_head is None:
        raise ValueError(f"{type(model).__name__}: no final norm / output embedding to compute logits with")
    try:
        for i in tqdm(range(len(stream)), desc=desc, unit="block", disable=not progress):
            originals = {}

            def swap_in(block, i=i):
                for rel, module in (replace(i, block) if replace is not None else {}).items():
                    originals[rel] = block.get_submodule(rel)
                    _set_submodule(block, rel, module)

            try:
                stream.run(i, grams_for=None, before=swap_in)
            finally:
                for rel, module in originals.items():
                    _set_submodule(stream.blocks[i], rel, module)
                stream.release(i)
        total, count = 0.0, 0
        for b, hidden in enumerate(stream.hidden):
            batch = input_ids[b * batch_size : (b + 1) * batch_size].to(device)
            logits = lm_head(norm(hidden))
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
            )
            total += float(nll.double())
            count += targets.numel()
            del logits
    finally:
        stream.close()
    return math.exp(total / count)


class _CompressRun:
    """The state of one compress call on one rank (see the module docstring)."""

    def __init__(self, comm, device, threads: int, **opts):
        from rocketkit import has_cuda

        self.comm, self.device, self.threads = comm, device, threads
        self.o = opts
        self.times: dict[str, float] = {}
        self.progress = bool(opts["progress"]) and comm.is_main
        # Profiles are scored on the GPU when the Grams live there and the core was built with CUDA;
        # the choice is part of the fingerprint (the two agree to ~1e-12, not bit for bit).
        self.errors_backend = "cuda" if device.type == "cuda" and has_cuda() else "cpu"

    # ---------------------------------------------------------------- setup

    def open_model(self) -> None:
        from rocketkit.models import LoadedModel, find_decoder_blocks, open_streaming
        from rocketkit.workdir import model_folder_fingerprint, model_memory_fingerprint

        t = time.perf_counter()
        spec = self.o["model_spec"]
        if isinstance(spec, LoadedModel):
            loaded, self.spec_name = spec, spec.source
            src = Path(spec.source) if spec.source else None
            self.source_folder = src if src is not None and (src / "config.json").is_file() else None
            self.in_memory = True
        else:
            loaded = open_streaming(str(spec), dtype=self.o["dtype"], device=self.device,
                                    trust_remote_code=self.o["trust_remote_code"])
            self.spec_name, self.source_folder, self.in_memory = str(spec), Path(loaded.source), False
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        from rocketkit.models import check_model_type

        check_model_type(self.model.config)
        self.prefix, self.blocks = find_decoder_blocks(self.model)
        self.n_blocks = len(self.blocks)
        floats = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
        self.dtype = floats[0] if floats else torch.float32
        vocab = getattr(self.model.config, "vocab_size", None)
        calib_ids, eval_ids = self.o["calib_ids"], self.o["eval_ids"]
        if calib_ids is None or (eval_ids is None and self.o["eval_tokens"] > 0):
            if self.tokenizer is None:
                raise ValueError(f"{self.spec_name}: the model has no tokenizer, so calibration text cannot be "
                                 "tokenized; pass calib_ids (and eval_ids) as token id tensors")
        if calib_ids is None:
            from rocketkit.data import calibration_ids

            calib_ids = calibration_ids(self.tokenizer, self.o["calib_tokens"], seq_len=self.o["seq_len"], seed=self.o["seed"])
        if eval_ids is None and self.o["eval_tokens"] > 0:
            from rocketkit.data import heldout_ids

            eval_ids = heldout_ids(self.tokenizer, self.o["eval_tokens"], seq_len=self.o["seq_len"])
        self.calib_ids = _check_ids("calib_ids", calib_ids, vocab)
        self.eval_ids = None if eval_ids is None else _check_ids("eval_ids", eval_ids, vocab)
        if self.eval_ids is not None and self.eval_ids.shape[1] < 2:
            raise ValueError("eval_ids need seq_len >= 2")
        model_fp = model_memory_fingerprint(self.model) if self.in_memory else model_folder_fingerprint(self.source_folder)
        self.times["load"] = time.perf_counter() - t
        self.open_seconds = self.times["load"]
        self.model_fp = model_fp

    def fingerprint(self) -> dict:
        import rocketkit
        from rocketkit.allocate import ALLOCATION_FORMAT_VERSION
        from rocketkit.checkpoint import CHECKPOINT_FORMAT_VERSION
        from rocketkit.profile import PROFILE_FORMAT_VERSION
        from rocketkit.workdir import WORK_FORMAT_VERSION

        o = self.o
        numerics = {"dtype": str(self.dtype).replace("torch.", ""), "device": self.device.type,
                    "batch_size": o["batch_size"], "threads": self.threads, "errors_backend": self.errors_backend}
        if self.device.type == "cuda":  # another GPU model may round differently
            numerics["gpu"] = torch.cuda.get_device_name(self.device)
        return {
            "rocketkit": {"version": rocketkit.__version__, "work_format": WORK_FORMAT_VERSION,
                          "checkpoint_format": CHECKPOINT_FORMAT_VERSION, "profile_format": PROFILE_FORMAT_VERSION,
                          "allocation_format": ALLOCATION_FORMAT_VERSION},
            "model": self.model_fp,
            "calibration": {**_ids_fingerprint(self.calib_ids), "seed": o["seed"]},
            "evaluation": _ids_fingerprint(self.eval_ids),
            "grid": {"crs": list(o["crs"]), "kss": list(o["kss"])},
            "allocation": {"ratio": o["ratio"], "cost": o["cost"], "alpha": o["alpha"], "method": o["method"],
                           "weighting": o["weighting"], "power": o["power"], "buckets": o["buckets"]},
            "numerics": numerics,
        }

    def open_work(self) -> None:
        from rocketkit.runlog import RunLog, vm_hwm_bytes
        from rocketkit.workdir import WorkDir, default_work_dir

        out_dir = Path(self.o["out_dir"])
        root = Path(self.o["work_dir"]) if self.o["work_dir"] is not None else default_work_dir(out_dir)
        r, o = root.resolve(), out_dir.resolve()
        if r == o or o in r.parents or r in o.parents:
            raise ValueError(f"work_dir must differ from out_dir and neither may contain the other ({root}, {out_dir})")
        self.wd = WorkDir(root, self.n_blocks)
        fp = self.fingerprint()
        if self.comm.is_main:
            self.attempt = self.wd.open(fp, self.o["restart"])
        self.comm.barrier()
        if not self.comm.is_main:
            self.attempt = self.wd.check_visible(fp, self.comm.rank)
        self.log = RunLog(self.wd.attempt_log_path(self.attempt, self.comm.rank), model=self.spec_name,
                          attempt=self.attempt, rank=self.comm.rank, world=self.comm.world, device=str(self.device),
                          threads=self.threads, n_blocks=self.n_blocks, calib_tokens=int(self.calib_ids.numel()),
                          errors_backend=self.errors_backend)
        self.log.data["stages"].append({"name": "load", "seconds": self.open_seconds, "peak_rss_bytes": vm_hwm_bytes(),
                                        "rss_peak_scope": "process"})
        self.log.save()

    # ---------------------------------------------------------------- streaming passes

    def _linears(self, i: int) -> list[str]:
        from rocketkit.models import block_linears

        return list(block_linears(self.blocks[i]))

    def _stream_pass(self, stage: str, desc: str, todo: list[int], grams_for, work) -> None:
        """Run blocks 0..max(todo) over the calibration batches; ``work(i, cb, entry)`` on those in
        todo. Each block's run-log entry says whether it did ``stage`` or only its forward."""
        from tqdm.auto import tqdm

        from rocketkit.calibrate import BlockStream

        if not todo:
            return
        todo_set, last = set(todo), max(todo)
        stream = BlockStream(self.model, self.calib_ids, batch_size=self.o["batch_size"], device=self.device)
        self.bar = tqdm(total=last + 1, desc=desc, unit="block", disable=not self.progress)
        try:
            for i in range(last + 1):
                mine = i in todo_set
                with self.log.block(i, f"{self.prefix}.{i}", stage=stage, work=stage if mine else "forward") as e:
                    t = time.perf_counter()
                    if stream.streaming is not None:
                        stream.streaming.materialize_block(i)
                    e["load_s"] = time.perf_counter() - t
                    t = time.perf_counter()
                    cb = stream.run(i, grams_for=grams_for(i) if mine else None)
                    e["forward_s"] = time.perf_counter() - t
                    try:
                        if mine:
                            self.bar.set_postfix_str(cb.name)
                            work(i, cb, e)
                    finally:
                        del cb
                        stream.release(i)
                self.bar.update(1)
        finally:
            self.bar.close()
            stream.close()

    def profile_pass(self) -> None:
        from rocketkit.profile import Profile, profile_block, profile_meta

        if self.wd.allocation_path.is_file():
            return  # the allocation exists, so every profile did
        todo = [i for i in range(self.n_blocks) if self.comm.owns(i) and not self.wd.has_profile(i)]
        meta = profile_meta(self.model, self.calib_ids, self.o["crs"], self.o["kss"])

        def work(i, cb, e):
            t = time.perf_counter()
            layers = profile_block(cb, self.o["crs"], self.o["kss"], num_threads=self.threads,
                                   on_layer=lambda name: self.bar.set_postfix_str(name), free_grams=True,
                                   backend=self.errors_backend)
            e["profile_s"] = time.perf_counter() - t
            t = time.perf_counter()
            Profile(layers=layers, meta=meta).save(self.wd.profile_stem(i))
            e["write_s"] = time.perf_counter() - t
            e["layers"] = len(layers)
            _pause_point(f"profile:{i}")

        with self.log.stage("calibrate_profile", blocks_todo=len(todo)) as st:
            self._stream_pass("profile", "pass 1/2 profile", todo, lambda i: "all", work)
        self.times["calibrate_profile"] = st["seconds"]
        self.comm.barrier()

    def merged_profile(self):
        """All blocks' profiles read back (validated) and joined in block order."""
        from rocketkit.profile import Profile, profile_meta

        layers = {}
        for i in range(self.n_blocks):
            stem = self.wd.profile_stem(i)
            try:
                p = Profile.load(stem)
            except ValueError as e:
                raise ValueError(f"{e} (delete that block's profile files to recompute it, or pass --restart)") from None
            expected = [f"{self.prefix}.{i}.{rel}" for rel in self._linears(i)]
            if list(p.layers) != expected or list(p.crs) != list(self.o["crs"]) or list(p.kss) != list(self.o["kss"]):
                raise ValueError(f"{stem}.json: does not hold block {i}'s layers on this grid (pass --restart)")
            layers.update(p.layers)
        return Profile(layers=layers, meta=profile_meta(self.model, self.calib_ids, self.o["crs"], self.o["kss"]))

    def allocate_stage(self) -> None:
        from rocketkit.allocate import Allocation

        o = self.o
        with self.log.stage("allocate") as st:
            data = None
            if self.comm.is_main:
                # Read (and validate) every profile even when resuming past the allocation: a damaged
                # file is reported now, not after the second pass.
                self.profile = profile = self.merged_profile()
                st["layers"] = len(profile.layers)
                if not self.wd.allocation_path.is_file():
                    allocation = allocate(profile, o["ratio"], cost=o["cost"], alpha=o["alpha"], buckets=o["buckets"],
                                          weighting=o["weighting"], method=o["method"], power=o["power"])
                    allocation.save(self.wd.allocation_path)
                # Every rank (rank 0 included) uses the allocation as read back from its file, so a
                # resumed run and an uninterrupted one start pass 2 from the same bytes.
                data = json.dumps(Allocation.load(self.wd.allocation_path).to_json()).encode()
            data = self.comm.broadcast_bytes(data)
            self.allocation = Allocation.from_json(json.loads(data), where=str(self.wd.allocation_path))
        self.times["allocate"] = st["seconds"]
        expected = {f"{self.prefix}.{i}.{rel}" for i in range(self.n_blocks) for rel in self._linears(i)}
        if set(self.allocation.layers) != expected:
            raise ValueError(f"{self.wd.allocation_path}: its layers are not this model's (pass --restart)")

    def _decisions(self, i: int) -> dict:
        out = {}
        for rel in self._linears(i):
            d = self.allocation.layers[f"{self.prefix}.{i}.{rel}"]
            if not d.dense:
                out[rel] = d
        return out

    def factorize_pass(self) -> None:
        from rocketkit.apply import factorize_block
        from rocketkit.fileio import atomic_write_json
        from rocketkit.shards import block_tensors, write_shard

        todo = [i for i in range(self.n_blocks) if self.comm.owns(i) and not self.wd.has_block(i)]

        def work(i, cb, e):
            decisions = self._decisions(i)
            t = time.perf_counter()
            fact = factorize_block(cb, decisions, free_grams=True) if decisions else {}
            e["factorize_s"] = time.perf_counter() - t
            e["factorized_layers"] = len(fact)
            tensors = block_tensors(cb.block, cb.name, {rel: m for rel, (m, _) in fact.items()})
            _pause_point(f"factorize:{i}")
            t = time.perf_counter()
            rec = write_shard(self.wd.block_shard_path(i), tensors)
            rec["block"] = i
            rec["applied"] = {a.name: asdict(a) for _, a in fact.values()}
            del tensors, fact
            atomic_write_json(self.wd.block_record_path(i), rec)
            e["write_s"] = time.perf_counter() - t
            e["shard_bytes"] = rec["bytes"]

        with self.log.stage("factorize", blocks_todo=len(todo)) as st:
            self._stream_pass("factorize", "pass 2/2 factorize", todo, lambda i: list(self._decisions(i)), work)
        self.times["factorize"] = st["seconds"]
        self.comm.barrier()

    def block_records(self) -> list[dict]:
        from rocketkit.fileio import read_json
        from rocketkit.shards import shard_tensor_names

        records = []
        for i in range(self.n_blocks):
            path, shard = self.wd.block_record_path(i), self.wd.block_shard_path(i)
            if not self.wd.has_block(i):
                raise ValueError(f"{shard}: block {i}'s shard is missing or incomplete (rerun to resume)")
            rec = read_json(path)
            if shard_tensor_names(shard) != rec.get("tensors"):
                raise ValueError(f"{shard}: its tensors differ from {path.name}'s record (delete both to redo block {i})")
            records.append(rec)
        return records

    def _factorized_from_shard(self, i: int, folder: Path, shard_name: str) -> dict:
        from rocketkit.shards import load_factorized_block

        recs = {rel: asdict(d) for rel, d in self._decisions(i).items()}
        if not recs:
            return {}
        return load_factorized_block(folder / shard_name, f"{self.prefix}.{i}", recs, dtype=self.dtype, device=self.device)

    def evaluate_stage(self) -> None:
        from rocketkit.fileio import atomic_write_json, read_json

        self.ppl = (None, None)
        if self.eval_ids is None:
            return
        if self.comm.is_main:
            if self.wd.eval_path.is_file():
                doc = read_json(self.wd.eval_path)
                self.ppl = (doc["ppl_before"], doc["ppl_after"])
            else:
                bs = self.o["batch_size"]
                with self.log.stage("eval_before") as st:
                    before = blockwise_perplexity(self.model, self.eval_ids, bs, self.device, progress=self.progress,
                                                  desc="perplexity (dense)")
                self.times["eval_before"] = st["seconds"]
                with self.log.stage("eval_after") as st:
                    after = blockwise_perplexity(
                        self.model, self.eval_ids, bs, self.device, progress=self.progress, desc="perplexity (compressed)",
                        replace=lambda i, block: self._factorized_from_shard(i, self.wd.checkpoint, self.wd.shard_name(i + 1)),
                    )
                self.times["eval_after"] = st["seconds"]
                atomic_write_json(self.wd.eval_path, {"ppl_before": before, "ppl_after": after})
                self.ppl = (before, after)
        self.comm.barrier()

    # ---------------------------------------------------------------- assembly (rank 0)

    def assemble(self) -> dict | None:
        from rocketkit.apply import AppliedLayer
        from rocketkit.checkpoint import checkpoint_info, rocketkit_section
        from rocketkit.fileio import atomic_write_json
        from rocketkit.shards import (non_block_tensors, write_config, write_generation_config, write_index,
                                      write_shard, write_tokenizer)

        o, wd, ck = self.o, self.wd, self.wd.checkpoint
        with self.log.stage("save") as st:
            records = self.block_records()
            profile = self.profile
            profile.save(ck / "profile")
            self.allocation.save(ck / "allocation.json")
            rec0 = write_shard(ck / wd.shard_name(0), non_block_tensors(self.model, self.prefix))
            weight_map, total = {}, 0
            applied = {}
            for rec in [rec0, *records]:
                weight_map.update({name: rec["shard"] for name in rec["tensors"]})
                total += rec["tensor_bytes"]
                applied.update({n: AppliedLayer(**a) for n, a in rec.get("applied", {}).items()})
            missing = sorted(n for n, d in self.allocation.layers.items() if not d.dense and n not in applied)
            if missing:
                raise ValueError(f"{wd.blocks}: no factorization recorded for {missing[:5]} (pass --restart)")
            write_index(ck, weight_map, total)
            write_config(ck, self.model, rocketkit_section(self.allocation, applied), self.dtype)
            write_generation_config(ck, self.model, self.source_folder)
            write_tokenizer(ck, self.tokenizer, wd.root)
            info = checkpoint_info(ck)
            a = self.allocation
            max_diff = max((max(abs(x.e_weight - a.layers[n].e_weight), abs(x.e_output - a.layers[n].e_output))
                            for n, x in applied.items()), default=0.0)
            factorized = [d for d in a.layers.values() if not d.dense]
            params_before = _params(self.model)
            params_after = params_before - sum(d.d1 * d.d2 for d in factorized) + sum(d.params for d in factorized)
            summary = {
                "model": self.spec_name,
                "model_type": getattr(self.model.config, "model_type", None),
                "ratio": a.ratio, "cost": a.cost, "alpha": a.alpha, "method": a.method, "weighting": a.weighting,
                "power": a.power, "achieved_ratio": a.achieved_ratio,
                "compressible_params_before": a.dense_params, "compressible_params_after": a.params,
                "params_before": params_before, "params_after": params_after,
                "layers": len(a.layers), "factorized_layers": len(applied),
                "objective": a.objective, "lower_bound": a.lower_bound,
                "max_profiled_vs_applied_error": max_diff,
                "calib_tokens": int(self.calib_ids.numel()),
                "eval_tokens": int(self.eval_ids.numel()) if self.eval_ids is not None else 0,
                "grid": {"crs": list(profile.crs), "kss": list(profile.kss)},
                "bytes": info["bytes"],
                "ppl_before": self.ppl[0], "ppl_after": self.ppl[1],
                "blocks": self.n_blocks,
            }
            # No timings or paths in summary.json: reruns and resumed runs write identical files.
            atomic_write_json(ck / "summary.json", summary)
            from rocketkit.modelcard import write_model_card; write_model_card(ck, summary)  # noqa: E702
        self.times["save"] = st["seconds"]
        self.write_runlog(ck / "runlog.json")
        _pause_point("assemble")
        self.publish(ck, Path(o["out_dir"]))
        if max_diff > PROFILE_APPLY_TOLERANCE:
            warnings.warn(f"profiled and applied errors differ by up to {max_diff:.3g} (> {PROFILE_APPLY_TOLERANCE:g})",
                          RuntimeWarning, stacklevel=3)
        return summary

    def write_runlog(self, path: Path) -> None:
        """Every attempt's log of every rank, merged: what each stage and block cost."""
        from rocketkit.fileio import atomic_write_json, read_json

        attempts: dict[int, list] = {}
        for p in sorted(self.wd.attempts.glob("attempt-*-rank*.json")):
            doc = read_json(p)
            attempts.setdefault(int(doc["meta"]["attempt"]), []).append(doc)
        atomic_write_json(path, {
            "format": "rocketkit-runlog",
            "peak_rss_bytes": max((d.get("peak_rss_bytes", 0) for docs in attempts.values() for d in docs), default=0),
            "attempts": [{"attempt": k, "ranks": sorted(v, key=lambda d: d["meta"]["rank"])} for k, v in sorted(attempts.items())],
        })

    def publish(self, ck: Path, out_dir: Path) -> None:
        """Rename the finished folder to ``out_dir`` (replacing an existing one when overwriting),
        with SIGINT/SIGTERM held back so that no interrupt lands between the renames; then remove
        the work folder."""
        from rocketkit.fileio import replace_directory

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        blocked = {signal.SIGINT, signal.SIGTERM}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            if out_dir.exists() and not self.o["overwrite"]:
                raise ValueError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
            replace_directory(ck, out_dir)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.wd.release_lock()
        shutil.rmtree(self.wd.root, ignore_errors=True)

    def swap_in_memory_model(self) -> None:
        """An in-memory model ends up compressed in place, read back from the published shards."""
        from rocketkit.apply import _set_submodule

        out_dir = Path(self.o["out_dir"])
        for i in range(self.n_blocks):
            for rel, module in self._factorized_from_shard(i, out_dir, self.wd.shard_name(i + 1)).items():
                module.train(self.blocks[i].get_submodule(rel).training)
                _set_submodule(self.blocks[i], rel, module)

    def run(self) -> dict:
        self.open_model()
        self.open_work()
        self.profile_pass()
        self.allocate_stage()
        self.factorize_pass()
        self.evaluate_stage()
        summary = self.assemble() if self.comm.is_main else None
        data = self.comm.broadcast_bytes(json.dumps(summary).encode() if self.comm.is_main else None)
        summary = json.loads(data)
        if self.in_memory:
            self.swap_in_memory_model()
        summary["out_dir"] = str(self.o["out_dir"])
        summary["time_s"] = dict(self.times)
        summary["rank"], summary["world"] = self.comm.rank, self.comm.world
        return summary


def compress(
    model_spec,
    ratio: float,
    cost: str = "weight",
    alpha=None,
    calib_tokens: int = 131072,
    seq_len: int = 512,
    out_dir=None,
    crs=DEFAULT_CRS,
    kss=DEFAULT_KS,
    buckets: int = 50000,
    eval_tokens: int = 0,
    device: str = "cpu",
    progress: bool = True,
    batch_size: int = 8,
    method: str = "mckp",
    weighting=DEFAULT_WEIGHTING,
    power: int = DEFAULT_POWER,
    overwrite: bool = False,
    seed: int = 0,
    calib_ids: torch.Tensor | None = None,
    eval_ids: torch.Tensor | None = None,
    num_threads: int = 0,
    restart: bool = False,
    work_dir=None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Compress ``model_spec`` (HF folder, .gguf, "smollm2", or an already loaded LoadedModel) and
    write the checkpoint, profile, allocation, summary and run log into ``out_dir``. Returns the
    summary (plus this call's ``time_s`` per stage).

    The model is streamed block by block (see the module docstring) through ``work_dir`` (default
    ``<out_dir>.partial``): calling again with the same arguments after an interruption resumes;
    different arguments are refused unless ``restart=True``, which discards the work folder. An
    existing ``out_dir`` is replaced only with ``overwrite=True``, and only once the new one is
    complete. ``calib_ids`` / ``eval_ids`` override the BoolQ token ids (tests, custom data).
    ``num_threads`` (0: torch's current count) pins torch and OpenBLAS; it is part of the
    fingerprint because results depend on it in the last bits. A folder is opened in ``dtype``
    (computation and the saved tensors); an in-memory model keeps its own. An in-memory model is
    compressed in place when the call returns."""
    from rocketkit.distributed import init_comm
    from rocketkit.profile import check_grid
    from rocketkit.threads import pinned_threads

    ratio = check_ratio(ratio)
    check_cost(cost, alpha)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    weighting = check_weighting(weighting)
    power = check_power(power)
    crs, kss = check_grid(crs, kss)
    if out_dir is None:
        raise ValueError("out_dir is required")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    if eval_tokens < 0 or calib_tokens < 1:
        raise ValueError(f"need calib_tokens >= 1 and eval_tokens >= 0, got {calib_tokens}, {eval_tokens}")
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be an integer >= 1, got {buckets!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    comm, dev = init_comm(device)
    try:
        with pinned_threads(num_threads) as threads:
            run = _CompressRun(
                comm, dev, threads, model_spec=model_spec, ratio=ratio, cost=cost,
                alpha=None if cost != "blend" else float(alpha), calib_tokens=calib_tokens, seq_len=seq_len,
                out_dir=out_dir, crs=crs, kss=kss, buckets=buckets, eval_tokens=eval_tokens, progress=progress,
                batch_size=batch_size, method=method, weighting=weighting, power=power, overwrite=overwrite, seed=seed,
                calib_ids=calib_ids, eval_ids=eval_ids, restart=restart, work_dir=work_dir,
                trust_remote_code=trust_remote_code, dtype=dtype,
            )
            try:
                return run.run()
            finally:
                wd = getattr(run, "wd", None)
                if wd is not None:
                    wd.release_lock()
    finally:
        comm.close()


def format_summary(summary: dict) -> str:
    """A short human-readable table of a :func:`compress` summary."""
    b = summary["bytes"]
    mib = 1024 * 1024
    rows = [
        ("model", f"{summary['model']} ({summary['model_type']})"),
        ("cost", summary["cost"] + (f" (alpha={summary['alpha']})" if summary.get("alpha") is not None else "")
         + (f"; knapsack objective sum of {'share * ' if summary.get('weighting') else ''}cost^{summary.get('power', 1)}"
            if summary.get("method") == "mckp" else f"; {summary.get('method')} allocation")),
        ("ratio target / achieved", f"{summary['ratio']:.4f} / {summary['achieved_ratio']:.4f}"),
        ("linear params before / after", f"{summary['compressible_params_before']:,} / {summary['compressible_params_after']:,}"),
        ("model params before / after", f"{summary['params_before']:,} / {summary['params_after']:,}"),
        ("layers factorized", f"{summary['factorized_layers']} / {summary['layers']}"),
        ("objective / lower bound", f"{summary['objective']:.6g} / "
         + (f"{summary['lower_bound']:.6g}" if summary["lower_bound"] is not None else "-")),
        ("max |profiled - applied| err", f"{summary['max_profiled_vs_applied_error']:.2e}"),
        ("bytes U / C values / C indices", f"{b['U'] / mib:.2f} / {b['C_values'] / mib:.2f} / {b['C_indices'] / mib:.2f} MiB"),
        ("bytes dense rest / folder", f"{b['dense'] / mib:.2f} / {b['folder_total'] / mib:.2f} MiB"),
    ]
    if summary.get("ppl_before") is not None:
        rows.append(("perplexity before / after", f"{summary['ppl_before']:.3f} / {summary['ppl_after']:.3f}"))
    if summary.get("time_s"):
        rows.append(("time (s)", ", ".join(f"{k} {v:.1f}" for k, v in summary["time_s"].items())))
    rows.append(("output", summary["out_dir"]))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)

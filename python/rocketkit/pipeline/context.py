"""The state every stage of one compress run shares: the model, the token ids, the work folder,
the run log, and the one helper that streams the decoder blocks over the calibration batches."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from rocketkit.pipeline.options import CompressOptions

_PAUSE_ENV = "ROCKETKIT_TEST_PAUSE_AT"


def pause_point(event: str) -> None:
    """Tests set ROCKETKIT_TEST_PAUSE_AT to ``profile:<i>``, ``factorize:<i>`` or ``assemble`` to make
    the run sleep there, to be killed or interrupted."""
    if os.environ.get(_PAUSE_ENV) == event:
        print(f"rocketkit: paused at {event} ({_PAUSE_ENV})", file=sys.stderr, flush=True)
        time.sleep(3600)


def check_ids(name: str, ids, vocab: int | None) -> torch.Tensor:
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


class RunContext:
    """One compress call on one rank: filled by :meth:`open_model` and :meth:`open_work`, then read
    (and extended with ``allocation`` and ``profile``) by the stages."""

    def __init__(self, model_spec, opts: CompressOptions, comm, device: torch.device, threads: int):
        from rocketkit import has_cuda

        self.model_spec, self.o, self.comm, self.device, self.threads = model_spec, opts, comm, device, threads
        self.times: dict[str, float] = {}
        self.progress = opts.progress and comm.is_main
        # Profiles are scored on the GPU when the Grams live there and the core was built with CUDA;
        # the choice is part of the fingerprint (the two agree to ~1e-12, not bit for bit).
        self.errors_backend = "cuda" if device.type == "cuda" and has_cuda() else "cpu"
        self.allocation = None
        self.profile = None
        self.ppl = (None, None)

    # ---------------------------------------------------------------- setup

    def open_model(self) -> None:
        from rocketkit.models import LoadedModel, open_streaming, prepare_model, streaming_weights, walk_model
        from rocketkit.workdir import model_folder_fingerprint, model_memory_fingerprint

        t = time.perf_counter()
        o, spec = self.o, self.model_spec
        if isinstance(spec, LoadedModel):
            loaded, self.spec_name = spec, spec.source
            src = Path(spec.source) if spec.source else None
            self.source_folder = src if src is not None and (src / "config.json").is_file() else None
            self.in_memory = True
        else:
            loaded = open_streaming(str(spec), dtype=o.dtype, device=self.device, trust_remote_code=o.trust_remote_code)
            self.spec_name, self.source_folder, self.in_memory = str(spec), Path(loaded.source), False
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        # An in-memory model's 3-D MoE experts become per-expert linears here, in place (a streamed
        # skeleton's already did in open_streaming).
        prepare_model(self.model)
        self.walk = walk_model(self.model)
        self.prefix, self.blocks = self.walk.prefix, self.walk.blocks
        self.n_blocks = len(self.blocks)
        self.streaming = streaming_weights(self.model)
        floats = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
        self.dtype = floats[0] if floats else torch.float32
        vocab = getattr(self.model.config, "vocab_size", None)
        calib_ids, eval_ids = o.calib_ids, o.eval_ids
        if (calib_ids is None or (eval_ids is None and o.eval_tokens > 0)) and self.tokenizer is None:
            raise ValueError(f"{self.spec_name}: the model has no tokenizer, so calibration text cannot be "
                             "tokenized; pass calib_ids (and eval_ids) as token id tensors")
        if calib_ids is None:
            from rocketkit.data import calibration_ids

            calib_ids = calibration_ids(self.tokenizer, o.calib_tokens, seq_len=o.seq_len, seed=o.seed)
        if eval_ids is None and o.eval_tokens > 0:
            from rocketkit.data import heldout_ids

            eval_ids = heldout_ids(self.tokenizer, o.eval_tokens, seq_len=o.seq_len)
        self.calib_ids = check_ids("calib_ids", calib_ids, vocab)
        self.eval_ids = None if eval_ids is None else check_ids("eval_ids", eval_ids, vocab)
        if self.eval_ids is not None and self.eval_ids.shape[1] < 2:
            raise ValueError("eval_ids need seq_len >= 2")
        self.model_fp = (model_memory_fingerprint(self.model) if self.in_memory
                         else model_folder_fingerprint(self.source_folder))
        self.times["load"] = time.perf_counter() - t

    def fingerprint(self) -> dict:
        """Everything that determines the result; a resumed run must match it."""
        import rocketkit
        from rocketkit.allocate import ALLOCATION_FORMAT_VERSION
        from rocketkit.checkpoint import CHECKPOINT_FORMAT_VERSION
        from rocketkit.profile import PROFILE_FORMAT_VERSION
        from rocketkit.workdir import WORK_FORMAT_VERSION

        o = self.o
        numerics = {"dtype": str(self.dtype).replace("torch.", ""), "device": self.device.type,
                    "batch_size": o.batch_size, "threads": self.threads, "errors_backend": self.errors_backend}
        if self.device.type == "cuda":  # another GPU model may round differently
            numerics["gpu"] = torch.cuda.get_device_name(self.device)
        return {
            "rocketkit": {"version": rocketkit.__version__, "work_format": WORK_FORMAT_VERSION,
                          "checkpoint_format": CHECKPOINT_FORMAT_VERSION, "profile_format": PROFILE_FORMAT_VERSION,
                          "allocation_format": ALLOCATION_FORMAT_VERSION},
            "model": self.model_fp,
            "calibration": {**_ids_fingerprint(self.calib_ids), "seed": o.seed},
            "evaluation": _ids_fingerprint(self.eval_ids),
            "grid": {"crs": list(o.crs), "kss": list(o.kss)},
            "allocation": {"ratio": o.ratio, "cost": o.cost, "alpha": o.alpha, "method": o.method,
                           "weighting": o.weighting, "power": o.power, "buckets": o.buckets, "error_cap": o.error_cap},
            "factorization": {"refine": o.refine},
            "numerics": numerics,
        }

    def open_work(self) -> None:
        from rocketkit.runlog import RunLog, vm_hwm_bytes
        from rocketkit.workdir import WorkDir, default_work_dir

        out_dir = self.o.out_dir
        root = self.o.work_dir if self.o.work_dir is not None else default_work_dir(out_dir)
        r, o = root.resolve(), out_dir.resolve()
        if r == o or o in r.parents or r in o.parents:
            raise ValueError(f"work_dir must differ from out_dir and neither may contain the other ({root}, {out_dir})")
        self.wd = WorkDir(root, self.n_blocks)
        fp = self.fingerprint()
        if self.comm.is_main:
            self.attempt = self.wd.open(fp, self.o.restart)
        self.comm.barrier()
        if not self.comm.is_main:
            self.attempt = self.wd.check_visible(fp, self.comm.rank)
        self.log = RunLog(self.wd.attempt_log_path(self.attempt, self.comm.rank), model=self.spec_name,
                          attempt=self.attempt, rank=self.comm.rank, world=self.comm.world, device=str(self.device),
                          threads=self.threads, n_blocks=self.n_blocks, calib_tokens=int(self.calib_ids.numel()),
                          errors_backend=self.errors_backend)
        self.log.data["stages"].append({"name": "load", "seconds": self.times["load"], "peak_rss_bytes": vm_hwm_bytes(),
                                        "rss_peak_scope": "process"})
        self.log.save()

    # ---------------------------------------------------------------- blocks

    def linears(self, i: int) -> list[str]:
        """Block i's linear layers, relative names in module order."""
        from rocketkit.models import block_linears

        return list(block_linears(self.blocks[i]))

    def decisions(self, i: int) -> dict:
        """Block i's factorized layers (rel -> allocate.LayerDecision), once allocated."""
        out = {}
        for rel in self.linears(i):
            d = self.allocation.layers[f"{self.prefix}.{i}.{rel}"]
            if not d.dense:
                out[rel] = d
        return out

    def stream_blocks(self, stage: str, desc: str, todo: list[int], grams_for, work) -> None:
        """Run blocks 0..max(todo) over the calibration batches, with Grams for the linears
        ``grams_for(i)`` names, and ``work(i, cb, entry)`` on the blocks in ``todo``. Each block's
        run-log entry says whether it did ``stage`` or only its forward."""
        from tqdm.auto import tqdm

        from rocketkit.calibrate import BlockStream

        if not todo:
            return
        todo_set, last = set(todo), max(todo)
        stream = BlockStream(self.model, self.calib_ids, batch_size=self.o.batch_size, device=self.device)
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

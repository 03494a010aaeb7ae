"""Profiling: the weight- and output-space error of every (cr, ks) candidate of every linear layer.

One calibration pass streams the decoder blocks; each distinct input Gram is whitened once and
``rocketkit.whitened_errors`` scores the whole candidate grid of each linear from W = weight.T and S.
A profile is saved as ``<stem>.safetensors`` (arrays) + ``<stem>.json`` (meta), never pickled.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROFILE_FORMAT_VERSION = 1

DEFAULT_CRS = tuple(round(0.05 * i, 2) for i in range(1, 15))  # 0.05 .. 0.70
DEFAULT_KS = tuple(round(1.0 + 0.1 * i, 1) for i in range(21))  # 1.0 .. 3.0
REDUCED_CRS = tuple(round(0.1 * i, 1) for i in range(1, 8))  # 0.1 .. 0.7
REDUCED_KS = (1.0, 1.5, 2.0, 2.5, 3.0)

# A block whose linears all have at most this many weights is profiled in one pooled call
# (whitened_errors_layers): it holds every S and every layer basis of the block at once, ~100 MB
# for SmolLM2 and, by estimate, about 2 GB for a 2048×8192-wide block; wider blocks go layer by
# layer, one S at a time.
POOLED_PROFILE_MAX_ELEMENTS = 1 << 24

# Indices of C fit int16 while every row index k' < k is representable.
INT16_MAX_RANK = 32767


def index_bytes_per_entry(k: int) -> int:
    return 2 if k <= INT16_MAX_RANK else 4


@dataclass
class CandidateGrid:
    """The feasible candidates of one (d1, d2) layer, in (cr, ks) grid order.

    k = round((1−cr)·d1·d2 / (d1 + d2/ks)), s = max(1, ⌊k/ks⌋), params = d1·k + s·d2 (values only;
    ``index_bytes`` = s·d2 index entries at 2 or 4 bytes is reported separately). Candidates with
    k > min(d1, d2) or params ≥ d1·d2 (nothing saved) are dropped; ``n_total`` counts them all.
    """

    cr: np.ndarray  # float64 (n,)
    ks: np.ndarray  # float64 (n,)
    k: np.ndarray  # int64 (n,)
    s: np.ndarray  # int64 (n,)
    params: np.ndarray  # int64 (n,)
    index_bytes: np.ndarray  # int64 (n,)
    n_total: int

    def __len__(self) -> int:
        return int(self.k.shape[0])

    def empty(self) -> "CandidateGrid":
        """The same grid with no candidate left (a layer that must stay dense)."""
        none = np.zeros(0, dtype=bool)
        return CandidateGrid(self.cr[none], self.ks[none], self.k[none], self.s[none], self.params[none],
                             self.index_bytes[none], self.n_total)


def _check_axis(name: str, values, lo: float, hi: float, lo_open: bool, hi_open: bool) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if not vals:
        raise ValueError(f"{name} must not be empty")
    for v in vals:
        bad = not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)
        if bad:
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise ValueError(f"{name} values must be in {lb}{lo}, {hi}{rb}, got {v}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{name} has duplicate values: {vals}")
    return vals


def candidate_grid(d1: int, d2: int, crs=DEFAULT_CRS, kss=DEFAULT_KS) -> CandidateGrid:
    """All (cr, ks) candidates of a d1×d2 layer that fit and save parameters."""
    if d1 < 1 or d2 < 1:
        raise ValueError(f"layer shape must be positive, got ({d1}, {d2})")
    crs = _check_axis("crs", crs, 0.0, 1.0, True, True)
    kss = _check_axis("kss", kss, 1.0, math.inf, False, True)
    cr = np.repeat(np.asarray(crs, dtype=np.float64), len(kss))
    ks = np.tile(np.asarray(kss, dtype=np.float64), len(crs))
    dense = d1 * d2
    # Round half up (not to even) so the formula is the one documented.
    k = np.floor((1.0 - cr) * dense / (d1 + d2 / ks) + 0.5).astype(np.int64)
    # k/ks is often an integer in exact arithmetic (k=11, ks=1.1); the epsilon keeps float error from losing one.
    s = np.maximum(1, np.floor(k / ks + 1e-9).astype(np.int64))
    params = d1 * k + s * d2
    keep = (k >= 1) & (k <= min(d1, d2)) & (s <= k) & (params < dense)
    k, s, params = k[keep], s[keep], params[keep]
    index_bytes = s * d2 * np.where(k <= INT16_MAX_RANK, 2, 4)
    return CandidateGrid(cr[keep], ks[keep], k, s, params, index_bytes.astype(np.int64), n_total=len(crs) * len(kss))


@dataclass
class LayerProfile:
    name: str  # fully qualified module name, e.g. "model.layers.3.self_attn.q_proj"
    d1: int  # in_features
    d2: int  # out_features
    grid: CandidateGrid
    e_weight: np.ndarray  # float64 (n,): ‖W − Ŵ‖_F / ‖W‖_F
    e_output: np.ndarray  # float64 (n,): ‖S(W − Ŵ)‖_F / ‖SW‖_F
    jitter: float
    dead_channels: int
    tokens: int
    skipped: int
    # Why the layer can only stay dense (no finite calibration token, an all-zero weight, a Gram
    # that no jitter makes positive definite); its grid is then empty. "" for a normal layer.
    dense_reason: str = ""

    @property
    def dense_params(self) -> int:
        return self.d1 * self.d2


@dataclass
class Profile:
    layers: dict[str, LayerProfile]
    meta: dict = field(default_factory=dict)

    @property
    def crs(self) -> tuple[float, ...]:
        return tuple(self.meta["crs"])

    @property
    def kss(self) -> tuple[float, ...]:
        return tuple(self.meta["kss"])

    def dense_params(self) -> int:
        return sum(lp.dense_params for lp in self.layers.values())

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<stem>.safetensors`` then ``<stem>.json`` (each atomically); returns both paths."""
        import torch

        from rocketkit.fileio import atomic_save_safetensors, atomic_write_json

        st_path, json_path = _profile_paths(path)
        tensors, layers = {}, []
        for i, lp in enumerate(self.layers.values()):
            tensors[f"{i}.e_weight"] = torch.from_numpy(np.ascontiguousarray(lp.e_weight, dtype=np.float64))
            tensors[f"{i}.e_output"] = torch.from_numpy(np.ascontiguousarray(lp.e_output, dtype=np.float64))
            tensors[f"{i}.k"] = torch.from_numpy(np.ascontiguousarray(lp.grid.k, dtype=np.int64))
            tensors[f"{i}.s"] = torch.from_numpy(np.ascontiguousarray(lp.grid.s, dtype=np.int64))
            layers.append(
                dict(name=lp.name, d1=lp.d1, d2=lp.d2, n=len(lp.grid), jitter=lp.jitter,
                     dead_channels=lp.dead_channels, tokens=lp.tokens, skipped=lp.skipped,
                     **({"dense_reason": lp.dense_reason} if lp.dense_reason else {}))
            )
        atomic_save_safetensors(st_path, tensors, {"format": "rocketkit-profile", "version": str(PROFILE_FORMAT_VERSION)})
        atomic_write_json(
            json_path,
            {"format": "rocketkit-profile", "version": PROFILE_FORMAT_VERSION, "tensors": st_path.name,
             "meta": self.meta, "layers": layers},
        )
        return st_path, json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read and validate a profile written by :meth:`save` (ValueError naming the file on any mismatch)."""
        from rocketkit.fileio import load_safetensors, read_json

        st_path, json_path = _profile_paths(path)
        doc = read_json(json_path)
        if doc.get("format") != "rocketkit-profile":
            raise ValueError(f"{json_path}: not a rocketkit profile")
        if doc.get("version") != PROFILE_FORMAT_VERSION:
            raise ValueError(f"{json_path}: profile version {doc.get('version')!r}, this rocketkit reads {PROFILE_FORMAT_VERSION}")
        tensors, _ = load_safetensors(st_path)
        meta = doc.get("meta", {})
        try:
            crs, kss = meta["crs"], meta["kss"]
        except KeyError as e:
            raise ValueError(f"{json_path}: meta lacks {e}") from None
        layers: dict[str, LayerProfile] = {}
        for i, rec in enumerate(doc.get("layers", [])):
            try:
                name, d1, d2, n = rec["name"], int(rec["d1"]), int(rec["d2"]), int(rec["n"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{json_path}: layer {i} record is malformed ({e})") from None
            grid = candidate_grid(d1, d2, crs, kss)
            dense_reason = str(rec.get("dense_reason", ""))
            if dense_reason:
                grid = grid.empty()
            arrays = {}
            for key, dtype in (("e_weight", np.float64), ("e_output", np.float64), ("k", np.int64), ("s", np.int64)):
                t = tensors.get(f"{i}.{key}")
                if t is None:
                    raise ValueError(f"{st_path}: tensor '{i}.{key}' (layer {name}) is missing")
                a = t.numpy()
                if a.dtype != dtype or a.shape != (n,):
                    raise ValueError(f"{st_path}: tensor '{i}.{key}' (layer {name}) is {a.dtype} {a.shape}, expected {np.dtype(dtype)} ({n},)")
                arrays[key] = a
            if len(grid) != n or not (np.array_equal(grid.k, arrays["k"]) and np.array_equal(grid.s, arrays["s"])):
                raise ValueError(f"{st_path}: layer {name}: stored candidates do not match the grid of a ({d1}, {d2}) layer")
            if name in layers:
                raise ValueError(f"{json_path}: duplicate layer {name}")
            layers[name] = LayerProfile(
                name, d1, d2, grid, arrays["e_weight"], arrays["e_output"], float(rec.get("jitter", 0.0)),
                int(rec.get("dead_channels", 0)), int(rec.get("tokens", 0)), int(rec.get("skipped", 0)),
                dense_reason,
            )
        if not layers:
            raise ValueError(f"{json_path}: profile has no layers")
        return cls(layers=layers, meta=meta)


def _profile_paths(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def weight_f64(linear) -> np.ndarray:
    """W = linear.weight.T as a C-contiguous float64 (in_features, out_features) array."""
    import torch

    return np.ascontiguousarray(linear.weight.detach().to(device="cpu", dtype=torch.float64).T.numpy())


def whiten_grams(grams: dict) -> dict:
    """Whitening per distinct Gram object (shared inputs are whitened once), keyed by id(Gram)."""
    from rocketkit.whiten import whiten

    return {id(g): whiten(g.H) for g in {id(g): g for g in grams.values()}.values()}


def check_grid(crs, kss) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The validated (crs, kss) axes of a candidate grid."""
    return _check_axis("crs", crs, 0.0, 1.0, True, True), _check_axis("kss", kss, 1.0, math.inf, False, True)


def gram_groups(grams: dict, names) -> list[tuple[object, list[str]]]:
    """(Gram, the names among ``names`` sharing it) per distinct Gram, in first-use order."""
    groups: dict[int, tuple[object, list[str]]] = {}
    for n in names:
        g = grams[n]
        groups.setdefault(id(g), (g, []))[1].append(n)
    return list(groups.values())


ERROR_BACKENDS = ("cpu", "cuda")


def profile_block(cb, crs=DEFAULT_CRS, kss=DEFAULT_KS, num_threads: int = 0, on_layer=None,
                  free_grams: bool = False, backend: str = "cpu", on_whitened=None) -> dict[str, LayerProfile]:
    """Score every candidate of each linear of one calibrated block (``calibrate.CalibratedBlock``).

    Distinct Grams are whitened one at a time, each once, and its S is dropped once its layers are
    scored (``free_grams=True`` drops the Gram too), so at most one S exists at a time; except on
    the CPU when every linear has at most ``POOLED_PROFILE_MAX_ELEMENTS`` weights: then all of the
    block's Grams are whitened first and its layers scored in one ``whitened_errors_layers`` call,
    whose pool keeps both cores busy through each layer's SVD (same errors to ~1e-13).
    ``on_layer(name)`` is called after each layer; ``on_whitened(g, rels, wh)`` after the g-th
    distinct Gram is whitened (``wh`` None when its layers must stay dense), e.g. to cache S for
    pass 2. Layers come back in the block's module order.
    ``backend="cuda"`` scores on the GPU holding the Grams (``whitened_errors_cuda``, equal to the
    CPU core to ~1e-12); "cpu" copies S and W to the host."""
    import torch

    from rocketkit._native import whitened_errors, whitened_errors_layers
    from rocketkit.whiten import whiten

    crs, kss = check_grid(crs, kss)
    if backend not in ERROR_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(ERROR_BACKENDS)}, got {backend!r}")
    pooled = backend == "cpu" and all(
        lin.in_features * lin.out_features <= POOLED_PROFILE_MAX_ELEMENTS for lin in cb.linears.values())
    layers: dict[str, LayerProfile] = {}
    waiting = []  # pooled: (gram, wh, S, [(rel, grid, reason)]) of every Gram, scored at the end

    def finish(gram, wh, S, todo, errors):
        for rel, grid, reason in todo:
            lin = cb.linears[rel]
            name = f"{cb.name}.{rel}"
            d1, d2 = lin.in_features, lin.out_features
            if rel in errors:
                e_w, e_o = errors[rel]
            elif len(grid):
                cand = np.stack([grid.k, grid.s], axis=1)
                if backend == "cuda":
                    from rocketkit._native import whitened_errors_cuda

                    W = lin.weight.detach().to(device=S.device, dtype=torch.float64).T.contiguous()
                    e_w, e_o = (t.cpu().numpy() for t in whitened_errors_cuda(W, S, cand))
                    del W
                else:
                    e_w, e_o = whitened_errors(weight_f64(lin), S, cand, num_threads=num_threads)
            else:
                e_w = e_o = np.zeros(0)
            layers[name] = LayerProfile(
                name, d1, d2, grid, np.asarray(e_w, dtype=np.float64), np.asarray(e_o, dtype=np.float64),
                float(wh.jitter) if wh is not None else 0.0, int(wh.dead_channels) if wh is not None else 0,
                int(gram.tokens), int(gram.skipped), reason,
            )
            if on_layer is not None:
                on_layer(name)
        if free_grams:
            gram.H = None

    for g, (gram, rels) in enumerate(gram_groups(cb.grams, list(cb.linears))):
        wh, why_dense = None, ""
        if gram.tokens == 0:
            why_dense = f"no finite calibration token reached it ({gram.skipped} skipped)"
        else:
            try:
                wh = whiten(gram.H)
            except RuntimeError as e:
                why_dense = f"its Gram is not positive definite even with jitter ({e})"
        if on_whitened is not None:
            on_whitened(g, rels, wh)
        S = None if wh is None else (wh.S if backend == "cuda" else np.ascontiguousarray(wh.S.cpu().numpy()))
        todo = []
        for rel in rels:
            lin = cb.linears[rel]
            name = f"{cb.name}.{rel}"
            grid = candidate_grid(lin.in_features, lin.out_features, crs, kss)
            weight = lin.weight.detach()
            if not bool(torch.isfinite(weight).all()):
                raise ValueError(f"{name}: the weight contains NaN or Inf; fix the checkpoint before compressing it")
            reason = why_dense or ("its weight is all zeros" if not bool(weight.any()) else "")
            if reason:
                warnings.warn(f"{name} is kept dense: {reason}", RuntimeWarning, stacklevel=2)
                grid = grid.empty()
            todo.append((rel, grid, reason))
        if pooled:
            waiting.append((gram, wh, S, todo))
        else:
            finish(gram, wh, S, todo, {})
        del S, wh
    if waiting:
        jobs = [(S, rel, grid) for _, _, S, todo in waiting for rel, grid, _ in todo if len(grid)]
        pairs = whitened_errors_layers([weight_f64(cb.linears[rel]) for _, rel, _ in jobs], [S for S, _, _ in jobs],
                                       [np.stack([g.k, g.s], axis=1) for *_, g in jobs], num_threads=num_threads)
        errors = {rel: pair for (_, rel, _), pair in zip(jobs, pairs)}
        for gram, wh, S, todo in waiting:
            finish(gram, wh, S, todo, errors)
    return {f"{cb.name}.{rel}": layers[f"{cb.name}.{rel}"] for rel in cb.linears}


def profile_meta(model, input_ids, crs, kss) -> dict:
    """The meta section of a profile: the grid and what it was calibrated on (no timings, so that
    reruns write identical files)."""
    config = getattr(model, "config", None)
    return {
        "crs": list(crs),
        "kss": list(kss),
        "model_type": getattr(config, "model_type", None),
        "n_seq": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
        "tokens": int(input_ids.numel()),
    }


def profile_model(
    model,
    input_ids,
    crs=DEFAULT_CRS,
    kss=DEFAULT_KS,
    batch_size: int = 8,
    device="cpu",
    progress: bool = True,
    num_threads: int = 0,
    whitening_cache=None,
) -> Profile:
    """Calibrate block by block and score every candidate of every decoder linear.
    ``whitening_cache`` (a ``whitening_cache.WhiteningCache``) keeps every block's whitening
    factors, for :func:`rocketkit.apply.apply_from_cache`."""
    from tqdm.auto import tqdm

    from rocketkit.calibrate import stream_blocks
    from rocketkit.models import block_linears, decoder_blocks

    crs, kss = check_grid(crs, kss)
    t0 = time.perf_counter()
    layers: dict[str, LayerProfile] = {}
    bar = None
    for cb in stream_blocks(model, input_ids, batch_size=batch_size, device=device, progress=progress):
        if bar is None:
            total = sum(len(block_linears(b)) for b in decoder_blocks(model))
            bar = tqdm(total=total, desc="profile", unit="layer", disable=not progress)
        writer = whitening_cache.writer(cb.index) if whitening_cache is not None else None
        layers.update(profile_block(cb, crs, kss, num_threads=num_threads, on_layer=lambda _: bar.update(1),
                                    on_whitened=writer))
        if writer is not None:
            writer.finish()
    if bar is not None:
        bar.close()
    meta = profile_meta(model, input_ids, crs, kss)
    meta["seconds"] = time.perf_counter() - t0
    return Profile(layers=layers, meta=meta)

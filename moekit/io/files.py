"""File helpers: cheap copies (reflink, hard link, copy), content hashes, tokenizer files.

Branches start as copies of the seed. Copying a 14 GB seed per branch is wasteful, so
``link_or_copy`` tries, in order, a reflink (copy-on-write clone: safe and free where the
filesystem supports it), a hard link (free; safe because every moekit writer replaces files
via a new inode and never writes into an existing one), and a real copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Literal

# Linux FICLONE ioctl: ask the filesystem (btrfs, xfs, ...) for a copy-on-write clone.
_FICLONE = 0x40049409

LinkMode = Literal["reflink", "hardlink", "copy"]

# Files a model directory carries besides weights and config.json that must travel with it.
TOKENIZER_AND_GENERATION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_FILES = tuple(f for f in TOKENIZER_AND_GENERATION_FILES if f != "generation_config.json")


def _try_reflink(src: Path, dst: Path) -> bool:
    try:
        with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
            fcntl.ioctl(fdst.fileno(), _FICLONE, fsrc.fileno())
        return True
    except OSError:
        dst.unlink(missing_ok=True)
        return False


def link_or_copy(src: Path, dst: Path, force_copy: bool = False) -> LinkMode:
    """Make ``dst`` a copy of ``src`` as cheaply as is safe; return how it was made."""
    src = Path(os.path.realpath(src))  # hub caches store symlinks to blobs
    if not force_copy:
        if _try_reflink(src, dst):
            return "reflink"
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:
            pass
    shutil.copy2(src, dst)
    return "copy"


def sha256_files(paths: list[Path], chunk_bytes: int = 8 << 20) -> str:
    """Return one SHA-256 over the names and contents of ``paths`` (in the order given)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


# Files that hold a vocabulary: a tokenizer needs at least one of them.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def tokenizer_fingerprint(model_dir: Path) -> str:
    """Hash of the tokenizer files in ``model_dir``; '' if it has no vocabulary file.

    tokenizer_config.json carries paths and versions that differ between equal tokenizers, so
    only the vocabulary and special-token files are compared.
    """
    if not any((Path(model_dir) / f).is_file() for f in VOCABULARY_FILES):
        return ""
    files = [
        Path(model_dir) / f for f in TOKENIZER_FILES if (Path(model_dir) / f).is_file() and f != "tokenizer_config.json"
    ]
    return sha256_files(files)


# Tokenizer classes that only transformers 5 knows, and the class every reader (transformers 4.x,
# llama.cpp's converter, vLLM) loads the same tokenizer.json with.
_V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend"}
_PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def portable_tokenizer_config(model_dir: Path) -> dict | None:
    """tokenizer_config.json of ``model_dir`` rewritten for older readers, or None if it needs no change.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, a class transformers 4.x
    (and llama.cpp's converter, pinned to 4.x) does not have. With a tokenizer.json present,
    ``PreTrainedTokenizerFast`` loads the very same tokenizer in every version.
    """
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer_config.json"
    if not path.is_file() or not (model_dir / "tokenizer.json").is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # unreadable: copied unchanged; the tokenizer loader reports it where it matters
    if not isinstance(config, dict) or config.get("tokenizer_class") not in _V5_ONLY_TOKENIZER_CLASSES:
        return None
    return {**config, "tokenizer_class": _PORTABLE_TOKENIZER_CLASS}


def write_tokenizer_file(
    src_dir: Path, dst_dir: Path, name: str, link: bool = False, force_copy: bool = False
) -> str | None:
    """Put tokenizer/generation file ``name`` of ``src_dir`` into ``dst_dir``; return how, or None if absent.

    tokenizer_config.json is written portable (see :func:`portable_tokenizer_config`) when it
    needs to be; every other file is linked (``link``) or copied unchanged.
    """
    src = Path(src_dir) / name
    if not src.is_file():
        return None
    if name == "tokenizer_config.json" and (portable := portable_tokenizer_config(src_dir)) is not None:
        (Path(dst_dir) / name).write_text(json.dumps(portable, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return "copy"
    if link:
        return link_or_copy(src, Path(dst_dir) / name, force_copy=force_copy)
    shutil.copy2(src, Path(dst_dir) / name)
    return "copy"


def copy_tokenizer_and_generation_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy tokenizer and generation-config files (tokenizer_config.json made portable), and the modeling code
    that config.json's ``auto_map`` names (moekit_moe's, or a third-party model's); return the names."""
    copied = [name for name in TOKENIZER_AND_GENERATION_FILES if write_tokenizer_file(src_dir, dst_dir, name)]
    return copied + copy_remote_code(src_dir, dst_dir)


def copy_remote_code(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the Python files that ``auto_map`` in ``src_dir``'s config.json names (``module.Class`` entries, for
    ``trust_remote_code=True``), and the files they import relatively (``from .x import``, as transformers loads
    them), that ``dst_dir`` lacks; return their names."""
    config_path = Path(src_dir) / "config.json"
    if not config_path.is_file():
        return []
    auto_map = json.loads(config_path.read_text(encoding="utf-8")).get("auto_map") or {}
    references = [v for value in auto_map.values() for v in (value if isinstance(value, list) else [value]) if v]
    pending = sorted({ref.split("--")[-1].rsplit(".", 1)[0] for ref in references if isinstance(ref, str)})
    seen: set[str] = set()
    copied = []
    while pending:
        module = pending.pop()
        source, target = Path(src_dir) / f"{module}.py", Path(dst_dir) / f"{module}.py"
        if module in seen or not source.is_file():
            continue
        seen.add(module)
        pending += _RELATIVE_IMPORT.findall(source.read_text(encoding="utf-8"))
        if not target.exists():
            shutil.copy2(source, target)
            copied.append(target.name)
    return sorted(copied)


# ``from .module import ...`` / ``import .module`` at the start of a line (transformers' rule for remote code)
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)

"""Text that exists offline, as bytes split into fixed train/valid/test parts.

- ``"python"``: the Python standard library's own source files (code), found next to the ``json`` module
  on any machine; test suites, idlelib and site-packages are left out.
- ``"prose"``: the English help topics of ``pydoc_data.topics`` (the text behind ``help("if")``).
- a directory: every file under it with one of ``extensions`` (:func:`directory_corpus`: empty files are
  read as they are; a file that cannot be read, or holds a 0 byte and so is binary, is a ValueError naming it).
- ``"wikitext"``: WikiText through the ``datasets`` library, from local files (``path``) or the Hugging Face
  cache; its own train/validation/test splits are kept.

Each document goes wholly to one split, chosen by a hash of its name (80/10/10), so the splits are fixed,
never overlap and do not depend on file order.  Documents are joined with a 0 byte.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from .._files import read_bytes
from .base import SPLITS, split_of_bytes

SEPARATOR = b"\x00"
BUILTIN = ("python", "prose", "wikitext")
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".tex", ".html")
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def stdlib_root() -> Path:
    """The directory holding the standard library's source (exists on every CPython install)."""
    return Path(json.__file__).resolve().parent.parent


def _split_documents(docs: list[tuple[str, bytes]], what: str) -> dict[str, bytes]:
    """Join (name, text) documents into one byte string per split, each document in the split its name hashes to.
    A corpus too small to give every split a document is split by 4 KiB blocks instead."""
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    for name, text in sorted(docs):
        parts[split_of_bytes(name.encode())].append(text)
    if any(not p for p in parts.values()):
        parts = {s: [] for s in SPLITS}
        for name, text in sorted(docs):
            for i in range(0, len(text), 4096):
                parts[split_of_bytes(f"{name}#{i}".encode())].append(text[i : i + 4096])
    empty = [s for s, p in parts.items() if not p]
    if empty:
        raise ValueError(f"{what} is too small to fill the {empty} split(s): "
                         f"{sum(len(t) for _, t in docs)} bytes in {len(docs)} document(s)")
    return {s: SEPARATOR.join(p) for s, p in parts.items()}


@functools.lru_cache(maxsize=4)
def python_corpus() -> dict[str, bytes]:
    root = stdlib_root()
    docs = [(str(p.relative_to(root)), p.read_bytes()) for p in sorted(root.rglob("*.py"))
            if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    if not docs:
        raise FileNotFoundError(f"no standard-library source files found under {root}")
    return _split_documents(docs, f"the standard library at {root}")


@functools.lru_cache(maxsize=4)
def prose_corpus() -> dict[str, bytes]:
    from pydoc_data.topics import topics

    return _split_documents([(k, v.encode("utf-8")) for k, v in topics.items()], "pydoc_data.topics")


def _read_document(p: Path) -> bytes:
    """The bytes of one corpus file; a file that cannot be read or is binary is a ValueError naming it.  Text in
    any encoding is accepted (the task is byte-level); a 0 byte is not, as documents are joined by one."""
    data = read_bytes(p, "a text file of the corpus")
    zero = data.find(SEPARATOR)
    if zero >= 0:
        raise ValueError(f"{p}: holds a 0 byte at offset {zero}, so it is binary, not text; a corpus directory "
                         "must hold text files (pass extensions= to choose which are read, or move it away)")
    return data


@functools.lru_cache(maxsize=8)
def directory_corpus(path: str, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> dict[str, bytes]:
    """{"train", "valid", "test"} -> bytes of the text files under ``path`` (or of the one file ``path``) whose
    names end in one of ``extensions``.  An unreadable or binary file is a ValueError naming it, no such file a
    FileNotFoundError, only empty ones a ValueError.  Cached per (path, extensions) in a process."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"corpus path {str(root)!r} does not exist")
    if not isinstance(extensions, tuple) or not all(isinstance(e, str) for e in extensions):
        raise TypeError(f"extensions must be a list of file endings such as ['.txt'], got {extensions!r}")
    if root.is_file():
        docs = [(root.name, _read_document(root))]
        if not docs[0][1]:
            raise ValueError(f"{root}: is empty; expected a text file to train on")
    else:
        exts = tuple(e.lower() for e in extensions)
        files = [p for p in sorted(root.rglob("*")) if p.suffix.lower() in exts and p.is_file()]
        docs = [(str(p.relative_to(root)), _read_document(p)) for p in files]
        if not docs:
            raise FileNotFoundError(f"corpus directory {str(root)!r} holds no files ending in {list(exts)}")
        if not any(text for _, text in docs):
            raise ValueError(f"corpus directory {str(root)!r}: all {len(docs)} file(s) ending in {list(exts)} are "
                             "empty; expected text to train on")
    return _split_documents(docs, f"corpus {str(root)!r}")


_BUILDERS = {".parquet": "parquet", ".txt": "text", ".raw": "text", ".tokens": "text", ".json": "json",
             ".jsonl": "json", ".arrow": "arrow", ".csv": "csv"}
_WIKI_SPLITS = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}


@functools.lru_cache(maxsize=4)
def wikitext_corpus(path: str | None = None, name: str = "wikitext-103-raw-v1") -> dict[str, bytes]:
    """WikiText as {split: bytes}.  ``path``: a directory holding files whose names contain train / valid
    (or validation) / test, in a format ``datasets`` reads (parquet, text, json, arrow, csv) with a "text"
    column for the non-text formats.  Without ``path``, ``datasets.load_dataset("wikitext", name)``, which
    works offline only if it is already in the Hugging Face cache."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is an optional extra
        raise ImportError("the wikitext corpus needs the 'datasets' package: pip install 'bsbr[hf]'") from err
    if path is None:
        try:
            ds = datasets.load_dataset("wikitext", name)
        except Exception as err:  # network or cache miss: say what to do
            raise FileNotFoundError(f"WikiText {name!r} is not reachable ({type(err).__name__}); download its files "
                                    "and pass their directory as path=") from err
    else:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"wikitext path {str(root)!r} is not an existing directory")
        files: dict[str, list[str]] = {}
        builder = None
        for p in sorted(root.iterdir()):
            split = next((s for k, s in _WIKI_SPLITS.items() if k in p.name.lower()), None)
            if p.is_file() and split and p.suffix.lower() in _BUILDERS:
                b = _BUILDERS[p.suffix.lower()]
                if builder not in (None, b):
                    raise ValueError(f"wikitext files under {str(root)!r} mix formats ({builder} and {b})")
                builder = b
                files.setdefault(split, []).append(str(p))
        missing = [s for s in SPLITS if s not in files]
        if missing:
            raise FileNotFoundError(f"wikitext path {str(root)!r} has no file for split(s) {missing}; expected names "
                                    f"containing train / valid / test ending in {sorted(_BUILDERS)}")
        ds = datasets.load_dataset(builder, data_files=files)
    out = {}
    for split, ours in _WIKI_SPLITS.items():
        if split in ds and ours not in out:
            out[ours] = "".join(line if line.endswith("\n") else line + "\n" for line in ds[split]["text"]).encode()
    return out


def load_corpus(corpus: str, path: str | None = None, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
                ) -> dict[str, bytes]:
    """{"train", "valid", "test"} -> bytes for ``corpus`` ("python", "prose", "wikitext" or "dir" with ``path``)."""
    if corpus == "python":
        return python_corpus()
    if corpus == "prose":
        return prose_corpus()
    if corpus == "wikitext":
        return wikitext_corpus(path)
    if corpus == "dir":
        if path is None:
            raise ValueError("corpus='dir' needs path=<a directory of text files>")
        return directory_corpus(str(path), tuple(extensions))
    raise ValueError(f"corpus must be one of {BUILTIN + ('dir',)}, got {corpus!r}")

"""Text -> tokens -> cached uint16 memmaps -> batches.

Text comes through Hugging Face ``datasets`` (hub datasets, or local text/parquet/jsonl files),
tokens through tiktoken's GPT-2 BPE truncated to ``vocab_size`` ranks. Token ids are cached as
uint16 memmaps keyed by dataset, split, tokenizer, vocabulary and content hash.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import hashlib
import json
import lzma
import math
import os
import re
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scaling_lab.config import GPT2_RANKS, NAMED_DATASETS, DataConfig
from scaling_lab.errors import ConfigError, DataFileError, DataUnavailable

HUB = {  # name -> (hub path, config name, streamed)
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1", False),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1", False),
    "openwebtext": ("Skylion007/openwebtext", None, True),
}
OPENWEBTEXT_VAL_DOCS = 2_000  # openwebtext has one split: its first documents are held out for validation
SPLIT_KEYWORDS = {  # file-name keywords per split, as datasets' data-files patterns infer them
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "eval"),
    "test": ("test", "testing"),
}
TEXT_EXTENSIONS = (".txt", ".raw", ".text", ".md")
TABLE_EXTENSIONS = (".parquet", ".jsonl", ".json", ".csv")  # tables: their 'text' column is the text
COMPRESSIONS = {".gz": (b"\x1f\x8b", gzip.open), ".bz2": (b"BZh", bz2.open), ".xz": (b"\xfd7zXZ\x00", lzma.open)}
FILE_KINDS = ("text (.txt/.raw/.text/.md, also .gz/.bz2/.xz compressed) or a table (.parquet/.jsonl/.json/.csv) "
              "with a 'text' column")
OFFLINE_HINT = (
    "pass local files with dataset=/path/to/dir (train*/valid*/test* .txt/.raw, .parquet, .jsonl or .csv with a "
    "'text' column; train_split=test trains on a test file) and set TIKTOKEN_CACHE_DIR to an offline tiktoken cache"
)


# --------------------------------------------------------------------------- tokenizer


def get_encoding(vocab_size: int, tokenizer: str = "gpt2"):
    """tiktoken Encoding with GPT-2's split pattern and its first ``vocab_size`` BPE ranks.

    Ranks 0-255 are the byte tokens, so every truncation still encodes any text and round-trips.
    The end-of-text token gets the id right after the kept ranks (50256 at full size, as in GPT-2).
    """
    import tiktoken

    try:
        base = tiktoken.get_encoding(tokenizer)
    except Exception as exc:  # network error or missing cache: one line with the fix
        raise DataUnavailable(
            f"tokenizer '{tokenizer}' cannot be loaded ({type(exc).__name__}); set TIKTOKEN_CACHE_DIR to a folder "
            "holding tiktoken's cached gpt2 files (vocab.bpe, encoder.json)"
        ) from None
    if vocab_size >= GPT2_RANKS:
        return base
    ranks = {tok: r for tok, r in base._mergeable_ranks.items() if r < vocab_size}
    return tiktoken.Encoding(
        name=f"{tokenizer}_v{vocab_size}",
        pat_str=base._pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": vocab_size},
    )


def token_byte_lengths(enc) -> np.ndarray:
    """UTF-8 bytes each token id stands for (end-of-text counts 0): (n_vocab,) int64."""
    out = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i != enc.eot_token:
            out[i] = len(enc.decode_single_token_bytes(i))
    return out


# --------------------------------------------------------------------------- text sources


def _split_of(path: Path) -> str | None:
    words = re.split(r"[._\-\s]+", path.name.lower())
    for split, keys in SPLIT_KEYWORDS.items():
        if any(w in keys for w in words):
            return split
    return None


def local_files(dataset: str) -> dict[str, list[Path]]:
    """Split name -> files for a local directory or comma-separated files (names as datasets infers)."""
    paths: list[Path] = []
    for part in dataset.split(","):
        p = Path(part.strip()).expanduser()
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            paths.append(p)
        else:
            raise ConfigError("dataset", dataset, "an existing directory or readable files, or one of " + ", ".join(NAMED_DATASETS))
    splits: dict[str, list[Path]] = {}
    for p in paths:
        split = _split_of(p)
        if split and file_kind(p) in TEXT_EXTENSIONS + TABLE_EXTENSIONS:
            splits.setdefault(split, []).append(p)
    if not splits:
        raise ConfigError("dataset", dataset, "files named train*/valid*/validation*/test*, each " + FILE_KINDS)
    return splits


def file_kind(path: Path) -> str:
    """A data file's format extension, lower case, a compression suffix skipped: train.txt.gz -> '.txt'."""
    sfx = [x.lower() for x in path.suffixes]
    if len(sfx) > 1 and sfx[-1] in COMPRESSIONS:
        return sfx[-2]
    return sfx[-1] if sfx else ""


def is_local(dataset: str) -> bool:
    return dataset not in NAMED_DATASETS


def validate_source(cfg: DataConfig) -> None:
    """Fail before any run exists when a local dataset path or one of its splits is missing, or a file of a split
    cannot serve as its text (``check_file``)."""
    if not is_local(cfg.dataset):
        return
    files = local_files(cfg.dataset)
    for param, split in (("train_split", cfg.train_split), ("val_split", cfg.val_split)):
        if split not in files:
            raise ConfigError(param, split, "a split present in dataset: " + ", ".join(sorted(files)))
        for p in files[split]:
            if not os.access(p, os.R_OK):
                raise ConfigError("dataset", str(p), "readable files")
            check_file(p, split, cfg.encoding)


# --------------------------------------------------------------------------- checking local files

CHUNK = 1 << 20  # bytes read at a time when checking a file
HEAD_CHARS = 1 << 16  # decoded characters kept for the table checks (header line, first record)
_CHECKED: set[tuple] = set()  # (path, size, mtime, encoding) of files already checked by this process


def check_file(path: Path, split: str, encoding: str = "utf-8") -> None:
    """Raise DataFileError (one line: the file as given, the split, the problem, what is allowed) when ``path``
    cannot serve as text: empty; not text (a NUL byte: binary); not decodable with ``encoding`` (byte offset, line
    and the bad byte); a parquet/jsonl/json/csv table without a 'text' column. Compressed text (.gz, .bz2, .xz,
    or a gzip file under any name, as ``datasets`` decompresses it) is checked decompressed. Reads the whole file
    once per process (remembered by size, mtime and encoding)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, encoding)
    if key in _CHECKED:
        return
    if st.st_size == 0:
        raise DataFileError(path, split, "is empty (0 bytes)", "a file with text in it")
    if file_kind(path) == ".parquet":
        _check_parquet(path, split)
    else:
        head = _check_text(path, split, encoding)
        _check_table_head(path, split, head)
    _CHECKED.add(key)


def _check_parquet(path: Path, split: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (ValueError, OSError) as exc:
        raise DataFileError(path, split, f"is not a readable parquet file ({_first_line(exc)})",
                            "a parquet table with a string column named 'text'") from None
    if "text" not in names:
        raise DataFileError(path, split, f"has no 'text' column (its columns: {', '.join(names) or 'none'})",
                            "a parquet table with a string column named 'text'")


def _opener(path: Path):
    """The opener ``datasets`` would read ``path`` with: a decompressor when its first bytes say so, else open."""
    with open(path, "rb") as fh:
        magic = fh.read(8)
    return next((o for m, o in COMPRESSIONS.values() if magic.startswith(m)), open), magic


def _check_text(path: Path, split: str, encoding: str) -> str:
    """Decode the whole file (decompressed) with ``encoding``; return its first HEAD_CHARS characters."""
    opener, _ = _opener(path)
    where = "" if opener is open else " of the decompressed text"
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))  # NUL bytes are normal there
    dec = codecs.getincrementaldecoder(encoding)("strict")
    allowed = f"{encoding} text, or encoding=<the file's encoding> (e.g. latin-1, cp1252, utf-16)"
    offset = lines = 0
    head, has_text = "", False
    try:
        with opener(path, "rb") as fh:
            while True:
                chunk = fh.read(CHUNK)
                z = -1 if wide else chunk.find(b"\0")
                if z >= 0:
                    raise DataFileError(path, split, f"is not text: a NUL byte at byte offset {offset + z}{where} "
                                        "(binary data)", FILE_KINDS)
                try:
                    text = dec.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    pending = len(exc.object) - len(chunk)  # bytes the decoder kept from the previous chunk
                    at = offset - pending + exc.start
                    line = lines + exc.object[:exc.start].count(b"\n") + 1
                    raise DataFileError(path, split, f"is not valid {encoding}: byte 0x{exc.object[exc.start]:02x} "
                                        f"at byte offset {at} (line {line}){where} ({exc.reason})", allowed) from None
                if len(head) < HEAD_CHARS:
                    head += text[:HEAD_CHARS - len(head)]
                has_text = has_text or bool(text.strip())
                if not chunk:
                    break
                offset += len(chunk)
                lines += chunk.count(b"\n")
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataFileError(path, split, f"cannot be read or decompressed ({_first_line(exc)})", FILE_KINDS) from None
    if not has_text:
        raise DataFileError(path, split, "has no text (whitespace only)" if offset else "is empty after decompression",
                            "a file with text in it")
    return head


def _check_table_head(path: Path, split: str, head: str) -> None:
    """jsonl/json: the first record has a 'text' field; csv: the header names a 'text' column."""
    kind = file_kind(path)
    body = head.lstrip("\ufeff \t\r\n")
    if kind == ".csv":
        header = next(csv.reader([body.splitlines()[0]]), [])
        if "text" not in [h.strip() for h in header]:
            raise DataFileError(path, split, f"has no 'text' column (its header: {', '.join(header)})",
                                "a csv table whose header names a 'text' column")
    elif kind in (".jsonl", ".json"):
        allowed = "JSON lines (or a JSON list) of objects with a 'text' field"
        try:
            if body.startswith("["):
                first, _ = json.JSONDecoder().raw_decode(body[1:].lstrip())
            elif body.startswith("{"):
                first = json.loads(body.splitlines()[0])
            else:
                what = "JSON lines" if kind == ".jsonl" else "JSON"
                raise DataFileError(path, split, f"is not {what} (it starts with {body[:12]!r})", allowed)
        except json.JSONDecodeError as exc:
            if kind == ".jsonl":
                raise DataFileError(path, split, f"is not JSON lines: its first line is not a JSON object ({exc.msg})",
                                    allowed) from None
            return  # a .json object over several lines (or a first record past the head): datasets decides
        if not isinstance(first, dict) or "text" not in first:
            fields = ", ".join(map(str, first)) if isinstance(first, dict) else type(first).__name__
            raise DataFileError(path, split, f"has no 'text' field (its first record: {fields})", allowed)


def _first_line(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:  # the innermost cause says what was wrong
        exc = exc.__cause__ or exc.__context__
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _builder(files: list[Path]) -> str:
    ext = {file_kind(p) for p in files}
    if ext <= {".parquet"}:
        return "parquet"
    if ext <= {".jsonl", ".json"}:
        return "json"
    if ext <= {".csv"}:
        return "csv"
    return "text"


_HEADING = re.compile(r"^ = [^=].* = $")  # a WikiText article title line


def _documents_from_lines(lines: Iterator[str]) -> Iterator[str]:
    """Join line rows into documents, starting a new one at each WikiText article title."""
    doc: list[str] = []
    for line in lines:
        if _HEADING.match(line) and any(s.strip() for s in doc):
            yield "\n".join(doc)
            doc = []
        doc.append(line)
    if any(s.strip() for s in doc):
        yield "\n".join(doc)


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (never with HF_HUB_OFFLINE set)."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    return reachable(host, 443, timeout)


@dataclass
class TextSource:
    """Documents of one split plus an identifier of their content (for the cache key)."""

    name: str
    split: str
    content_id: str
    docs: Iterator[str]
    streamed: bool = False
    """Read only as far as a budget needs (its content_id names the budget); else the whole split is cached."""


def open_split(cfg: DataConfig, split: str, max_tokens: int | None = None) -> TextSource:
    """Open ``split`` of ``cfg.dataset`` as a stream of documents."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if is_local(cfg.dataset):
        files = local_files(cfg.dataset)
        if split not in files:
            param = "train_split" if split == cfg.train_split else "val_split"
            raise ConfigError(param, split, "a split present in dataset: " + ", ".join(sorted(files)))
        h = hashlib.sha256()
        for p in files[split]:
            try:
                h.update(p.read_bytes())
            except OSError as exc:
                raise ConfigError("dataset", str(p), f"a readable file ({exc.strerror})") from None
            check_file(p, split, cfg.encoding)
        builder = _builder(files[split])
        shown = ", ".join(map(str, files[split]))
        kw = {"encoding": cfg.encoding} if builder != "parquet" and cfg.encoding != "utf-8" else {}
        try:
            ds = datasets.load_dataset(builder, data_files={split: [str(p) for p in files[split]]}, split=split, **kw)
        except (datasets.exceptions.DatasetsError, ValueError) as exc:  # ValueError: schema, arrow and decode errors
            raise DataFileError(shown, split, f"cannot be read by datasets' {builder} reader ({_first_line(exc)})",
                                FILE_KINDS) from None
        if "text" not in ds.column_names or getattr(ds.features["text"], "dtype", "") not in ("string", "large_string"):
            raise DataFileError(shown, split, f"has no string 'text' column (columns: {', '.join(ds.column_names)})",
                                "files with a 'text' column of strings")
        rows = (r["text"] or "" for r in ds)
        docs = _documents_from_lines(r.rstrip("\n") for r in rows) if builder == "text" else rows
        name = "local-" + "-".join(sorted({p.parent.name for p in files[split]}))[:40]
        return TextSource(name, split, h.hexdigest()[:16], docs)

    path, conf, streamed = HUB[cfg.dataset]
    if not hub_reachable():
        raise DataUnavailable(f"dataset '{cfg.dataset}': the Hugging Face hub cannot be reached; {OFFLINE_HINT}")
    if streamed:  # openwebtext: stream only as many documents as the budget needs
        ds = datasets.load_dataset(path, split="train", streaming=True)
        it = (r["text"] for r in ds)
        if split == "train":
            it = (d for i, d in enumerate(it) if i >= OPENWEBTEXT_VAL_DOCS)
        else:
            it = (d for i, d in enumerate(it) if i < OPENWEBTEXT_VAL_DOCS)
        budget = f"{split}-{_round_pow2(max_tokens or 0)}"
        return TextSource(cfg.dataset, split, budget, it, streamed=True)
    ds = datasets.load_dataset(path, conf, split=split)
    return TextSource(cfg.dataset, split, ds._fingerprint[:16], _documents_from_lines(r["text"].rstrip("\n") for r in ds))


def dataset_source(cfg: DataConfig, split: str) -> dict[str, str]:
    """Where a split comes from, for the run's dataset input: {'kind': 'local', 'uri': path} or {'kind': 'hub',
    'path': hub id, 'config': name, 'split': split}."""
    if is_local(cfg.dataset):
        return {"kind": "local", "uri": cfg.dataset}
    path, conf, _ = HUB[cfg.dataset]
    return {"kind": "hub", "path": path, "config": conf or "", "split": "train" if path.endswith("openwebtext")
            else split}


def _round_pow2(n: int) -> int:
    return 1 << max(20, math.ceil(math.log2(max(n, 1))))


# --------------------------------------------------------------------------- token cache


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("SCALING_LAB_CACHE") or str(Path.home() / ".cache" / "scaling_lab")
    return Path(root).expanduser()


@dataclass
class TokenSplit:
    """Token ids of one split on disk: ids (n_tokens,) uint16 memmap and its meta."""

    ids: np.ndarray
    n_bytes: int
    n_docs: int
    path: Path
    content_id: str = ""
    """Hash of the split's text as read (local files: sha256 of their bytes; hub: the dataset's fingerprint)."""


def load_tokens(cfg: DataConfig, split: str, max_tokens: int | None = None) -> TokenSplit:
    """Token ids of a split, from the cache when present, else tokenized in batches and cached."""
    src = open_split(cfg, split, max_tokens)
    key = f"{src.name}|{split}|{cfg.tokenizer}|{cfg.vocab_size}|{src.content_id}"
    if cfg.encoding != "utf-8":  # the same bytes decode to other text
        key += f"|{cfg.encoding}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = f"{src.name}-{split}-{cfg.tokenizer}{cfg.vocab_size}-{digest}"
    root = cache_root(cfg)
    bin_path, meta_path = root / f"{stem}.bin", root / f"{stem}.json"
    if bin_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        ids = np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(meta["n_tokens"],))
        return TokenSplit(ids, meta["n_bytes"], meta["n_docs"], bin_path, src.content_id)

    enc = get_encoding(cfg.vocab_size, cfg.tokenizer)
    chunks: list[np.ndarray] = []
    n_tokens = n_bytes = n_docs = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens, n_bytes, n_docs
        for ids in enc.encode_ordinary_batch(batch, num_threads=2):
            ids.append(enc.eot_token)  # end-of-text between documents
            chunks.append(np.asarray(ids, dtype=np.uint16))
            n_tokens += len(ids)
        n_bytes += sum(len(d.encode("utf-8")) for d in batch)
        n_docs += len(batch)
        batch.clear()

    for doc in src.docs:
        batch.append(doc)
        if len(batch) >= 256:
            flush()
            if src.streamed and max_tokens and n_tokens >= max_tokens:  # else the cache holds the whole split
                break
    if batch:
        flush()
    if n_tokens == 0:
        raise ConfigError("dataset", cfg.dataset, f"a '{split}' split with text in it")
    root.mkdir(parents=True, exist_ok=True)
    # atomic, and safe when several processes (search workers) tokenize the same split at once: each writes
    # its own temporary files and renames them; a killed run never leaves half a cache, a reader never sees one
    tmp = root / f"{stem}.{os.getpid()}.tmp"
    try:
        np.concatenate(chunks).tofile(tmp)
        os.replace(tmp, bin_path)
        meta = {"n_tokens": n_tokens, "n_bytes": n_bytes, "n_docs": n_docs, "key": key}
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)  # the meta last: a reader that finds it finds the whole .bin
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no stray temporary file
    ids = np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(n_tokens,))
    return TokenSplit(ids, n_bytes, n_docs, bin_path, src.content_id)


def check_length(cfg: DataConfig, block_size: int) -> None:
    """Fail before any run exists when a local split holds fewer than block_size+2 tokens (one training window
    and its shifted target); tokenizes both splits into the cache the run then reads."""
    if not is_local(cfg.dataset):
        return
    for param, split in (("train_split", cfg.train_split), ("val_split", cfg.val_split)):
        n = len(load_tokens(cfg, split).ids)
        if n < block_size + 2:
            shown = ", ".join(map(str, local_files(cfg.dataset)[split]))
            raise DataFileError(shown, split, f"holds {n} tokens at vocab_size {cfg.vocab_size}, fewer than "
                                f"block_size+2 = {block_size + 2}", f"more text for {param}={split}, or a smaller "
                                "block_size")


def unigram_entropy(ids: np.ndarray, n_vocab: int) -> float:
    """Entropy of the token frequency distribution in nats: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(ids), minlength=n_vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------- batches


class Batches:
    """Random training windows, a pure function of (seed, step, micro index), so resume is exact."""

    def __init__(self, ids: np.ndarray, block_size: int, seed: int):
        if len(ids) < block_size + 2:
            raise ConfigError("dataset", f"{len(ids)} tokens", f"at least block_size+2 = {block_size + 2} training tokens")
        self.data = torch.from_numpy(np.asarray(ids, dtype=np.int64))  # (n_tokens,)
        self.block_size = block_size
        self.seed = seed

    def get(self, step: int, micro: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch, block_size) int64, y shifted by one token."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + micro)
        start = torch.randint(len(self.data) - self.block_size - 1, (batch,), generator=g)
        offsets = start[:, None] + torch.arange(self.block_size + 1)[None, :]  # (batch, T+1)
        w = self.data[offsets]
        return w[:, :-1], w[:, 1:]


def eval_windows(ids: np.ndarray, block_size: int, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed validation windows spread evenly over the split: x, y (n_windows, block_size) int64."""
    n = max(1, eval_tokens // block_size)
    span = len(ids) - block_size - 1
    if span < 1:
        raise ConfigError("val_split", f"{len(ids)} tokens", f"at least block_size+2 = {block_size + 2} tokens")
    n = min(n, span)
    starts = np.linspace(0, span, n, dtype=np.int64)
    data = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    w = data[torch.from_numpy(starts)[:, None] + torch.arange(block_size + 1)[None, :]]
    return w[:, :-1], w[:, 1:]


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Loss in bits per UTF-8 byte: loss * tokens / (bytes * ln 2)."""
    return loss_nats * n_tokens / (n_bytes * math.log(2))

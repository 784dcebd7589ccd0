"""Text -> tokens -> cached uint16 memmaps -> batches.

Text comes through Hugging Face ``datasets`` (hub datasets, or local text/parquet/jsonl files),
tokens through tiktoken's GPT-2 BPE truncated to ``vocab_size`` ranks. Token ids are cached as
uint16 memmaps keyed by dataset, split, tokenizer, vocabulary and content hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scaling_lab.config import GPT2_RANKS, NAMED_DATASETS, DataConfig
from scaling_lab.errors import ConfigError, DataUnavailable

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
OFFLINE_HINT = (
    "pass local files with dataset=/path/to/dir (train*/valid*/test* .txt/.raw, .parquet or .jsonl with a 'text' "
    "column; train_split=test trains on a test file) and set TIKTOKEN_CACHE_DIR to an offline tiktoken cache"
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
        if split and (p.suffix in TEXT_EXTENSIONS + (".parquet", ".jsonl", ".json")):
            splits.setdefault(split, []).append(p)
    if not splits:
        raise ConfigError("dataset", dataset, "files named train*/valid*/validation*/test* (text, parquet or jsonl)")
    return splits


def is_local(dataset: str) -> bool:
    return dataset not in NAMED_DATASETS


def validate_source(cfg: DataConfig) -> None:
    """Fail before any run exists when a local dataset path or one of its splits is missing."""
    if not is_local(cfg.dataset):
        return
    files = local_files(cfg.dataset)
    for param, split in (("train_split", cfg.train_split), ("val_split", cfg.val_split)):
        if split not in files:
            raise ConfigError(param, split, "a split present in dataset: " + ", ".join(sorted(files)))
        for p in files[split]:
            if not os.access(p, os.R_OK):
                raise ConfigError("dataset", str(p), "readable files")


def _builder(files: list[Path]) -> str:
    ext = {p.suffix for p in files}
    if ext <= {".parquet"}:
        return "parquet"
    if ext <= {".jsonl", ".json"}:
        return "json"
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
        builder = _builder(files[split])
        ds = datasets.load_dataset(builder, data_files={split: [str(p) for p in files[split]]}, split=split)
        if "text" not in ds.column_names:
            raise ConfigError("dataset", cfg.dataset, "files with a 'text' column")
        rows = (r["text"] for r in ds)
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
        return TextSource(cfg.dataset, split, budget, it)
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
            if max_tokens and n_tokens >= max_tokens:
                break
    if batch:
        flush()
    if n_tokens == 0:
        raise ConfigError("dataset", cfg.dataset, f"a '{split}' split with text in it")
    root.mkdir(parents=True, exist_ok=True)
    # atomic, and safe when several processes (search workers) tokenize the same split at once: each writes
    # its own temporary files and renames them; a killed run never leaves half a cache, a reader never sees one
    tmp = root / f"{stem}.{os.getpid()}.tmp"
    np.concatenate(chunks).tofile(tmp)
    os.replace(tmp, bin_path)
    meta = {"n_tokens": n_tokens, "n_bytes": n_bytes, "n_docs": n_docs, "key": key}
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)  # the meta last: a reader that finds it finds the whole .bin
    ids = np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(n_tokens,))
    return TokenSplit(ids, n_bytes, n_docs, bin_path, src.content_id)


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

"""Tokenizer truncation, local datasets through `datasets`, the token cache, batches and bits per byte."""

import dataclasses
import gzip
import json
import lzma
import math
import time

import numpy as np
import pytest

from scaling_lab import data
from scaling_lab.config import ConfigError, DataConfig, n_vocab_for, resolve
from scaling_lab.errors import DataFileError


@pytest.fixture(scope="module")
def wiki_text():
    from conftest import DATA_DIR

    return (DATA_DIR / "wiki.test.raw").read_text(encoding="utf-8")[:300_000]


@pytest.mark.parametrize("vocab_size", [256, 512, 1024, 4096, 50257])
def test_truncated_encoding_round_trips_and_stays_below_vocab(vocab_size, wiki_text):
    enc = data.get_encoding(vocab_size)
    ids = enc.encode_ordinary(wiki_text)
    assert enc.decode(ids) == wiki_text
    assert max(ids) < min(vocab_size, 50256)
    assert enc.n_vocab == n_vocab_for(vocab_size)
    assert enc.eot_token == n_vocab_for(vocab_size) - 1
    if vocab_size == 256:
        assert len(ids) == len(wiki_text.encode("utf-8"))  # byte level


def test_bytes_per_token_grows_with_vocabulary(wiki_text):
    nbytes = len(wiki_text.encode("utf-8"))
    bpt = [nbytes / len(data.get_encoding(v).encode_ordinary(wiki_text)) for v in (256, 1024, 50257)]
    assert bpt[0] == pytest.approx(1.0) and bpt[0] < bpt[1] < bpt[2]


def test_full_vocabulary_is_gpt2_itself(wiki_text):
    import tiktoken

    assert data.get_encoding(50257).encode_ordinary(wiki_text[:5000]) == tiktoken.get_encoding(
        "gpt2").encode_ordinary(wiki_text[:5000])


def test_bits_per_byte_known_case():
    # 100 tokens at ln(2) nats each over 50 bytes = 2 bits per byte
    assert data.bits_per_byte(math.log(2), 100, 50) == pytest.approx(2.0)
    assert data.bits_per_byte(3.0, 1000, 2000) == pytest.approx(3.0 * 1000 / (2000 * math.log(2)))


def test_token_byte_lengths_sum_to_text_bytes(wiki_text):
    enc = data.get_encoding(512)
    ids = np.array(enc.encode_ordinary(wiki_text[:20_000]))
    assert data.token_byte_lengths(enc)[ids].sum() == len(wiki_text[:20_000].encode("utf-8"))


@pytest.mark.parametrize("bad", [100, 255, 50258, "abc", "1.5"])
def test_bad_vocab_size(bad):
    with pytest.raises(ConfigError, match="vocab_size"):
        resolve({"mode": "tiny", "vocab_size": bad})


def test_local_split_inference(data_dir):
    splits = data.local_files(str(data_dir))
    assert sorted(splits) == ["test", "validation"]
    assert splits["validation"][0].name == "wiki.valid.raw"


def test_token_cache_second_load_is_fast_and_identical(data_dir, tmp_path):
    cfg = DataConfig(dataset=str(data_dir), vocab_size=512, cache_dir=str(tmp_path))
    first = data.load_tokens(cfg, "validation")
    t0 = time.perf_counter()
    second = data.load_tokens(cfg, "validation")
    assert time.perf_counter() - t0 < 1.0
    assert np.array_equal(np.asarray(first.ids), np.asarray(second.ids))
    # bytes of the documents: the file less one newline per article boundary and the trailing newline
    assert abs(first.n_bytes - (data_dir / "wiki.valid.raw").stat().st_size) <= first.n_docs + 1
    # documents separated by end-of-text; WikiText-2 valid has 60 articles
    assert int((np.asarray(first.ids) == 512).sum()) == first.n_docs
    assert first.n_docs == 60
    # a different vocabulary is a different cache entry
    other = data.load_tokens(DataConfig(dataset=str(data_dir), vocab_size=1024, cache_dir=str(tmp_path)), "validation")
    assert other.path != first.path and len(other.ids) < len(first.ids)



_LOAD = """
import hashlib, sys, time
import numpy as np
from scaling_lab import data
from scaling_lab.config import DataConfig
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # start together
s = data.load_tokens(DataConfig(dataset=sys.argv[1], vocab_size=512, cache_dir=sys.argv[2]), "validation")
print(hashlib.sha256(np.asarray(s.ids).tobytes()).hexdigest(), s.n_docs)
"""


def test_processes_filling_one_cold_cache_at_once_all_get_the_same_tokens(data_dir, tmp_path):
    """Search workers start together on a cold cache: each tokenizes, writes its own temporary files and renames
    them; none fails, all read the same tokens, and no temporary file is left."""
    import subprocess
    import sys

    start = time.time() + 6.0  # after every process has imported its libraries
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(data_dir), str(tmp_path), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1 and outs[0][0].split()[1] == "60"
    assert not list(tmp_path.glob("*.tmp"))
    assert len(list(tmp_path.glob("*.bin"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1

def test_parquet_and_jsonl_local_files(tmp_path):
    import pandas as pd

    docs = ["The first document. " * 30, "A second one, with more words. " * 30]
    pd.DataFrame({"text": docs}).to_parquet(tmp_path / "train.parquet")
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    cfg = DataConfig(dataset=str(tmp_path), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    train = data.load_tokens(cfg, "train")
    val = data.load_tokens(cfg, "validation")
    enc = data.get_encoding(300)
    assert train.n_docs == 2 and np.array_equal(np.asarray(train.ids), np.asarray(val.ids))
    assert enc.decode(list(np.asarray(train.ids)[: len(enc.encode_ordinary(docs[0]))])) == docs[0]


def test_missing_text_column(tmp_path):
    import pandas as pd

    pd.DataFrame({"body": ["x" * 100]}).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ConfigError, match="'text' column"):
        data.load_tokens(DataConfig(dataset=str(tmp_path), cache_dir=str(tmp_path / "c")), "train")


# --------------------------------------------------------------------------- bad local files (issue #17.1)

BAD_FILES = [  # (file name, bytes, encoding, words of the one-line message)
    ("train.txt", b"", "utf-8", ["is empty (0 bytes)"]),
    ("train.txt", bytes(range(256)) * 8, "utf-8", ["not text", "NUL byte at byte offset 0"]),
    ("train.txt", bytes(range(256)) * 8, "latin-1", ["not text", "NUL byte"]),  # any byte is latin-1, not text
    ("train.txt", b"line one\nna\xefve\n", "utf-8", ["not valid utf-8", "byte 0xef at byte offset 11 (line 2)"]),
    ("train.txt", "caf\u00e9".encode()[:-1], "utf-8", ["byte 0xc3 at byte offset 3", "unexpected end of data"]),
    ("train.txt", b" \n\t\n", "utf-8", ["no text (whitespace only)"]),
    ("train.txt.gz", gzip.compress(b"", mtime=0), "utf-8", ["empty after decompression"]),
    ("train.txt.gz", b"\x1f\x8b\x08\x00broken", "utf-8", ["cannot be read or decompressed"]),
    ("train.jsonl", b'{"body": "x"}\n', "utf-8", ["no 'text' field (its first record: body)"]),
    ("train.jsonl", b"not json\n", "utf-8", ["not JSON lines"]),
    ("train.json", b'[{"title": "t"}]', "utf-8", ["no 'text' field (its first record: title)"]),
    ("train.csv", b"title,body\na,b\n", "utf-8", ["no 'text' column (its header: title, body)"]),
    ("train.parquet", b"PAR1 not really", "utf-8", ["not a readable parquet file"]),
]


@pytest.mark.parametrize("name, raw, encoding, words", BAD_FILES)
def test_a_bad_file_is_one_line_naming_file_split_and_problem(tmp_path, name, raw, encoding, words):
    (tmp_path / name).write_bytes(raw)
    (tmp_path / "valid.txt").write_text("fine text\n")
    cfg = DataConfig(dataset=str(tmp_path), encoding=encoding, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataFileError) as err:
        data.validate_source(cfg)
    msg = str(err.value)
    assert "\n" not in msg and f"file '{tmp_path / name}' (split 'train')" in msg and "allowed:" in msg
    for w in words:
        assert w in msg, msg
    with pytest.raises(DataFileError):  # the library path (a search worker, train()) checks the same
        data.load_tokens(cfg, "train")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_compressed_text_reads_as_the_plain_text(tmp_path, wiki_text):
    """train.txt.gz, and gzip bytes under a plain name (datasets decompresses both), give the plain file's tokens."""
    text = wiki_text[:50_000].encode()
    for folder, name, raw in (("plain", "train.txt", text), ("gz", "train.txt.gz", gzip.compress(text)),
                              ("xz", "train.txt.xz", lzma.compress(text)), ("gzname", "train.txt", gzip.compress(text))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(raw)
    cfg = lambda f: DataConfig(dataset=str(tmp_path / f), vocab_size=512, cache_dir=str(tmp_path / "c"))  # noqa: E731
    plain = np.asarray(data.load_tokens(cfg("plain"), "train").ids)
    assert len(plain) > 1000
    for folder in ("gz", "xz", "gzname"):
        data.validate_source(dataclasses.replace(cfg(folder), val_split="train"))
        assert np.array_equal(np.asarray(data.load_tokens(cfg(folder), "train").ids), plain), folder


def test_encoding_option_reads_latin1_text(tmp_path):
    text = "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve d\u00e9j\u00e0 vu.\n" * 40
    (tmp_path / "train.txt").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataFileError, match="encoding="):
        data.check_file(tmp_path / "train.txt", "train")
    cfg = DataConfig(dataset=str(tmp_path), vocab_size=256, encoding="latin-1", cache_dir=str(tmp_path / "c"))
    ids = np.asarray(data.load_tokens(cfg, "train").ids)
    enc = data.get_encoding(256)
    assert enc.decode([int(i) for i in ids if i != enc.eot_token]) == text.rstrip("\n").replace("\n\n", "\n")
    with pytest.raises(ConfigError, match="parameter 'encoding'"):
        DataConfig(encoding="klingon")
    with pytest.raises(ConfigError, match="parameter 'encoding'"):
        DataConfig(encoding="rot13")  # a codec, but not a text encoding


def test_a_file_datasets_cannot_read_fails_in_one_line_and_caches_nothing(tmp_path):
    """A JSON-lines file whose first record is fine and a later one broken passes the quick check; datasets' reader
    then fails: one line naming the file, and no cache file, whole or partial."""
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(50)] + ['{"text": "unterminated']
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(dataset=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    data.check_file(tmp_path / "train.jsonl", "train")
    with pytest.raises(DataFileError, match="cannot be read by datasets' json reader") as err:
        data.load_tokens(cfg, "train")
    assert "\n" not in str(err.value) and "train.jsonl" in str(err.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_data_shorter_than_a_block_is_named_with_the_block_size(tmp_path):
    (tmp_path / "train.txt").write_text("hello world\n")
    (tmp_path / "valid.txt").write_text("plenty of text here " * 50)
    cfg = DataConfig(dataset=str(tmp_path), vocab_size=256, cache_dir=str(tmp_path / "c"))
    data.check_length(cfg, block_size=8)  # 'hello world' (one byte per token) + end-of-text: 12 tokens >= 10
    with pytest.raises(DataFileError, match=r"holds 12 tokens at vocab_size 256, fewer than block_size\+2 = 66"):
        data.check_length(cfg, block_size=64)


def test_the_cache_holds_the_whole_split_whatever_the_first_budget(tmp_path):
    """A short first run must not cache a truncated split that a longer run later trains on (local files are read
    whole; only streamed hub data stops at the budget)."""
    doc = " = Title {} = \n" + "some words in this article . " * 20 + "\n"
    (tmp_path / "train.txt").write_text("".join(doc.format(i) for i in range(600)))
    cfg = DataConfig(dataset=str(tmp_path), vocab_size=256, cache_dir=str(tmp_path / "c"))
    first = data.load_tokens(cfg, "train", max_tokens=1000)
    assert first.n_docs == 600
    assert len(data.load_tokens(cfg, "train", max_tokens=10**9).ids) == len(first.ids)


def test_hub_unreachable_fails_fast_with_the_fix():
    t0 = time.perf_counter()
    with pytest.raises(data.DataUnavailable, match="TIKTOKEN_CACHE_DIR") as err:
        data.load_tokens(DataConfig(dataset="wikitext-2"), "train")
    assert time.perf_counter() - t0 < 10
    assert "dataset=" in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_without_cache_fails_with_the_fix(monkeypatch, tmp_path):
    import tiktoken.registry

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(data.DataUnavailable, match="TIKTOKEN_CACHE_DIR"):
        data.get_encoding(512)


def test_batches_are_a_function_of_step(data_dir, tmp_path):
    cfg = DataConfig(dataset=str(data_dir), vocab_size=512, cache_dir=str(tmp_path))
    ids = data.load_tokens(cfg, "validation").ids
    b = data.Batches(ids, block_size=16, seed=3)
    x1, y1 = b.get(5, 0, 4)
    x2, y2 = data.Batches(ids, block_size=16, seed=3).get(5, 0, 4)
    assert x1.shape == (4, 16) and (x1 == x2).all() and (x1[:, 1:] == y1[:, :-1]).all()
    assert not (b.get(6, 0, 4)[0] == x1).all()

"""Tokenizer truncation, local datasets through `datasets`, the token cache, batches and bits per byte."""

import json
import math
import time

import numpy as np
import pytest

from scaling_lab import data
from scaling_lab.config import ConfigError, DataConfig, n_vocab_for, resolve


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

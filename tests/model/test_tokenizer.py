import json
import random

import pytest

from model.tokenizer import BOS, EOS, PAD, TokenizerConfig, load_tokenizer, train_tokenizer
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.conftest import prose, write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rows = [
        {"id": f"d{i}", "text": prose(i, 200) + " The quick brown fox. Ünïcode café 東京.", "quality_score": 0.5}
        for i in range(40)
    ]
    build_curriculum([str(write_jsonl(d / "scored.jsonl", rows))], d / "shards", CurriculumConfig())
    stats = train_tokenizer(d / "shards", d / "tok", TokenizerConfig(vocab_size=600))
    return d, stats


def random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x2FF), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars) + rng.choice(["", "\n", "\t", "  ", "\r\n", "\x00"])


def test_round_trip_of_arbitrary_unicode(trained):
    d, _ = trained
    tokenizer = load_tokenizer(d / "tok" / "tokenizer.json")
    rng = random.Random(0)
    samples = [random_unicode(rng, rng.randint(0, 60)) for _ in range(300)]
    samples += ["", " leading space", "e\u0301 combining", "\U0010ffff", "tabs\tand\nnewlines  "]
    for text in samples:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_vocabulary_special_tokens_and_compression(trained):
    d, stats = trained
    tokenizer = load_tokenizer(d / "tok" / "tokenizer.json")
    assert tokenizer.get_vocab_size() == stats.vocab_size == 600
    assert [tokenizer.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    assert stats.chars_per_token > 2.0  # merges learned from the shards compress them
    saved = json.loads((d / "tok" / "tokenizer_stats.json").read_text())
    assert saved["config"]["vocab_size"] == 600


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no manifest"):
        train_tokenizer(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(tmp_path, tmp_path / "out", TokenizerConfig(vocab_size=100))
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_tokenizer(broken)

"""Windows from the local copies of wikitext-2 and PG-19."""

import numpy as np
import pytest

from kvlib import data


class WordTokenizer:
    """A stand-in tokenizer with the call signature kvlib uses: one id per whitespace-separated word."""

    eos_token_id = 0
    name_or_path = "words"

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        ids = [[self.vocab.setdefault(word, len(self.vocab) + 1) for word in text.split()] for text in texts]
        return {"input_ids": ids}


def test_token_stream_joins_texts_with_eos_and_cuts_by_tokens():
    tokenizer = WordTokenizer()
    stream = data.token_stream(["a b c", "d e"], tokenizer)
    assert stream.tolist() == [1, 2, 3, 0, 4, 5]
    windows = data.make_windows(stream, max_length=2)
    assert windows.tolist() == [[1, 2], [3, 0], [4, 5]]
    assert data.make_windows(stream, max_length=4).shape == (1, 4)
    assert data.make_windows(stream, max_length=2, max_samples=2).shape == (2, 2)


def test_wikitext_local_rows(data_dir):
    lines = data.wikitext_lines(data_dir)
    assert len(lines) == 2891  # the README's count of non-empty rows
    assert lines[0] == " = Robert Boulter = "
    assert all(line.strip() for line in lines)


def test_pg19_strips_gutenberg_and_caps_characters(data_dir):
    books = data.pg19_books(data_dir, max_chars=400_000)
    assert sum(len(b) for b in books) == 400_000
    assert len(books) == 2
    for book in books:
        assert "START OF TH" not in book and "END OF TH" not in book and "FULL LICENSE" not in book
        assert "\r" not in book
    assert "REMINISCENCES OF PIONEER DAYS" in books[0][:500].upper()
    assert len(data.pg19_books(data_dir, max_chars=1000)) == 1


def test_strip_gutenberg_handles_crlf_and_missing_markers():
    text = (
        "header\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nbody\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicence"
    )
    assert data.strip_gutenberg(text.replace("\r\n", "\n")) == "body"
    assert data.strip_gutenberg("just text") == "just text"


def test_same_inputs_same_windows_and_npy_roundtrip(data_dir, smollm2_tokenizer, tmp_path):
    first = data.load_windows("wikitext", smollm2_tokenizer, 256, max_samples=5, data_dir=data_dir)
    second = data.load_windows("wikitext", smollm2_tokenizer, 256, max_samples=5, data_dir=data_dir)
    assert first.shape == (5, 256) and np.array_equal(first, second)
    path = data.save_windows(first, tmp_path / "w.npy")
    assert np.array_equal(np.load(path), first)


def test_too_little_text_and_unknown_dataset(data_dir, smollm2_tokenizer):
    with pytest.raises(ValueError, match="pg19 from .* gives 0 windows of 1024 tokens; 1 are needed.*pg19_max_chars"):
        data.load_windows("pg19", smollm2_tokenizer, 1024, data_dir=data_dir, pg19_max_chars=2000)
    with pytest.raises(ValueError, match="unknown dataset 'c4'; choose one of wikitext, pg19"):
        data.load_windows("c4", smollm2_tokenizer, 1024, data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.load_windows("wikitext", smollm2_tokenizer, 1024, data_dir="/nonexistent")


def test_token_statistics():
    tokenizer = WordTokenizer()
    tokenizer.decode = lambda ids: " ".join(map(str, ids))
    windows = np.array([[1, 2, 0, 3], [3, 3, 0, 4]])
    stats = data.token_statistics(windows, tokenizer)
    assert stats["windows"] == 2 and stats["total_tokens"] == 8 and stats["distinct_tokens"] == 5
    assert stats["eos_separators"] == 2 and stats["chars_per_token_first_window"] == len("1 2 0 3") / 4

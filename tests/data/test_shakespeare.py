"""shakespeare_char: by-play splits, exact windows of the play text, a fixed saved vocabulary."""

import numpy as np
import pytest

from effjax.data import to_arrays
from effjax.data.shakespeare import (
    SEQUENCE_LENGTH,
    ShakespeareChar,
    load_shakespeare_char_source,
    markdown_to_text,
    play_texts,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    out = {}
    for split in ("train", "validation", "test"):
        source, vocab = load_shakespeare_char_source(split, data_dir=data_dir)
        out[split] = to_arrays(source)
    builder = ShakespeareChar(data_dir=data_dir, file_format="array_record")
    return out, vocab, builder.info.metadata["plays"]


def test_markdown_to_text():
    md = ("# Title\n\n### SCENE I. A room.\n\n_Enter A_\n\n**A**  \nHello,  \nworld.\n\n\n\n"
          "**B**  \nHi.")
    assert markdown_to_text(md) == ("Title\n\nSCENE I. A room.\n\nEnter A\n\nA:\nHello,\nworld."
                                    "\n\nB:\nHi.\n")


def test_splits_are_by_play_and_cover_every_play(built):
    arrays, _, plays = built
    assert len(plays) == 38
    by_split = {s: set(a["play"].tolist()) for s, a in arrays.items()}
    assert len(by_split["test"]) == len(by_split["validation"]) == 4
    assert len(by_split["train"]) == 30
    assert set.union(*by_split.values()) == set(range(38))
    assert sum(len(v) for v in by_split.values()) == 38  # pairwise disjoint


def test_windows_are_the_play_text(built):
    arrays, vocab, plays = built
    texts = play_texts()
    assert vocab == "".join(sorted(set("".join(texts.values())))) and len(vocab) <= 256
    window = SEQUENCE_LENGTH + 1
    for a in arrays.values():
        assert a["tokens"].shape[1] == window and a["tokens"].dtype == np.uint8
        for k in range(0, len(a["play"]), 97):  # a spread of windows
            text = texts[plays[a["play"][k]]]
            start = a["offset"][k]
            assert "".join(vocab[t] for t in a["tokens"][k]) == text[start:start + window]
    total = sum(len(a["play"]) for a in arrays.values())
    assert total == sum(len(t) // window for t in texts.values())

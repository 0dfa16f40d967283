"""shakespeare_genre: labels from the play's folder, genre-stratified by-play splits, lines equal
to the play's spoken text."""

import os

import numpy as np
import pytest

from effjax.data import to_arrays
from effjax.data.shakespeare import plays_dir
from effjax.data.shakespeare_genre import (
    GENRES,
    dialogue_lines,
    genre_plays,
    load_shakespeare_genre_source,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    out = {}
    for split in ("train", "validation", "test"):
        source, plays = load_shakespeare_genre_source(split, data_dir=data_dir)
        out[split] = to_arrays(source)
    return out, plays


@pytest.mark.parametrize("md, expected", [
    ("**A**  \nOne,  \ntwo.\n\n**B**  \nThree.", ["One,", "two.", "Three."]),
    # a stage direction over two lines, then a heading: neither is dialogue
    ("_Enter A, with\nB_\n\n**A**  \nHo!\n\n### SCENE II.\n\nNot spoken.", ["Ho!"]),
    # inline and broken stage directions, Markdown escapes, a whole-line direction inside a speech
    ("**A**  \n__\\[Aside]_  Well,\\-- stay.  \n[Within]_  \n_Exit_\nGone *[Draws.]* now",
     ["Well,-- stay.", "Gone now"]),
    ("Prose before any speaker.\n\n**A**\nSpoken.", ["Spoken."]),
])
def test_dialogue_lines(md, expected):
    assert dialogue_lines(md) == expected


def test_labels_come_from_the_folder():
    plays = genre_plays()
    assert len(plays) == 29
    folder_genre = {"comedies": "comedy", "histories": "history", "tragedies": "tragedy",
                    "roman": "tragedy"}
    assert all(g == folder_genre[p.split("/")[0]] for p, g in plays.items())
    assert [sum(g == genre for g in plays.values()) for genre in GENRES] == [8, 11, 10]


def test_splits_are_by_play_and_stratified(built):
    arrays, plays = built
    seen = {s: set(a["play"].tolist()) for s, a in arrays.items()}
    assert sum(map(len, seen.values())) == len(set.union(*seen.values())) == 29
    for split in ("validation", "test"):
        assert len(seen[split]) == 3
        assert sorted(set(arrays[split]["label"].tolist())) == [0, 1, 2]
    labels = genre_plays()
    for a in arrays.values():  # every line carries its play's genre
        want = np.array([GENRES.index(labels[plays[p]]) for p in a["play"]])
        np.testing.assert_array_equal(a["label"], want)


def test_lines_are_the_plays_dialogue(built):
    arrays, plays = built
    root = plays_dir()
    total = 0
    for index, play in enumerate(plays):
        with open(os.path.join(root, play + ".md"), encoding="utf-8") as f:
            want = dialogue_lines(f.read())
        total += len(want)
        for a in arrays.values():
            rows = np.flatnonzero(a["play"] == index)
            if rows.size:
                got = sorted(zip(a["line"][rows].tolist(), a["text"][rows].tolist()))
                assert [t.decode() for _, t in got] == want
    assert sum(len(a["play"]) for a in arrays.values()) == total > 70_000

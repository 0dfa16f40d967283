"""Optional dependencies: import one, or fail with the extra that installs it.

``pip install effjax`` brings the light core only (jax, optax, flax, orbax-checkpoint, chex,
numpy). The data sets need ``effjax[data]`` (tensorflow-datasets, scikit-learn) and the
pretrained-weight loaders need ``effjax[models]`` (safetensors, tokenizers, gguf). Every import
of such a package inside effjax goes through :func:`import_optional`, so the message a user
meets always names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["import_optional"]


def import_optional(module: str, *, extra: str, feature: str,
                    distribution: str | None = None) -> ModuleType:
    """Import ``module``, or raise an ``ImportError`` that names the extra to install.

    Args:
      module: the module to import, e.g. ``"tensorflow_datasets"`` or ``"safetensors.numpy"``.
      extra: the effjax extra that installs it, e.g. ``"data"``.
      feature: what needs it, for the message, e.g. ``"effjax.data"``.
      distribution: its PyPI name when it differs from the top-level module name
        (``"tensorflow-datasets"``, ``"scikit-learn"``).

    Returns:
      The imported module.

    Raises:
      ModuleNotFoundError: (an ``ImportError``) ``module`` cannot be imported; the message is
        ``"<feature> needs <distribution>: pip install 'effjax[<extra>]'"`` and the original
        error is chained.

    Example:

    >>> from effjax._optional import import_optional
    >>> import_optional("json", extra="data", feature="this example").__name__
    'json'
    >>> import_optional("no_such_module_xyz", extra="data", feature="this example")
    Traceback (most recent call last):
    ...
    ModuleNotFoundError: this example needs no_such_module_xyz: pip install 'effjax[data]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        name = distribution or module.partition(".")[0]
        raise ModuleNotFoundError(f"{feature} needs {name}: pip install 'effjax[{extra}]'",
                                  name=e.name) from e

"""Input statistics of a model's linear layers, for data-driven adapter inits (EVA, CorDA).

:func:`calibrate` runs a model on a few batches, intercepts the inputs :math:`x_t` of its
linear layers (Flax Linen ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum``; Flax NNX
``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum``; through the layer interception of
:mod:`effjax.nn.interception`, so the input is the one the kernel contracts, after the layer's
dtype promotion) and accumulates, per layer kernel,

.. math::

  G = \\sum_t x_t x_t^\\top \\in \\mathbb{R}^{n_{in} \\times n_{in}}, \\qquad
  s = \\sum_t x_t, \\qquad n = \\sum_t 1

over every token :math:`t` (every position of the input's leading axes, over all batches and
all calls of the layer), skipping the tokens a mask marks as padding. :math:`x_t` is the input
flattened over the axes the kernel contracts, in the order of the kernel's input axes
(:class:`~effjax.peft.layout.KernelLayout`'s ``n_in``: for a ``LinearGeneral`` output projection
with kernel ``(heads, head_dim, d)`` and ``axis=(-2, -1)``, :math:`x_t` is the
``heads * head_dim`` vector of one position). These second moments are all EVA and CorDA need:

* CorDA's covariance :math:`C = G / n` (uncentered, as the paper and Hugging Face PEFT);
* EVA's principal components: the top right-singular vectors of the *centered* activation
  matrix are the top eigenvectors of the scatter matrix :math:`G - s s^\\top / n`, and the
  explained-variance ratios are its eigenvalues over its trace. PEFT computes the same
  quantities with an incremental, randomized PCA that it stops once the components stop
  changing; from :math:`(G, s, n)` they are exact (see :mod:`effjax.peft.eva`).

The result is ``{kernel path: InputStats}`` keyed exactly like the paths
:func:`effjax.peft.inject` matches rules against (``'blocks/0/query/kernel'`` for an NNX model's
``State``; ``params``-relative paths such as ``'Dense_0/kernel'`` for Linen), so it is passed on
unchanged: ``inject(params, rules, key=key, calibration=stats)``.

Accumulation runs as one ``jax.jit``-compiled step per batch shape (``jit=True``); the model's
state is not changed (NNX models are split and merged inside the step, so BatchNorm statistics
or RNG counters advanced by the forward pass are discarded: put the model in eval mode).
Layers called inside lifted transforms (``nn.scan``, ``nn.remat``, ``nnx.scan`` ...) cannot be
intercepted this way; stacked (scanned) kernels are not supported by :func:`calibrate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from effjax.peft.rules import compile_rules
from effjax.selection import assign_rules, closest_paths, selector

__all__ = ["InputStats", "input_stats", "calibrate"]

_HI = jax.lax.Precision.HIGHEST


class InputStats(NamedTuple):
    """Second-moment statistics of one layer's inputs (float32 arrays).

    Attributes:
      gram: :math:`G = \\sum_t x_t x_t^\\top`, shape ``(*batch, n_in, n_in)`` (``batch`` is
        empty for :func:`calibrate`'s output; per-slice statistics of stacked kernels have it).
      sum: :math:`s = \\sum_t x_t`, shape ``(*batch, n_in)``.
      count: the number of tokens :math:`n`, shape ``(*batch,)``.

    Statistics of disjoint token sets add: ``jax.tree.map(jnp.add, a, b)``.
    """

    gram: jax.Array
    sum: jax.Array
    count: jax.Array

    @property
    def n_in(self) -> int:
        """The input dimension :math:`n_{in}`."""
        return int(self.gram.shape[-1])

    def mean(self) -> jax.Array:
        """:math:`s / n`."""
        return self.sum / self.count[..., None]

    def second_moment(self) -> jax.Array:
        """:math:`G / n` (uncentered covariance; CorDA's :math:`C`)."""
        return self.gram / self.count[..., None, None]

    def scatter(self) -> jax.Array:
        """:math:`G - s s^\\top / n = \\sum_t (x_t - \\bar x)(x_t - \\bar x)^\\top` (centered)."""
        outer = self.sum[..., :, None] * self.sum[..., None, :]
        return self.gram - outer / self.count[..., None, None]


def input_stats(x: Any, *, in_ndim: int = 1, mask: Any = None) -> InputStats:
    """:class:`InputStats` of the tokens of ``x``.

    Args:
      x: ``(*tokens, *in_shape)`` with ``len(in_shape) == in_ndim``; every position of the
        leading axes is one token :math:`x_t \\in \\mathbb{R}^{n_{in}}` (``in_shape`` flattened in
        C order).
      in_ndim: how many trailing axes are the input features.
      mask: None (all tokens) or an array of shape ``x.shape[:-in_ndim]``, nonzero / True for the
        tokens to keep (padding is 0 / False).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1., 2.], [3., 4.], [100., 100.]])
      >>> st = input_stats(x, mask=jnp.array([1, 1, 0]))
      >>> st.gram, st.sum, st.count
      (Array([[10., 14.],
             [14., 20.]], dtype=float32), Array([4., 6.], dtype=float32), Array(2., dtype=float32))
      >>> st.scatter()  # centered: sum_t (x_t - mean)(x_t - mean)^T
      Array([[2., 2.],
             [2., 2.]], dtype=float32)
    """
    x = jnp.asarray(x)
    if isinstance(in_ndim, bool) or not isinstance(in_ndim, (int, np.integer)) or not (
            1 <= in_ndim <= x.ndim):
        raise ValueError(f"in_ndim must be an int in [1, x.ndim={x.ndim}], got {in_ndim!r}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"input_stats needs a real array, got dtype {x.dtype}")
    lead = x.shape[:x.ndim - in_ndim]
    n_in = int(np.prod(x.shape[x.ndim - in_ndim:]))
    xf = x.astype(jnp.float32).reshape(-1, n_in)
    if mask is None:
        w = jnp.ones(xf.shape[:1], jnp.float32)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != lead:
            raise ValueError(f"mask has shape {mask.shape}, the inputs' token axes are {lead} "
                             f"(inputs of shape {x.shape}, {in_ndim} feature axes)")
        w = (mask != 0).astype(jnp.float32).reshape(-1)
    xw = xf * w[:, None]
    return InputStats(gram=jnp.matmul(xw.T, xf, precision=_HI),
                      sum=jnp.sum(xw, axis=0), count=jnp.sum(w))


def _zero_stats(n_in: int) -> InputStats:
    return InputStats(gram=jnp.zeros((n_in, n_in), jnp.float32),
                      sum=jnp.zeros((n_in,), jnp.float32), count=jnp.zeros((), jnp.float32))


# --- recording the inputs of the layers' kernels ---------------------------------------------

def _recorder(record: Callable) -> Callable:
    """A layer hook (:mod:`effjax.nn.interception`, installed innermost: it sees what other
    hooks, e.g. activation fake quantization, pass on) that reports ``(kernel path, x, k)``:
    the input the kernel contracts, moved so that its ``k`` contracted axes come last in the
    kernel's axis order (a ``LinearGeneral`` output projection contracting ``(heads,
    head_dim)`` gives ``heads * head_dim`` features per position)."""

    def hook(call, next):
        path = f"{call.path}/kernel" if call.path else "kernel"
        where = f"layer '{path}' ({call.layer.__name__})"
        if call.batch_axes:
            raise ValueError(f"{where}: the kernel has batch axes shared with the input and "
                             f"output (stacked kernels / experts, input axes "
                             f"{call.batch_axes}); calibrate does not support per-slice "
                             f"statistics")
        axes = call.contracted_axes
        if not axes:
            raise ValueError(f"{where}: the layer contracts no input axis with the kernel")
        x = jnp.asarray(call.inputs)
        order = [a for a in range(x.ndim) if a not in axes] + list(axes)
        record(path, x if order == list(range(x.ndim)) else jnp.transpose(x, order), len(axes))
        return next(call)

    return hook


# --- target selection --------------------------------------------------------------------------

def _close(name: str, paths: Sequence[str]) -> str:
    return ", ".join(f"'{p}'" for p in closest_paths(name, list(paths)))


def _select(targets: Any, found: Sequence[str], kind: str) -> list[str]:
    """The found kernel paths the targets pick, in ``found`` order."""
    what = f"the kernels of the intercepted {kind} layers"
    if not found:
        raise ValueError(f"the forward pass called no {kind} layer: nothing to calibrate")
    if targets is None:
        return list(found)
    if isinstance(targets, Mapping):
        rules = compile_rules(targets)
        choice = assign_rules(found, rules, check=False)
        wants = [r.method is not None and getattr(r.method, "calibration", None) == "inputs"
                 for r in rules]
        chosen = [p for p, c in zip(found, choice) if c is not None and wants[c]]
        used = {c for c in choice if c is not None}
        for i, r in enumerate(rules):
            if wants[i] and i not in used:
                raise ValueError(f"rule '{r.pattern}' ({r.method.name}) needs input statistics "
                                 f"but matches none of {what}; closest: "
                                 f"{_close(r.pattern, found)}")
        return chosen
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
        raise TypeError("targets must be None, a regex string, a sequence of regex strings or a "
                        f"rules mapping {{regex: method}}, got {type(targets).__name__}")
    chosen = set()
    for t in targets:
        sel = selector(t)
        hits = [p for p in found if sel(p, None)]
        if not hits:
            raise ValueError(f"target '{t}' is not the kernel of an intercepted layer: it matches "
                             f"none of {what} called by the forward pass; closest: "
                             f"{_close(t, found)}")
        chosen.update(hits)
    return [p for p in found if p in chosen]


def _discover(collect: Callable, state: Any, batch: Any) -> dict[str, int]:
    """``{kernel path: n_in}`` of the intercepted layers, in call order (abstract trace)."""
    shapes: dict[str, int] = {}

    def run(st, b):
        for path, x, k in collect(st, b):
            shapes.setdefault(path, int(np.prod(x.shape[x.ndim - k:])))
        return 0

    jax.eval_shape(run, state, batch)
    return shapes


# --- calibrate ---------------------------------------------------------------------------------

def calibrate(model: Any, batches: Iterable[Any], *, targets: Any = None,
              variables: Any = None, forward: Callable | None = None,
              mask: Callable[[Any], Any] | None = None, jit: bool = True
              ) -> dict[str, InputStats]:
    """Accumulate :class:`InputStats` of the inputs of a model's linear layers over ``batches``.

    Args:
      model: a Flax NNX module (``nnx.Module``) or a Flax Linen module (``nn.Module``).
      batches: an iterable of batches (any pytrees of arrays), each passed to ``forward``.
      targets: which layer kernels to calibrate: None (every intercepted layer), a regex or a
        sequence of regexes fullmatched against kernel paths (each must match at least one
        intercepted layer's kernel), or a rules mapping ``{regex: method}`` as given to
        :func:`effjax.peft.inject` (the kernels whose first fullmatching rule is a method with
        ``calibration = "inputs"``, e.g. EVA or CorDA; each such rule must match one).
      variables: Linen only: the variables dict (with a ``'params'`` collection).
      forward: how to run a batch: ``forward(model, batch)`` for NNX (default
        ``model(batch)``), ``forward(variables, batch)`` for Linen (default
        ``model.apply(variables, batch)``). Must be traceable by ``jax.jit`` when ``jit=True``.
      mask: None, or ``mask(batch) -> array`` of the token axes of the targeted layers' inputs
        (e.g. BERT's ``attention_mask`` ``(batch, seq)``), nonzero for real tokens: padded tokens
        are left out of the statistics. A targeted layer whose input's token axes differ from
        the mask's shape is an error.
      jit: compile the accumulation step (one compilation per batch shape).

    Returns:
      ``{kernel path: InputStats}`` (float32), in the order the layers are first called.

    Raises:
      ValueError: a target that is not the kernel of an intercepted layer (the message lists
        the closest kernel paths), a mask whose shape does not fit a layer's input, no batches.
      TypeError: a model that is neither an NNX nor a Linen module; Linen without ``variables``.

    Example (NNX; a Linen model is called with ``variables={'params': ...}`` instead):
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.up, self.down = nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.down(jax.nn.relu(self.up(x)))
      >>> model = MLP(nnx.Rngs(0))
      >>> xs = [jax.random.normal(jax.random.key(i), (4, 5, 3)) for i in range(2)]
      >>> stats = calibrate(model, xs, targets=r'.*/kernel')
      >>> list(stats), stats['up/kernel'].gram.shape, stats['down/kernel'].count
      (['up/kernel', 'down/kernel'], (3, 3), Array(40., dtype=float32))
      >>> x = jnp.concatenate(xs).reshape(-1, 3)
      >>> bool(jnp.allclose(stats['up/kernel'].gram, x.T @ x, rtol=1e-5))
      True
    """
    import flax.linen as nn
    from flax import nnx

    from effjax.nn.interception import intercept, linen_intercept

    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError("variables is for Linen models; an NNX model carries its state")
        kind = "nnx.Linear/LinearGeneral/Einsum"
        graphdef, state = nnx.split(model)
        fwd = forward or (lambda m, b: m(b))

        def run(st, batch, record):
            # a private copy, merged inside the traced function: its layers get the hook
            fwd(intercept(nnx.merge(graphdef, st), _recorder(record), inner=True,
                          copy=False), batch)
    elif isinstance(model, nn.Module):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise TypeError("a Linen model needs variables={'params': params, ...} (a mapping "
                            f"with a 'params' collection), got {type(variables).__name__}")
        kind = "nn.Dense/DenseGeneral/Einsum"
        state = variables
        fwd = forward or (lambda v, b: model.apply(v, b))

        def run(st, batch, record):
            with linen_intercept(_recorder(record), inner=True):
                fwd(st, batch)
    else:
        raise TypeError(f"model must be a flax.nnx.Module or a flax.linen.Module, got "
                        f"{type(model).__name__}")

    def collect(st, batch):
        calls: list[tuple[str, jax.Array, int]] = []
        run(st, batch, lambda path, x, k: calls.append((path, x, k)))
        return calls

    def step(stats, st, batch, m):
        new = dict(stats)
        for path, x, k in collect(st, batch):
            if path not in new:
                continue
            if m is not None and m.shape != x.shape[:x.ndim - k]:
                raise ValueError(f"mask of shape {m.shape} does not fit layer '{path}': its "
                                 f"input has token axes {x.shape[:x.ndim - k]} (input moved to "
                                 f"shape {x.shape}, {k} feature axes)")
            s = input_stats(x, in_ndim=k, mask=m)
            if s.n_in != new[path].n_in:
                raise ValueError(f"layer '{path}' got inputs of {s.n_in} features after "
                                 f"{new[path].n_in} before")
            new[path] = jax.tree.map(jnp.add, new[path], s)
        return new

    stepper = jax.jit(step) if jit else step
    stats: dict[str, InputStats] | None = None
    for batch in batches:
        m = None if mask is None else jnp.asarray(mask(batch))
        if stats is None:  # discover the layers (abstractly) and pick the targets
            shapes = _discover(collect, state, batch)
            chosen = _select(targets, list(shapes), kind)
            stats = {p: _zero_stats(shapes[p]) for p in chosen}
        stats = stepper(stats, state, batch, m)
    if stats is None:
        raise ValueError("batches is empty: calibrate needs at least one batch")
    stats = {p: stats[p] for p in chosen}  # jit returns dicts key-sorted
    empty = [p for p, s in stats.items() if float(s.count) == 0]
    if empty:
        raise ValueError(f"no tokens reached {empty} (all masked out?); their statistics "
                         f"would be empty")
    return stats

"""One process of ``tests/test_multiprocess.py``: 5 ``adamw_8bit`` steps on a sharded tree.

Run as a script by the test, never imported by pytest (its name does not start with
``test_``). Two modes:

* ``--num-processes 2 --process-id i --port P``: one of two processes joined by
  ``jax.distributed.initialize`` on ``localhost:P`` (CPU, 2 devices each, set by the parent's
  ``XLA_FLAGS``). The optimizer is built *before* ``initialize``: building it must not start
  a backend (issue 19, item 5).
* ``--num-processes 1``: the same steps in one process over its 4 devices (the reference).

Either way the mesh spans the 4 global devices, the (16, 64) leaves are sharded along their
leading axis, and the final parameters and optimizer state, gathered to every process with
``process_allgather``, are written by process 0 to ``--out`` (an ``.npz`` keyed by leaf path).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

STEPS = 5
SHAPES = {"dense": {"kernel": (16, 64)}, "out": {"kernel": (16, 64), "bias": (64,)}}


def _arrays(seed: int):
    """The parameters, or the gradients of one step: seeded numpy arrays of ``SHAPES``."""
    rng = np.random.default_rng(seed)

    def leaf(shape):
        # rows of a matrix an order of magnitude or more apart, so blocks have other scales
        rows = shape[:1] if len(shape) > 1 else (1,)
        scale = 10.0 ** rng.integers(-3, 2, size=rows + (1,) * (len(shape) - 1))
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {k: {n: leaf(s) for n, s in v.items()} for k, v in SHAPES.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import jax
    import optax

    from effjax.optim import adamw_8bit

    # Built before jax.distributed.initialize: construction must not touch a backend.
    opt = adamw_8bit(learning_rate=1e-2, weight_decay=1e-2, block_size=32,
                     min_quantized_size=0)

    if args.num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                                   num_processes=args.num_processes,
                                   process_id=args.process_id,
                                   initialization_timeout=60, heartbeat_timeout_seconds=30,
                                   shutdown_timeout_seconds=30)
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    counts = (jax.process_count(), jax.device_count(), jax.local_device_count())
    if counts != (args.num_processes, 4, 4 // args.num_processes):
        print(f"expected {args.num_processes} processes, 4 devices, "
              f"{4 // args.num_processes} local; got {counts}", file=sys.stderr)
        return 3

    mesh = Mesh(np.array(jax.devices()), ("x",), axis_types=(AxisType.Auto,))

    def spec(x):
        return P("x") if x.shape[0] % 4 == 0 and x.ndim > 1 else P()

    def to_global(tree):
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(
                x.shape, NamedSharding(mesh, spec(x)), lambda idx, x=x: x[idx]), tree)

    params = to_global(_arrays(0))
    state = jax.jit(opt.init)(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(STEPS):
        params, state = step(params, state, to_global(_arrays(100 + t)))

    gathered = multihost_utils.process_allgather({"params": params, "state": state},
                                                 tiled=True)
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(gathered)[0]}
    # the params' sharding survived the steps (a replicated result would hide a gather)
    want = NamedSharding(mesh, P("x"))
    got = params["dense"]["kernel"].sharding
    if not got.is_equivalent_to(want, 2):
        print(f"params['dense']['kernel'] ends with sharding {got}, expected {want}",
              file=sys.stderr)
        return 4
    if jax.process_index() == 0:
        np.savez(args.out, **flat)
    if args.num_processes > 1:
        multihost_utils.sync_global_devices("effjax multiprocess test: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

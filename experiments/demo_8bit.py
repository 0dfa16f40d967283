"""A short demo: train a small MLP with ``effjax.optim.adamw_8bit`` next to ``optax.adamw``.

Run: ``make demo`` (or ``python -m experiments.demo_8bit --steps 300``). The task is a fixed
synthetic teacher-student regression, so the demo needs no data download. Prints the loss
every 50 steps and the optimizer-state memory of both optimizers.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from effjax.optim import adamw_8bit, state_bytes


def init_mlp(key, sizes):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"dense_{i}"] = {"kernel": jax.random.normal(sub, (a, b)) / jnp.sqrt(a),
                                "bias": jnp.zeros((b,))}
    return params


def mlp(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.gelu(x)
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--width", type=int, default=512)
    args = ap.parse_args(argv)

    sizes = [64, args.width, args.width, 16]
    teacher = init_mlp(jax.random.PRNGKey(1), [64, 128, 16])
    x_all = jax.random.normal(jax.random.PRNGKey(2), (4096, 64))
    y_all = mlp(teacher, x_all)
    params0 = init_mlp(jax.random.PRNGKey(0), sizes)
    n_params = sum(p.size for p in jax.tree.leaves(params0))

    def loss_fn(p, x, y):
        return jnp.mean((mlp(p, x) - y) ** 2)

    results = {}
    for name, opt in [("optax.adamw", optax.adamw(1e-3)), ("effjax adamw_8bit", adamw_8bit(1e-3))]:
        params, state = params0, opt.init(params0)

        @jax.jit
        def step(params, state, x, y, opt=opt):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        print(f"== {name}")
        for i in range(args.steps):
            idx = (i * 256) % 4096
            params, state, loss = step(params, state, x_all[idx:idx + 256], y_all[idx:idx + 256])
            if i % 50 == 0 or i == args.steps - 1:
                print(f"  step {i:4d}  loss {float(loss):.5f}")
        results[name] = (float(loss_fn(params, x_all, y_all)), state_bytes(state))

    print(f"\nparams: {n_params:,}")
    print(f"{'optimizer':20s} {'final loss':>11s} {'state bytes':>12s} {'bytes/param':>12s}")
    for name, (loss, nbytes) in results.items():
        print(f"{name:20s} {loss:11.5f} {nbytes:12,d} {nbytes / n_params:12.3f}")


if __name__ == "__main__":
    main()

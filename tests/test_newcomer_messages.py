"""Messages a newcomer met (issue 18, "the public surface"): each names the mistake and the fix."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.optim import adam_4bit, adamw_8bit, lion_8bit, quantize_state, spam, stable_spam
from effjax.peft import LoRA, inject, load_adapters, save_adapters


def test_quantize_state_factory_not_called():
    msg = ("quantize_state got the function optax.adamw, not a GradientTransformation: call it "
           "first, e.g. quantize_state(optax.adamw(learning_rate=1e-3))")
    with pytest.raises(TypeError, match=re.escape(msg)):
        quantize_state(optax.adamw)


@pytest.mark.parametrize("bad", [3, "adamw", None])
def test_quantize_state_not_a_transformation(bad):
    with pytest.raises(TypeError, match=f"needs an optax GradientTransformation.*got "
                                        f"{type(bad).__name__}"):
        quantize_state(bad)


def test_quantize_state_users_unaffected():
    params = {"w": jnp.ones((64, 128))}
    for opt in (quantize_state(optax.adamw(1e-3)),
                quantize_state(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)),
                adamw_8bit(1e-3), adam_4bit(1e-3), lion_8bit(1e-4),
                optax.inject_hyperparams(adamw_8bit)(learning_rate=1e-3),
                spam(1e-3), stable_spam(1e-3)):
        state = opt.init(params)
        updates, _ = opt.update(params, state, params)
        assert updates["w"].shape == (64, 128)


def _lora_tree(shape=(8, 4)):
    params = {"dense": {"kernel": jnp.ones(shape)}}
    return params, inject(params, {r".*kernel": LoRA(rank=2)}, key=jax.random.key(0))


def test_save_adapters_overwrite(tmp_path):
    params, tree = _lora_tree()
    d = tmp_path / "lora"
    save_adapters(d, tree)
    node = tree["dense"]["kernel"]
    changed = {"dense": {"kernel": node.replace(b=jnp.full(node.b.shape, 0.5, node.b.dtype))}}
    with pytest.raises(FileExistsError, match=re.escape(f"{d} already exists; pass "
                                                        "overwrite=True to replace it")):
        save_adapters(d, changed)
    np.testing.assert_array_equal(load_adapters(d, params)["dense"]["kernel"].b, node.b)
    save_adapters(d, changed, overwrite=True)
    back = load_adapters(d, params)["dense"]["kernel"]
    np.testing.assert_array_equal(back.b, np.full(node.b.shape, 0.5))
    np.testing.assert_array_equal(back.a, node.a)


def test_load_adapters_other_kernel_shape(tmp_path):
    _, tree = _lora_tree((8, 4))
    save_adapters(tmp_path / "lora", tree)
    msg = ("the adapter at 'dense/kernel' does not fit the param tree: its saved 'a' has shape "
           "(8, 2), but the tree's leaf 'dense/kernel' has shape (16, 4), which needs 'a' of "
           "shape (16, 2)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        load_adapters(tmp_path / "lora", {"dense": {"kernel": jnp.ones((16, 4))}})


def test_load_adapters_path_missing_from_tree(tmp_path):
    _, tree = _lora_tree()
    save_adapters(tmp_path / "lora", tree)
    other = {"dense_1": {"kernel": jnp.ones((8, 4))}, "head": {"bias": jnp.ones(4)}}
    with pytest.raises(ValueError, match=r"the saved adapter at 'dense/kernel' has no leaf in "
                                         r"the param tree \(2 leaves\); closest paths: "
                                         r"'dense_1/kernel'"):
        load_adapters(tmp_path / "lora", other)

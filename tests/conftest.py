import os

# 8 simulated CPU devices for the sharding tests (make test sets it too).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# One OpenBLAS thread per process (LAPACK behind jnp.linalg.svd / qr / eigh on CPU, numpy):
# with two pytest-xdist workers on a small machine, OpenBLAS's own thread pool oversubscribes
# the cores and its threads spin-wait on each other (a 384 x 384 SVD: 2 s instead of 0.02 s).
# Set here, before numpy / jax load OpenBLAS (pytest loads this file first).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Nothing in the tests may touch the network: Hugging Face libraries read local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

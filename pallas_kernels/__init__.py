"""pallas_kernels: fused kernels for effjax's hot paths (block-wise quantization and low-bit
optimizer updates), each with a pure-jnp reference: Pallas kernels (compiled with Triton on
NVIDIA GPUs, interpreted on CPU for tests) and, for CPUs, a native C++ optimizer step called
through XLA's FFI (:mod:`pallas_kernels.native_cpu`)."""

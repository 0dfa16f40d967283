"""pallas_kernels: fused Pallas kernels for effjax's hot paths (block-wise quantization and
low-bit optimizer updates), each with a pure-jnp reference. Kernels land with issue 6; until
then effjax runs its jnp paths everywhere."""

import os

# 8 simulated CPU devices for the sharding tests (make test sets it too).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# Nothing in the tests may touch the network: Hugging Face libraries read local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import os

# 8 simulated CPU devices for the sharding tests (make test sets it too).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

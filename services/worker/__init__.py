"""What every worker role shares: the engine loop, the gRPC server, metrics.

The role-specific RPCs live in services/prefill/ and services/decode/, which
never import each other; a worker of role `both` serves the two.
"""

"""The gateway: public API, global radix index, routing policies (no torch, no engine)."""

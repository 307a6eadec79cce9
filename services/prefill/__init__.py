"""The prefill worker service: Worker.Prefill."""

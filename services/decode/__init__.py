"""The decode worker service: Worker.Decode."""

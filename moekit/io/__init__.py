"""Checkpoint I/O: streaming safetensors reading, planned sharded writing, atomic outputs."""

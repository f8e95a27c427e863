"""Benchmarks of EmoVLM-KD (speed and memory against the paper's protocol); run with `python -m benchmarks.bench`."""

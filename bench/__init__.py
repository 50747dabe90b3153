"""ckpt's benchmarks: dump, freeze, restore, exec latency and warm start,
each against this machine's own ceilings measured in the same run.
`python -m bench` (or bench/run); see bench/README.md."""

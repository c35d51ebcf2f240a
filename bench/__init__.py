"""Benchmarks for the issue "Fast on a laptop CPU, measured": one command per figure.

Each module runs as `python -m bench.<name>`, measures its figures side by side in one run,
and writes `<out>/<name>.json` and `<out>/<name>.md`. See bench/README.md.
"""

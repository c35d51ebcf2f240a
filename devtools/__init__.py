"""What the tests and the benchmarks share: generated photos and datasets, and a throwaway
copy of this repository that runs DVC for real.

Development only, like `tests/` and `bench/`: it ships in no package (pyproject.toml's
package list is `pipeline*`), `pipeline/` never imports it (tests/test_bench.py checks), and
it is found from the repository's root, where pytest (`pythonpath`) and
`python -m bench.<name>` run.
"""

"""Real, public, licensed text for the default experts, the router and the quality benchmark.

Each domain module (`medical`, `finance`, `legal`, `support`, `general`) lists its `SOURCES`: a public
repository at a fixed revision, the files taken, the license, and a parser. `python -m corpora.build` reads
those files from local snapshots of the repositories (no network at build time) and writes the training
files under `experts/seed_data/` and the held-out dev files under `bench/data/quality/`.
"""

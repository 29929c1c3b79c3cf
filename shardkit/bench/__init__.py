"""Measuring and demonstrating shardkit, apart from the library (training imports none of it).

- :mod:`~shardkit.bench.loaders` — the loader benchmark (``tools/bench.py``, ``shardkit bench``):
  shardkit against a naive ImageFolder loader, plain webdataset and the machine's limits;
- :mod:`~shardkit.bench.s3` — the same against a local S3 server (``--s3``);
- :mod:`~shardkit.bench.scale` — plans and manifests at 10⁹ samples (``tools/scale.py``);
- :mod:`~shardkit.bench.demo` — the Quick start demo (``shardkit demo``);
- :mod:`~shardkit.bench.synth` — photo-like synthetic image folders for all of the above.
"""

"""Scaling out (docs/scale-out.md): what the notebooks do on one machine, split over many.

``shard``: sampling, judging and evaluation in question-range shards, merged into the files an
unsharded run writes; ``train``: one adapter per command (``python -m wowlib.scale.train``, under
``accelerate launch`` for GPUs and DDP); ``plan``: the calls, tokens and GPU-hours a profile will
take. The method itself never imports from here.
"""

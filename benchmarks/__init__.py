"""``blockrag bench NAME``: the benchmarks behind the figures in ``benchmarks/RESULTS.md``, beside their results.

Each module has ``add_arguments(parser)`` and ``run(args) -> dict`` (the JSON the command prints)
and measures through the public APIs of the packages it times; :mod:`.common` holds what they
share (the machine record, the question, random-token passages).
"""

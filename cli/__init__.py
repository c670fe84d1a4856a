"""The ``geco`` command line: the layer above ``geco/`` (the library) and ``pipelines/`` (Ray).

``cli.main:main`` is the ``geco`` entry point; ``python -m cli ...`` runs the same command.
"""

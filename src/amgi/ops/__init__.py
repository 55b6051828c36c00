"""Operating a running server: metrics, tracing, health probes, JSON logs, worker processes,
environment configuration and dead-letter inspection.

Every module here is optional at run time: nothing in it is imported (and none of its
third-party libraries) unless the matching ``amgi run`` option asks for it.
"""

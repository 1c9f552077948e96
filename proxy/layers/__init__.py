"""Reliability layers: each one a pure ASGI app (or upstream-call wrapper) doing one thing.

``proxy/pipeline.py`` composes them per route, in a fixed order.
"""

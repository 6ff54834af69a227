"""Framework adapters: each reduces activations in its own runtime and feeds an ``Engine``.

Import a backend module directly (``neuronwatch.adapters.torch``); nothing here imports a
framework.
"""

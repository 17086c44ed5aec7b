"""The compression toolkit: import, prune, distill, fine-tune, quantize, evaluate, publish.

Stages (``stages.STAGES``) share a config base and a report shape (``stage``), one progress
event (``progress``) and, when they train, one loop (``training``); ``recipe`` runs them on a
parent version and publishes the result. May import ``slimserve.registry`` and
``slimserve.engine``, never the server, clients, fraud, CLI or bench. Importing the package
imports nothing else.
"""

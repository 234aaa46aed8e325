"""Adapters that bring deltakern's scores into other libraries' APIs.

Each adapter is a module the user imports explicitly (``deltakern.integrations.pytorch_ood``);
this package imports none of them, so importing deltakern never imports an optional dependency.
"""

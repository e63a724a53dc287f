"""Segments and audiences (SPEC 7): condition trees compiled to one SQL query, static / updatable / dynamic
segments, audiences, tags, and the roaring-bitmap ``AudienceIndex`` that feeds the receipt core.

The few names other modules use are re-exported lazily (importing the package stays cheap):
``SegmentService`` (``service.py``), ``AudienceIndex`` (``membership.py``), ``add_segments_service``
(``grpc_service.py``) and ``seed_population`` (``demo_seed.py``).
"""
import importlib

__all__ = ["SegmentService", "AudienceIndex", "add_segments_service", "seed_population"]

_WHERE = {"SegmentService": "service", "AudienceIndex": "membership", "add_segments_service": "grpc_service",
          "seed_population": "demo_seed"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)

"""DeepEP V1's ``deep_ep`` package on eplib: ``import eplib.deep_ep as deep_ep`` and code written for
DeepEP's normal mode runs unchanged.

The names are DeepEP's: ``Buffer`` (``eplib.Buffer``), ``Config``, ``EventOverlap``, ``topk_idx_t`` (the
dtype of expert ids, int64), and the submodules ``utils`` (``EventHandle``, ``EventOverlap``) and ``buffer``
(``Buffer``). For frameworks that ``import deep_ep`` themselves (Megatron-core's ``fused_a2a``), call
``eplib.deep_ep.register()`` before they import it.
"""

import importlib.util
import logging
import sys

import torch

from . import buffer, utils
from .buffer import Buffer, Config
from .utils import EventHandle, EventOverlap

#: dtype of DeepEP's expert ids (``topk_idx``); eplib takes int64 ids, DeepEP's default build.
topk_idx_t = torch.int64

_NAME = "deep_ep"
_LOG = logging.getLogger("eplib")

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "buffer", "register", "topk_idx_t", "utils"]


def register() -> bool:
    """Let ``import deep_ep`` (and ``deep_ep.utils``, ``deep_ep.buffer``) give this module, for code that
    imports DeepEP by name. Call it before that code imports ``deep_ep``: a module that found no DeepEP
    when it was imported keeps believing so.

    A real DeepEP is never shadowed: when one is installed (importable) or already imported, nothing
    changes. Returns True when ``deep_ep`` now names eplib's module (also when it already did), False
    when a real DeepEP keeps the name.
    """
    this = sys.modules[__name__]
    current = sys.modules.get(_NAME)
    if current is this:
        return True
    if current is not None or importlib.util.find_spec(_NAME) is not None:
        _LOG.info("eplib.deep_ep.register(): a real DeepEP is installed; 'deep_ep' stays DeepEP's")
        return False
    sys.modules[_NAME] = this
    sys.modules[f"{_NAME}.utils"] = utils
    sys.modules[f"{_NAME}.buffer"] = buffer
    return True

"""Analyses on the graph IR. :mod:`channels` finds which channels must be removed
together, through the per-op handlers of :mod:`registry` (filled by :mod:`pyprune.ops`)."""

from .channels import ChannelAnalysis, ChannelGroup, analyze_channels
from .registry import CHANNEL_HANDLERS, ChannelHandler, handler_for, register_function, register_method, register_module

__all__ = ["CHANNEL_HANDLERS", "ChannelAnalysis", "ChannelGroup", "ChannelHandler", "analyze_channels",
           "handler_for", "register_function", "register_method", "register_module"]

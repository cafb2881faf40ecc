"""Transports move the packed rows between ranks; the Buffer picks one per call."""

from .cpu import CpuTransport

__all__ = ["CpuTransport"]

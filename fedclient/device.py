"""Choosing the torch device a client trains on: cuda, then mps, then cpu, unless configured."""

from __future__ import annotations

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """The device for local training.

    ``auto`` takes the best accelerator present (CUDA, then Apple MPS, then CPU); an explicit
    ``cuda``/``mps`` that is not available is an error rather than a silent CPU fallback, so
    a misconfigured edge device is noticed.
    """
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available on this node")
    if preference == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RuntimeError("device='mps' was requested but MPS is not available on this node")
    if preference not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {preference!r}; allowed: auto | cpu | cuda | mps")
    return torch.device(preference)

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


def set_torch_threads(configured: int, *, simulated: bool) -> None:
    """torch's intra-op CPU threads for this ClientApp process.

    ``configured`` > 0 is used as is. 0 means automatic: one thread in a simulation, where
    several actors or packed workers share the machine's cores and more threads per process
    only oversubscribe them (measured here: 2 processes × 2 threads on 2 cores ran tiny steps
    up to 20× slower); torch's own default on a real device, which has the machine to itself.
    """
    threads = configured if configured > 0 else (1 if simulated else 0)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

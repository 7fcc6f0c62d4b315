"""Simulation support: federated datasets, partitioners, Synthetic(alpha, beta), models, benchmarks.

The data and model layer: ``datasets`` (run data spec, lazy per-client partitions,
central test sets), ``partitioners`` (iid / Dirichlet / shards via flwr-datasets),
``synthetic`` (FedProx Synthetic(alpha, beta) generator), ``local_files`` (a device's own
data file) and ``models`` (logreg / mlp / cnn). Heavy libraries are imported only when
data is loaded, so importing these modules to validate a config stays fast.
"""

"""Search over site order and per-hop hyperparameters (Optuna); no gRPC, SQL or torch."""

__all__: list[str] = []

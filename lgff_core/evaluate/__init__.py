"""Evaluation: retrieval and detection metrics (pure functions), the protocols that run them as stages, and the
reports drawn from their outputs."""

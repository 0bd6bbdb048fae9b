"""Evaluation on the three dimensions: batched generation, judges, MC1/MC2, metrics and result tables.

- `lm`: the `LanguageModel` interface (single models and ensembles) and `HFLanguageModel`,
- `generate`: batched, length-sorted, left-padded generation that stops at the end of the turn,
- `mc`: TruthfulQA MC1/MC2 from the model's own log-likelihoods,
- `judges`: the helpful / harmless / honest judges and their validation figures,
- `run`: `evaluate_model(profile, name)` -> runs/<profile>/eval/<name>/ (cached),
- `tables`: results tables and the paper's headline comparisons.

Submodules are imported on use, so importing the package stays cheap.
"""

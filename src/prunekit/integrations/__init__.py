"""Training-framework integrations: :mod:`prunekit.integrations.transformers` (Hugging Face ``Trainer``)
and :mod:`prunekit.integrations.lightning` (Lightning). Each imports its framework only when imported
itself, so ``import prunekit`` never does."""

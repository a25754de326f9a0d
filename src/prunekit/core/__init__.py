"""The core: what every other part builds on, importing nothing above it — the layer registry
(:mod:`.layers`), pruning targets and layer selectors (:mod:`.targets`), bit-packed mask storage
(:mod:`.masks`) and the configuration objects (:mod:`.config`)."""

"""One module per feature, each declaring the hooks it needs from the engine (see sdbatch.engine.core.contract)."""

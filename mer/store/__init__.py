"""The mer store: models laid out for streaming experts (see `mer.store.format`)."""

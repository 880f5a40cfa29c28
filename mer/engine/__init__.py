"""The engine core: sequences, a scheduler that batches them, and the step that runs them."""

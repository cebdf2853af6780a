"""model: the encoder or causal LM, its adapter and head, and the node-local caches."""

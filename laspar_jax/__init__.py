"""laspar_jax: learned sparse retrieval in JAX/Flax NNX."""

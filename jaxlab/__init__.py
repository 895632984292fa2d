"""jaxlab: a JAX framework for studying how misalignment travels through training data."""

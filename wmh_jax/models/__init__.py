"""Models: the Flax architectures, their convolutions, and the registry of model kinds."""

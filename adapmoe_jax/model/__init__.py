"""The Mixtral model: pure layer functions and the Flax module."""

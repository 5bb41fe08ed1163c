"""Model building: the factory, checkpoint readers, and the lean model files in ``custom/``."""

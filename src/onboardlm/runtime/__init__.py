"""Text generation on top of lean models: chat prompts, decoding."""

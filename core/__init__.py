"""Cross-cutting pieces: the settings object, typed errors, device and dtype choice."""

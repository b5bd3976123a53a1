"""The battle: a config of backbones × datasets × tasks, run into one cache and results log."""

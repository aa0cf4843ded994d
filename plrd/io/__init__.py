"""On disk: atomic writes, file integrity, checkpoints (plrd.save/plrd.load), model loading."""

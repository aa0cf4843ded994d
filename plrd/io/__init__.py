"""On disk: atomic writes (``atomic``), file integrity (``integrity``), the checkpoint info
``plrd.json`` (``info``), checkpoints = ``plrd.save``/``plrd.load`` (``checkpoint``), Hugging
Face configs and empty architectures (``hf``), members = saved decomposed models (``members``),
and loading models by name (``models``)."""

"""The method on modules and tensors: layer kinds, input checks, factorization math, the
LowRankLinear layer, targets, rank allocation, the parameter budget, calibration, surgery and
its report. Imports torch, numpy, tqdm and plrd_kernels (no transformers, no plrd.io); reads
and writes no files."""

"""The method on modules and tensors: LowRankLinear, factorization, targets, ranks, calibration,
surgery and its report. Imports torch and plrd_kernels only; reads and writes no files."""

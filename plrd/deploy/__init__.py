"""Deployment of members: export to runtimes outside PyTorch (``plrd.deploy.onnx_export``)."""

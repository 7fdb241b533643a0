"""Models that run without detectron2 (``nucleus-export``): TorchScript and ONNX networks with a numpy runner
beside them, and a bioimage.io package. Top of the package: nothing else in nucleus_seg imports it."""

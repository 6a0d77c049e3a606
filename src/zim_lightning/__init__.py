"""zim-lightning: an open, trainable ZIM on PyTorch Lightning."""

"""tlray: fine-tune pretrained torchvision image classifiers on Ray Train."""

__version__ = "0.1.0"

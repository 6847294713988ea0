"""Torchvision image classifiers for transfer learning.

archs: the supported archs as plain data (no torch: the light commands read it). families/: one module
per architecture family, saying where its blocks, neck and head are (in the words of anatomy). The rest
reads that: layout (the block map), build (weights, checkpoints, a new head), split (prefix | rest),
freeze (frozen blocks, the optimizer's parameter groups), preprocessing (the weights' image preset).
Importing this package imports no torch.
"""

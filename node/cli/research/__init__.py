"""Research commands: synthetic data, segmentation models, radiomics signatures, analyze.

One module per workflow; each command is thin over :mod:`pipelines`.
"""

"""Instruction data: files (files.py), generated tasks (synthetic.py), splits of one data set
into sites (splits.py), each site's own file and held-out part (sites.py), prompt templates
(prompts.py) and tokenisation (tokenize.py, the one module here that needs torch).

This package's __init__ imports nothing, so that light modules (the config, the server) can use
files.py without loading torch.
"""

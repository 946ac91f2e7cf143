"""SACPO pipeline steps: plain functions with small CLIs, called by the Snakemake rules."""

__version__ = "0.1.0"

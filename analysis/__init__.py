"""lnscope's analysis library: model trios, tasks and every analysis. No web code."""

__version__ = "0.1.0"

"""Helpers for the notebooks, one module per walkthrough, so each notebook's cells stay one or two calls.

``setup`` (every notebook: machine, model choice, memory plan), ``fits`` (how_mixtral_fits),
``quantization`` (hqq_quantization), ``cache`` (expert_cache_and_prefetch), ``benchmark`` (benchmark).
matplotlib, IPython and ipywidgets are imported inside the functions that need them.
"""

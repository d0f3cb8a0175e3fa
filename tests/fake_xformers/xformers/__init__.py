"""A stand-in for an xformers wheel built for another torch: it imports, and its kernel raises at the first
call, as xformers 0.0.35 does on any torch but 2.10.0 (tests put this folder first on sys.path)."""

__version__ = "0.0.35"

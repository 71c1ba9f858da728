"""Executors: ways to run the build's workers (Ray). They import the build; the build never imports them."""

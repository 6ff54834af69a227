"""Offline checkpoint repair driven by a report (strip, reinit, prune, swap, lift)."""

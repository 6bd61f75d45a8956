"""On-disk contracts, each declared once: today the result tables (:mod:`.tables`)."""

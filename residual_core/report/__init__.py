"""The Markdown report of a model's results (:mod:`.markdown`) and its figures (:mod:`.plots`)."""

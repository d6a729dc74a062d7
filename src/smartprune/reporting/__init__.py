"""Reports from measured runs: the HTML/Markdown report, figures, the paper's claims checked against
sweeps, and the numbers the paper reports (always labelled as reported)."""

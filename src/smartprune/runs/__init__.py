"""One module per command's run: each takes plain values, does the work end to end (checking its
inputs and outputs first), and returns a result with ``to_dict()`` (JSON) and ``summary()`` (text)."""

"""The ``genloop`` command line: thin commands that parse, call one plain function, print."""

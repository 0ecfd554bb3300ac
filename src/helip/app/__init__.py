"""The `helip` application: the command line, the demo and its report, built on the library."""

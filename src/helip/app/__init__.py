"""The `helip` application built on the library: the command line, the demo and its report, and the
family of synthetic worlds (:mod:`.worlds`) they run on."""

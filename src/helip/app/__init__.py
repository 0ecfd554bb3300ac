"""The application around the library: the synthetic worlds (:mod:`.worlds`) and what runs on them."""

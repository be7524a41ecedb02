"""Token datasets: the on-disk format, text readers, `dropup data prepare`, the built-in corpus."""

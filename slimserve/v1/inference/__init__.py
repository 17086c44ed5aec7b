"""Generated from the vendored KServe v2 / Triton protos in protos/inference/ (package `inference`)."""

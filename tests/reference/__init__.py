"""NumPy references of the merge kernels, one module per Rust method file (``merge/methods/<name>.rs``),
plus the shared codec (``codec``), result comparison (``result``), array conventions (``arrays``) and the SVD /
polar kernels (``linalg``). None of it calls ferromerge."""

"""safetensors in Python: one dtype table (``dtypes``), one reader (``reader``), one writer (``writer``), the JSON
side files (``json_file``) and the atomic output directory (``output_dir``). The engine's own reader and writer are
in Rust (``rust/core/src/io``)."""

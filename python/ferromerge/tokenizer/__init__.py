"""Vocabulary alignment (mergekit's ``tokenizer/``): settings (``config``), the output vocabulary (``vocab``), the
permuted embedding rows (``embed``) and chat templates (``chat_template``)."""

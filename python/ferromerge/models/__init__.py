"""The input models: references (``refs``), tensor indexes (``index``), ``model+lora`` materialisation (``lora``),
layer stacks (``layers``) and tensor-name conventions (``architecture``)."""

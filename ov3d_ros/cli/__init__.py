"""The ``ov3d`` command line: make scenes, map a dataset folder or bag, query, label and evaluate maps."""

"""Triton kernels of the condkernels ops, each registered as its own custom op.

Importing a module here imports triton: on a machine without a GPU set ``TRITON_INTERPRET=1`` first,
and the kernels run on CPU tensors under Triton's interpreter.
"""

"""Runnable examples; each is a module with its own command line.

    torchrun --nproc-per-node 2 -m momentum_cuda.examples.fsdp   # FSDP2 and DDP, bitwise vs torch
"""

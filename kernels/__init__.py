"""Triton kernels of dcvit_engine, one module per fused op, each with its `<op>_ref` in
plain PyTorch beside it. Installed as `dcvit_engine.kernels`; imports nothing from the
package (only torch and triton)."""

"""Compression methods (one module per method) and the pieces they share: structure
planning, finetuning, the synthetic metric set. Import the modules you need; this package
imports nothing itself so that loading one method does not load them all."""

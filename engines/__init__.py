"""Sampling engines behind generate.sample: the lean Llama loop and the vLLM backend."""

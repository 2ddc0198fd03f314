"""
engines/vllm_sampler.py -- generate.sample's draws on a vLLM engine (--sampler vllm; GPU users).

Imported only when that sampler is chosen; vllm itself only when the engine is built. Like
engines/lean.py it works on token ids: generate.py tokenizes, decodes and packs the results.
"""
import os
import weakref

import torch


class VLLMSampler:
    """Completions drawn by a vLLM engine (pinned: vllm==0.30.0, see requirements-gpu.txt).

    One engine per process, built once from the base model's directory (any architecture vLLM
    serves). It holds one set of weights: before each call whose model differs from the one it
    last received (another object, or the same one after an optimiser step or load_state_dict,
    which bump its parameters' version counters), the HF model's weights are pushed into the
    engine in place with `LLM.apply_model(lambda m: m.load_weights(...))` under the HF names
    (vLLM's loader stacks q|k|v and gate|up itself), and the prefix cache, computed with the old
    weights, is reset. No reload from disk. The engine runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the push passes tensors, not copies.

    Same contract as the HF path: prompts come in as the ids the HF tokenizer made (special
    tokens, BOS included, exactly as `generate.hf_sample` and the trainer see them); the stop ids
    are the caller's (`generate.stop_ids`) and the stop token stays in the completion; each call
    has its own seed (the caller's, else one drawn from torch's RNG, so a seeded run repeats)."""

    def __init__(self, path, gpu_memory_utilization=0.3, engine=None):
        if engine is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            from vllm import LLM

            # generation_config="vllm": no sampling defaults from the model's files; every call says its own
            engine = LLM(model=path, gpu_memory_utilization=gpu_memory_utilization, seed=0,
                         enable_prefix_caching=True, generation_config="vllm")
        self.engine = engine
        self.holds = (None, None)  # (weakref to the model whose weights the engine holds, their version)
        self.pushes = 0

    def sync(self, model):
        """Push model's weights into the engine unless it already holds exactly these."""
        version = sum(p._version for p in model.parameters())  # bumped by every in-place update
        ref, held = self.holds
        if ref is not None and ref() is model and held == version:
            return False
        weights = list(model.state_dict().items())
        self.engine.apply_model(lambda m: m.load_weights(weights))
        self.engine.reset_prefix_cache()
        self.holds, self.pushes = (weakref.ref(model), version), self.pushes + 1
        return True

    def __call__(self, model, prompt_ids, stops, eos, n=1, temperature=1.0, top_p=1.0, max_new_tokens=512,
                 greedy=False, seed=None):
        """n completions of each prompt (lists of token ids), prompt-major: (token ids, whether it
        stopped before the limit). `eos` is the id appended when the engine drops the EOS it stopped on."""
        from vllm import SamplingParams

        self.sync(model)
        if seed is None:
            seed = int(torch.randint(2 ** 31 - 1, ()))
        params = SamplingParams(n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                max_tokens=max_new_tokens, seed=seed, stop_token_ids=stops, detokenize=False)
        reqs = self.engine.generate([{"prompt_token_ids": x} for x in prompt_ids], params, use_tqdm=False)
        out = []
        for req in reqs:
            for c in sorted(req.outputs, key=lambda c: c.index):
                cids = list(c.token_ids)
                finished = c.finish_reason == "stop"
                if finished and (not cids or cids[-1] not in stops):  # keep the stop token, as on the HF path
                    cids.append(c.stop_reason if isinstance(c.stop_reason, int) else eos)
                out.append((cids, finished))
        return out

"""
engines/lean.py -- a lean KV-cache decode loop and forward for Llama-family models.

For a small model one decode step of HF `generate` is mostly per-call overhead (cache
objects, mask building, logits processors, ~60 module calls), not arithmetic. This loop
does the same Llama arithmetic in ~20 tensor ops per layer on the model's own weights (q|k|v
and gate|up stacked so each is one matmul), and saves work `generate` cannot know to save:
the samples of one prompt share one prefill, and finished rows leave the batch.

    decode        token ids in, token ids (and their log-probs) out: generate.fast_sample's engine
    lean_hidden   the forward itself, differentiable: train_student.shared_prompt_logprobs runs it too

Nothing here knows about text: generate.py tokenizes, decodes and packs the results. Tests
check it against HF: logits, greedy output, and the log-probs the trainer computes.
"""
import torch
import torch.nn.functional as F


def fast_path_ok(model):
    """Whether this loop can run the model: Llama-family architectures (config.model_type "llama")."""
    return getattr(getattr(model, "config", None), "model_type", None) == "llama"


def _cat(*ts):
    return None if ts[0] is None else torch.cat(ts)


def lean_weights(model, max_len):
    """The model's weights in the loop's layout, read once per call (the model is not changed),
    and RoPE's cos/sin for positions 0..max_len-1. q|k|v and gate|up are stacked so each is one
    matmul, and the attention scale 1/sqrt(head_dim) is folded into q's rows (RoPE is linear)."""
    m, cfg = model.model, model.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, m.layers[0].self_attn.head_dim
    scale = torch.cat([torch.full((nh * hd,), hd ** -0.5), torch.ones(2 * nkv * hd)]).to(m.embed_tokens.weight)

    def stack(mods, s=None):
        w, b = torch.cat([x.weight for x in mods]), _cat(*[x.bias for x in mods])
        return (w, b) if s is None else (w * s[:, None], None if b is None else b * s)

    layers = [dict(ln1=(l.input_layernorm.weight, l.input_layernorm.variance_epsilon),
                   ln2=(l.post_attention_layernorm.weight, l.post_attention_layernorm.variance_epsilon),
                   qkv=stack([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], scale),
                   o=(l.self_attn.o_proj.weight, l.self_attn.o_proj.bias),
                   gu=stack([l.mlp.gate_proj, l.mlp.up_proj]),
                   down=(l.mlp.down_proj.weight, l.mlp.down_proj.bias), act=l.mlp.act_fn) for l in m.layers]
    pos = torch.arange(max_len, device=model.device)[None]
    cos, sin = m.rotary_emb(m.embed_tokens.weight[:1, None], pos)  # HF's own RoPE, any rope_type
    return dict(layers=layers, cos=cos[0], sin=sin[0], heads=(nh, nkv, hd), embed=m.embed_tokens.weight,
                norm=(m.norm.weight, m.norm.variance_epsilon), lm_head=model.lm_head.weight)


def _plus_linear(h, x, wb):
    """h + linear(x): one fused addmm when there is no bias."""
    w, b = wb
    if b is not None or torch.is_autocast_enabled(h.device.type):  # under autocast addmm would make h bf16
        return h + F.linear(x, w, b)
    return torch.addmm(h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1]), w.t()).view(h.shape)


def lean_hidden(w, ids, pos, cache, t0, mask):
    """Final (normed) hidden states [B, T, D] for token ids [B, T] at positions pos [B, T]. The new
    keys and values go into cache (per layer (K, V) [B, kv_heads, T_max, head_dim]) at t0..t0+T;
    queries attend to cache[:t0+T] under the additive mask [B or 1, 1, T, t0+T] (0 or -inf).
    Differentiable: training runs it too (train_student.shared_prompt_logprobs)."""
    nh, nkv, hd = w["heads"]
    B, T = ids.shape
    h = F.embedding(ids, w["embed"])
    cos, sin = w["cos"][pos][:, :, None], w["sin"][pos][:, :, None]  # [B, T, 1, hd]
    for (K, V), L in zip(cache, w["layers"]):
        x = F.rms_norm(h, h.shape[-1:], *L["ln1"])
        qkv = F.linear(x, *L["qkv"]).view(B, T, nh + 2 * nkv, hd)
        qk, v = qkv[:, :, :nh + nkv], qkv[:, :, nh + nkv:]
        x1, x2 = qk.chunk(2, -1)
        qk = torch.addcmul(qk * cos, torch.cat((-x2, x1), -1), sin)  # RoPE on queries and keys at once
        K[:, :, t0:t0 + T], V[:, :, t0:t0 + T] = qk[:, :, nh:].transpose(1, 2), v.transpose(1, 2)
        q, k, v = qk[:, :, :nh].transpose(1, 2), K[:, :, :t0 + T], V[:, :, :t0 + T]
        if nkv != nh:
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        # plain matmuls, not SDPA's kernel: on CPU they read the cache ~1.5x faster at one query per row
        o = torch.softmax(q @ k.transpose(-1, -2) + mask, -1) @ v
        h = _plus_linear(h, o.transpose(1, 2).reshape(B, T, nh * hd), L["o"])
        g, u = F.linear(F.rms_norm(h, h.shape[-1:], *L["ln2"]), *L["gu"]).chunk(2, -1)
        h = _plus_linear(h, L["act"](g) * u, L["down"])
    return F.rms_norm(h, h.shape[-1:], *w["norm"])


@torch.no_grad()
def decode(model, input_ids, pmask, row, stops, temperature, top_p, max_new_tokens, greedy):
    """Sample (or decode greedily) one completion per entry of `row` from the distinct prompts
    input_ids [P, Tp] (left-padded; pmask [P, Tp] marks the real tokens; positions count from
    the first real one); row [B] says which prompt each completion continues. Stops at any id
    in `stops`, which is kept. Returns per completion (token ids, log-prob of each at
    `temperature`, whether it stopped before the limit)."""
    dev, stops = model.device, torch.tensor(stops, device=model.device)
    (P, Tp), Tmax, B = pmask.shape, pmask.shape[1] + max_new_tokens, len(row)
    w = lean_weights(model, Tmax)
    nh, nkv, hd = w["heads"]
    kv_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else model.dtype  # bf16 mode: bf16
    new_cache = lambda rows, T: [tuple(torch.zeros(rows, nkv, T, hd, device=dev, dtype=kv_dtype) for _ in "kv")
                                 for _ in w["layers"]]
    # 1. prefill the distinct prompts; a padding query attends to itself only (no all-masked rows)
    allowed = torch.ones(Tp, Tp, dtype=torch.bool, device=dev).tril() & pmask[:, None, None, :]
    allowed |= torch.eye(Tp, dtype=torch.bool, device=dev)
    allowed = torch.zeros(allowed.shape, device=dev).masked_fill(~allowed, float("-inf"))  # additive
    pos = (pmask.long().cumsum(-1) - 1).clamp(min=0)
    pre = new_cache(P, Tp)
    logits = F.linear(lean_hidden(w, input_ids, pos, pre, 0, allowed)[:, -1], w["lm_head"])
    # 2. one row per sample: its prompt's cache, key mask and position
    row = torch.tensor(row, device=dev)
    cache = new_cache(B, Tmax)
    for (K, V), (k, v) in zip(cache, pre):
        K[:, :, :Tp], V[:, :, :Tp] = k[row], v[row]
    keys = torch.full((B, 1, 1, Tmax), float("-inf"), device=dev)  # additive key mask
    keys[:, 0, 0, :Tp].masked_fill_(pmask[row], 0.0)
    logits, pos = logits[row], pos[row, -1:]
    # 3. decode. `alive` maps batch rows to samples; a finished row stays in the batch (its
    # tokens are no longer recorded) until a quarter of the rows are done, then all leave at once
    alive, live = torch.arange(B, device=dev), torch.ones(B, dtype=torch.bool, device=dev)
    toks = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
    lps = torch.zeros(B, max_new_tokens, device=dev)
    length = torch.full((B,), max_new_tokens, device=dev)  # stays at the limit if no stop token comes
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), -1)
        if greedy:
            nxt = logp.argmax(-1)
        else:  # inverse-CDF draw: one uniform per row
            probs = logp.exp()
            if top_p < 1.0:  # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
                sp, si = probs.sort(-1, descending=True)
                probs = probs.scatter(-1, si, sp.masked_fill(sp.cumsum(-1) - sp >= top_p, 0.0))
            cdf = probs.cumsum(-1)
            u = torch.rand(len(alive), 1, device=dev) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
        toks[alive, t], lps[alive, t] = nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)  # cut at `length` later
        done = torch.isin(nxt, stops) & live
        length[alive[done]], stopped[alive[done]] = t + 1, True
        live &= ~done
        n_live = int(live.sum())
        if t == max_new_tokens - 1 or n_live == 0:
            break
        if 4 * (len(alive) - n_live) >= len(alive):
            keep = live.nonzero().squeeze(-1)
            alive, live, nxt, pos, keys = alive[keep], live[keep], nxt[keep], pos[keep], keys[keep]
            cache = [(K[keep], V[keep]) for K, V in cache]
        keys[:, 0, 0, Tp + t] = 0.0
        pos = pos + 1
        h = lean_hidden(w, nxt[:, None], pos, cache, Tp + t, keys[..., :Tp + t + 1])
        logits = F.linear(h[:, -1], w["lm_head"])
    return [(t_[:int(n_)], l_[:int(n_)], f_)
            for n_, t_, l_, f_ in zip(length.tolist(), toks.tolist(), lps.tolist(), stopped.tolist())]

CALLS = []  # (heads, head size) of every call, so tests can count them


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
    CALLS.append(tuple(query.shape[-2:]))
    raise NotImplementedError(
        "No operator found for `memory_efficient_attention_forward` with inputs:\n"
        f"     query       : shape={tuple(query.shape)} ({query.dtype})\n"
        "`cutlassF-pt` is not supported because:\n    xFormers wasn't build with CUDA support"
    )

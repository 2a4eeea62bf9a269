"""Teacher-forced fidelity of a KV cache against the exact run (DESIGN.md section 5).

Free-running agreement is too harsh a gauge on a small model: one flip at a near-tie changes
every token after it. Instead the exact run's greedy continuation is fed, one token at a time,
through the cache under test, and each step's next-token distribution is compared with the
exact one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .compat import cache_kwarg
from .forcing import forward_with_cache


@torch.no_grad()
def exact_run(model, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt_ids (1, P) -> greedy continuation (1, n) and each step's logits (n, vocab), exact cache."""
    out = model.generate(
        prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[:, prompt_ids.shape[1]:], torch.cat(out.logits).float()


@torch.no_grad()
def teacher_forced_logits(model, prompt_ids: torch.Tensor, continuation: torch.Tensor, cache) -> torch.Tensor:
    """The cache's next-token logits (n, vocab) at each step of a given continuation (1, n)."""
    arg = {cache_kwarg(model): cache}
    steps = [model(prompt_ids, use_cache=True, **arg).logits[:, -1]]
    for t in range(continuation.shape[1] - 1):
        steps.append(model(continuation[:, t : t + 1], use_cache=True, **arg).logits[:, -1])
    return torch.cat(steps).float()


def token_agreement(exact_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, vocab) logits -> KL(exact || other) per token in nats (n,), top-1 agreement (n,) bool.

    Identical logits give KL 0 exactly (every term is p * (a - a)).
    """
    exact_logp, logp = F.log_softmax(exact_logits.float(), dim=-1), F.log_softmax(logits.float(), dim=-1)
    kl = (exact_logp.exp() * (exact_logp - logp)).sum(dim=-1)
    return kl, exact_logits.argmax(dim=-1) == logits.argmax(dim=-1)


def agreement(exact_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(exact || other) in nats, over (n, vocab) logits."""
    kl, top1 = token_agreement(exact_logits, logits)
    return {"top1": top1.float().mean().item(), "kl": kl.mean().item()}


@torch.no_grad()
def paired_teacher_forced(model, prompt_ids: torch.Tensor, continuation: list[int], cache,
                          buffer_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KL and top-1 agreement per continuation token ((n,), (n,)): `cache` against the exact
    DynamicCache, both fed prompt_ids (1, P) then the continuation in the same buffer-aligned
    pieces, so that identical caches give identical logits."""
    prompt_len = prompt_ids.shape[1]
    tail = torch.tensor([continuation[:-1]], dtype=prompt_ids.dtype, device=prompt_ids.device)
    ids = torch.cat([prompt_ids, tail], dim=1)  # the last token is only predicted
    exact = forward_with_cache(model, ids, DynamicCache(config=model.config), prompt_len, buffer_size)
    ours = forward_with_cache(model, ids, cache, prompt_len, buffer_size)
    return token_agreement(exact[0, prompt_len - 1 :], ours[0, prompt_len - 1 :])
